//! `salus health`: probes a running server's `/health` endpoint and exits 0
//! when it answers 200. Used as the container `HEALTHCHECK` (the runtime image
//! has no curl): the binary that serves is also the probe.
//!
//! The server speaks HTTPS. With `--cacert` the certificate is verified against
//! that CA; without it the probe only talks to a loopback address and skips
//! certificate verification (it checks liveness of its own container, not the
//! identity of a remote peer). Plain `http://` works for `tls.enabled = false`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;

#[derive(Args)]
pub struct HealthArgs {
    /// URL of the health endpoint.
    #[arg(long, default_value = "https://127.0.0.1:8443/health")]
    url: String,
    /// PEM CA certificate(s) to verify the server with (else: loopback only, unverified).
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// Seconds before giving up.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
}

pub fn run(args: HealthArgs) -> anyhow::Result<()> {
    let mut b = ureq::AgentBuilder::new().timeout(Duration::from_secs(args.timeout_secs.max(1)));
    if args.url.starts_with("https://") {
        b = b.tls_config(Arc::new(tls_config(&args)?));
    }
    let resp = b.build().get(&args.url).call();
    match resp {
        Ok(r) if r.status() == 200 => {
            println!("healthy");
            Ok(())
        }
        Ok(r) => bail!("{} answered {}", args.url, r.status()),
        Err(ureq::Error::Status(code, _)) => bail!("{} answered {code}", args.url),
        Err(e) => bail!("{}: {}", args.url, e.kind()),
    }
}

fn is_loopback_url(url: &str) -> bool {
    let host = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    matches!(host, "localhost" | "[::1]") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn tls_config(args: &HealthArgs) -> anyhow::Result<rustls::ClientConfig> {
    use salus_tools::tls_client::{client_config, ServerTrust};
    match &args.cacert {
        Some(path) => Ok(client_config(ServerTrust::CaFile(path))?),
        None if is_loopback_url(&args.url) => Ok(client_config(ServerTrust::Unverified)?),
        None => bail!("--cacert is required for a non-loopback URL"),
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback_url;

    #[test]
    fn health_probe_skips_verification_only_on_loopback() {
        assert!(is_loopback_url("https://127.0.0.1:8443/health"));
        assert!(is_loopback_url("https://localhost:8443/health"));
        assert!(is_loopback_url("https://[::1]:8443/health"));
        assert!(!is_loopback_url("https://10.0.0.5:8443/health"));
        assert!(!is_loopback_url("https://example.org/health"));
    }
}

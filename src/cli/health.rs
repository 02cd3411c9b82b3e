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

use anyhow::{bail, Context};
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
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    matches!(host, "localhost" | "[::1]")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn tls_config(args: &HealthArgs) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let Some(path) = &args.cacert else {
        if !is_loopback_url(&args.url) {
            bail!("--cacert is required for a non-loopback URL");
        }
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LoopbackNoVerify(provider)))
            .with_no_client_auth());
    };
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.with_context(|| format!("{}: invalid PEM", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: invalid certificate", path.display()))?;
    }
    if roots.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Accepts the loopback server's certificate unverified, still checking
/// handshake signatures.
#[derive(Debug)]
struct LoopbackNoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for LoopbackNoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
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

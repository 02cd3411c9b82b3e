//! TLS: certificates, reload, and the plain-HTTP rule.
//!
//! * [`TlsSettings`] builds a rustls `ServerConfig` (ring provider, TLS 1.2 and
//!   1.3 only, ALPN h2 + http/1.1, optional client-certificate verification
//!   against a CA bundle) from PEM files.
//! * [`ReloadableTls`] holds the current `ServerConfig` behind a lock; SIGHUP
//!   calls [`ReloadableTls::reload`], and each *new* handshake picks up the new
//!   certificate while established connections keep theirs — nothing is dropped.
//! * The connection loop that uses them is [`crate::listener`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Errors setting up TLS. Messages name the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The TLS settings of Salus' own outbound HTTPS clients (JWKS, break-glass
/// webhook, OTLP): ring, TLS 1.2 and 1.3, trusting the PEM certificates of
/// `ca_file`, or else the system's roots. The error names the file.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("CA file {}: {e}", path.display()))?;
            let mut reader = std::io::BufReader::new(&pem[..]);
            for cert in rustls_pemfile::certs(&mut reader) {
                let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("CA file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("CA file {} holds no certificate", path.display()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Where the certificate, key and optional client CA come from.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { path: path.display().to_string(), reason: reason.to_string() }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| file_err(path, "not a valid PEM certificate file"))?;
    if certs.is_empty() {
        return Err(file_err(path, "contains no PEM certificate"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    salus_sensitive::file_mode::check_private_file(path).map_err(|e| TlsError::Config(e.to_string()))?;
    let data = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| file_err(path, e))?);
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|_| file_err(path, "not a valid PEM private key file"))?
        .ok_or_else(|| file_err(path, "contains no PEM private key (PKCS#8, PKCS#1 or SEC1)"))
}

impl TlsSettings {
    /// Builds the rustls server configuration.
    pub fn build(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.build_with_expiry().map(|(config, _)| config)
    }

    /// The configuration and the leaf certificate's `notAfter` (Unix
    /// seconds), from one read of the files.
    fn build_with_expiry(&self) -> Result<(Arc<ServerConfig>, i64), TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs(&self.cert)?;
        let not_after = leaf_not_after(&self.cert, &certs)?;
        let key = read_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca)? {
                    roots.add(c).map_err(|e| file_err(ca, e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(format!("certificate and key do not match or are unusable: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok((Arc::new(config), not_after))
    }
}

/// When the leaf (first) certificate of `certs`, read from `path`, expires
/// (`notAfter`, Unix seconds).
fn leaf_not_after(path: &Path, certs: &[CertificateDer<'static>]) -> Result<i64, TlsError> {
    let leaf = certs.first().ok_or_else(|| file_err(path, "contains no PEM certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|_| file_err(path, "the first certificate is not valid X.509"))?;
    Ok(cert.validity().not_after.timestamp())
}

/// The live TLS configuration, swappable on SIGHUP.
pub struct ReloadableTls {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// `notAfter` of the serving certificate, Unix seconds.
    not_after: std::sync::atomic::AtomicI64,
}

impl ReloadableTls {
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        let (config, not_after) = settings.build_with_expiry()?;
        Ok(ReloadableTls { settings, current: RwLock::new(config), not_after: not_after.into() })
    }
    /// Re-reads the files; on error the old configuration stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (config, not_after) = self.settings.build_with_expiry()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        self.not_after.store(not_after, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    /// When the certificate in use expires (Unix seconds).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Refuses plain HTTP anywhere but loopback.
pub fn check_plaintext_allowed(addr: SocketAddr) -> Result<(), TlsError> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(TlsError::Config(format!(
            "refusing to serve plain HTTP on {addr}: plain HTTP is allowed only on a loopback address; \
             set [tls] cert and key (or bind 127.0.0.1)"
        )))
    }
}

/// Writes a self-signed certificate and key (PEM, key mode 0600) for the given
/// names (DNS names or IP addresses). For development and tests.
pub fn write_self_signed(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<(), TlsError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| TlsError::Config(e.to_string()))?;
    let key_pem = zeroize::Zeroizing::new(ck.signing_key.serialize_pem());
    write_private(key_path, key_pem.as_bytes()).map_err(|e| file_err(key_path, e))?;
    std::fs::write(cert_path, ck.cert.pem()).map_err(|e| file_err(cert_path, e))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_reloads_a_self_signed_config() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        write_self_signed(&c, &k, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let tls = ReloadableTls::new(TlsSettings { cert: c.clone(), key: k.clone(), client_ca: None }).unwrap();
        let before = tls.current.read().unwrap().clone();
        assert_eq!(before.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        // rcgen's default validity ends in 4096; the expiry metric reads it.
        let year = time::OffsetDateTime::from_unix_timestamp(tls.not_after()).unwrap().year();
        assert!(year > 2100, "notAfter year {year}");
        write_self_signed(&c, &k, &["localhost".into()]).unwrap();
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &tls.current.read().unwrap()));
        // A broken file keeps the old config.
        std::fs::write(&k, "garbage").unwrap();
        assert!(tls.reload().is_err());
        // mTLS with the cert as its own CA builds.
        write_self_signed(&c, &k, &["localhost".into()]).unwrap();
        let m = TlsSettings { cert: c.clone(), key: k, client_ca: Some(c) };
        assert!(m.build().is_ok());
    }

    #[test]
    fn plaintext_only_on_loopback() {
        assert!(check_plaintext_allowed("127.0.0.1:80".parse().unwrap()).is_ok());
        assert!(check_plaintext_allowed("[::1]:80".parse().unwrap()).is_ok());
        assert!(check_plaintext_allowed("0.0.0.0:80".parse().unwrap()).is_err());
        assert!(check_plaintext_allowed("10.1.2.3:80".parse().unwrap()).is_err());
    }
}

//! The HTTPS client setup of Salus' own clients (`salus health` and the
//! `salus-bench` load generator): TLS 1.2+
//! through rustls with the ring provider, trusting the CA certificates of a PEM
//! file, or — only when the caller has decided it is safe (a loopback health
//! probe, an explicit `--insecure`) — skipping the certificate check while
//! still verifying the handshake signatures.

use std::path::Path;
use std::sync::Arc;

/// Why a client TLS configuration could not be built. Messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsClientError {
    /// rustls refused the protocol versions (a build without TLS 1.2/1.3).
    #[error("TLS protocol versions: {0}")]
    Protocol(rustls::Error),
    /// The CA file cannot be read.
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The CA file is not PEM, or a certificate in it is invalid.
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// How the server's certificate is checked.
pub enum ServerTrust<'a> {
    /// Against the CA certificate(s) in this PEM file.
    CaFile(&'a Path),
    /// Not at all (handshake signatures are still verified).
    Unverified,
}

/// A rustls client configuration for `trust`.
pub fn client_config(trust: ServerTrust<'_>) -> Result<rustls::ClientConfig, TlsClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsClientError::Protocol)?;
    let path = match trust {
        ServerTrust::Unverified => {
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider)))
                .with_no_client_auth())
        }
        ServerTrust::CaFile(path) => path,
    };
    let shown = || path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsClientError::Read { path: shown(), source })?;
    let invalid = |reason: String| TlsClientError::Invalid { path: shown(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| invalid(format!("invalid PEM: {e}")))?;
        roots.add(cert).map_err(|e| invalid(format!("invalid certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid("holds no certificate".into()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Accepts any certificate but still checks handshake signatures.
#[derive(Debug)]
struct NoCertificateCheck(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoCertificateCheck {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

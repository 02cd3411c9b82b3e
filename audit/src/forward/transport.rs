//! The TLS connection to the collector (RFC 5425): rustls over a blocking
//! `TcpStream` on the forwarder's own thread, with connect, read and write
//! timeouts so that a stuck collector costs a reconnect, never a hang.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::ForwardError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's TLS setup: trust (a PEM CA file, else the system's roots)
/// and an optional client certificate (mTLS).
pub(crate) fn client_config(
    ca_file: Option<&Path>,
    client_auth: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, ForwardError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let shown = path.display();
            let pem = std::fs::read(path).map_err(|e| ForwardError::Tls(format!("ca_file {shown}: {e}")))?;
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| ForwardError::Tls(format!("ca_file {shown}: invalid PEM: {e}")))?;
                roots.add(cert).map_err(|e| ForwardError::Tls(format!("ca_file {shown}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(ForwardError::Tls(format!("ca_file {shown} holds no certificate")));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(ForwardError::Tls("no system CA certificates found; set ca_file".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ForwardError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pem =
                std::fs::read(cert).map_err(|e| ForwardError::Tls(format!("client_cert {}: {e}", cert.display())))?;
            let chain = rustls_pemfile::certs(&mut &pem[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ForwardError::Tls(format!("client_cert {}: invalid PEM: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(ForwardError::Tls(format!("client_cert {} holds no certificate", cert.display())));
            }
            // The key's bytes are never part of an error message.
            let pem = std::fs::read(key)
                .map_err(|e| ForwardError::Tls(format!("client_key {}: {}", key.display(), e.kind())))?;
            let key_der = rustls_pemfile::private_key(&mut &pem[..])
                .ok()
                .flatten()
                .ok_or_else(|| ForwardError::Tls(format!("client_key {} holds no private key", key.display())))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ForwardError::Tls(format!("client certificate and key: {e}")))?
        }
    };
    Ok(Arc::new(config))
}

/// The name the collector's certificate must carry (a DNS name or an IP address).
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, ForwardError> {
    ServerName::try_from(name.to_string())
        .map_err(|_| ForwardError::Config(format!("server_name '{name}' is not a DNS name or an IP address")))
}

/// An established TLS connection.
pub(crate) struct Connection {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Connection {
    /// Connects (trying each address the host resolves to) and completes the
    /// handshake, so that a certificate problem shows here.
    pub(crate) fn open(
        host: &str,
        port: u16,
        config: &Arc<rustls::ClientConfig>,
        name: &ServerName<'static>,
    ) -> Result<Connection, String> {
        let addrs = (host, port).to_socket_addrs().map_err(|e| format!("resolving: {e}"))?;
        let mut last = String::from("no address");
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        let mut tcp = tcp.ok_or(last)?;
        let setup = |t: &TcpStream| -> std::io::Result<()> {
            t.set_nodelay(true)?;
            t.set_read_timeout(Some(IO_TIMEOUT))?;
            t.set_write_timeout(Some(IO_TIMEOUT))
        };
        setup(&tcp).map_err(|e| e.to_string())?;
        let mut conn = rustls::ClientConnection::new(config.clone(), name.clone()).map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).map_err(|e| format!("TLS handshake: {e}"))?;
        }
        Ok(Connection { stream: rustls::StreamOwned::new(conn, tcp) })
    }

    /// Writes `bytes` and flushes them to the socket.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Whether the collector still holds the connection open: a read that
    /// would block. End of stream, a reset or a TLS alert mean it is gone
    /// (collectors send nothing; anything they do send is discarded).
    pub(crate) fn is_open(&mut self) -> bool {
        if self.stream.sock.set_nonblocking(true).is_err() {
            return false;
        }
        let mut buf = [0u8; 1024];
        let mut reads = 0;
        let open = loop {
            reads += 1;
            match self.stream.read(&mut buf) {
                Ok(0) => break false,
                // Bounded: a collector that keeps talking is still open.
                Ok(_) if reads >= 64 => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        open && self.stream.sock.set_nonblocking(false).is_ok()
    }

    /// Ends the session with a TLS close_notify (best effort).
    pub(crate) fn close(mut self) {
        self.stream.conn.send_close_notify();
        let _ = self.stream.flush();
        let _ = self.stream.sock.shutdown(std::net::Shutdown::Write);
    }
}

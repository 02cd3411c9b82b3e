//! Secret keys and where they come from.
//!
//! Sealed weights (key-encryption keys) and the audit trail (encryption, HMAC and
//! signing keys) share one way of naming a key source, so an operator learns it
//! once:
//!
//! * `file:/path/to/key` — a file holding the key; refused if group or others can
//!   read it (mode must be 0600 or stricter).
//! * `env:NAME` — an environment variable holding the key.
//! * `cmd:/path/to/program arg…` — an external program (a Vault or KMS agent, say)
//!   whose standard output is the key. Arguments are split on whitespace; no shell.
//!
//! A key is 32 bytes, written as 64 hex digits or as standard base64 (surrounding
//! whitespace ignored). Keys are zeroized on drop, compared in constant time, and
//! never formatted: `Debug` prints only the key id.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

/// Errors reading a key. Messages name the source, never key material.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key source string is not `file:…`, `env:…` or `cmd:…`. Holds a
    /// description, never the string itself: a key pasted where its source
    /// belongs must not reach a log.
    #[error("invalid key source ({0}): expected file:PATH, env:NAME or cmd:PROGRAM [ARGS]")]
    InvalidSource(String),
    /// The key file cannot be read.
    #[error("key file {path}: {reason}")]
    File { path: String, reason: String },
    /// The key file is readable by group or others.
    #[error("key file {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: String, mode: u32 },
    /// The environment variable is unset or not unicode.
    #[error("environment variable {0} is not set")]
    MissingEnv(String),
    /// The key command failed to run or exited non-zero.
    #[error("key command '{program}' failed: {reason}")]
    Command { program: String, reason: String },
    /// The key material is not 32 bytes in hex or base64.
    #[error("key from {0} is not 32 bytes encoded as 64 hex digits or base64")]
    BadEncoding(String),
}

/// A 256-bit secret key. Zeroized on drop; never printed.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(Zeroizing::new(bytes))
    }

    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut k[..]);
        let key = SecretKey::from_bytes(k);
        k.zeroize();
        key
    }

    /// Parses 64 hex digits or base64 of 32 bytes; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SecretError> {
        let t = text.trim();
        let mut out = Zeroizing::new([0u8; 32]);
        if t.len() == 64 && hex::decode_to_slice(t, &mut out[..]).is_ok() {
            return Ok(SecretKey(out));
        }
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD.decode(t).map_err(|_| SecretError::BadEncoding(origin.into()))?,
        );
        if decoded.len() != 32 {
            return Err(SecretError::BadEncoding(origin.into()));
        }
        out.copy_from_slice(&decoded);
        Ok(SecretKey(out))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Hex encoding, for writing a freshly generated key to its file once.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(&self.0[..]))
    }

    /// A public identifier of this key: the first 8 bytes of
    /// SHA-256("salus-key-id/v1" ‖ key), in hex. Lets a reader tell which key a
    /// file was sealed under without revealing anything about the key.
    pub fn key_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"salus-key-id/v1");
        h.update(&self.0[..]);
        hex::encode(&h.finalize()[..8])
    }

    /// Derives an independent sub-key for `purpose` (HMAC-SHA256 keyed by this key).
    pub fn derive(&self, purpose: &str) -> SecretKey {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..]).expect("HMAC takes any key length");
        mac.update(b"salus-derive/v1:");
        mac.update(purpose.as_bytes());
        let out = mac.finalize().into_bytes();
        let mut k = [0u8; 32];
        k.copy_from_slice(&out);
        let key = SecretKey::from_bytes(k);
        k.zeroize();
        key
    }
}

impl PartialEq for SecretKey {
    fn eq(&self, other: &Self) -> bool {
        self.0[..].ct_eq(&other.0[..]).into()
    }
}
impl Eq for SecretKey {}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(id={})", self.key_id())
    }
}

/// Where a key is read from. `Display` shows the source (path, variable or
/// program), never the key.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Env(String),
    Command { program: String, args: Vec<String> },
}

impl FromStr for KeySource {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, SecretError> {
        if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                return Err(SecretError::InvalidSource("file: without a path".into()));
            }
            Ok(KeySource::File(PathBuf::from(p)))
        } else if let Some(v) = s.strip_prefix("env:") {
            if v.is_empty() {
                return Err(SecretError::InvalidSource("env: without a variable name".into()));
            }
            Ok(KeySource::Env(v.into()))
        } else if let Some(c) = s.strip_prefix("cmd:") {
            let mut parts = c.split_whitespace().map(String::from);
            let program = parts.next().ok_or_else(|| SecretError::InvalidSource("cmd: without a program".into()))?;
            Ok(KeySource::Command { program, args: parts.collect() })
        } else {
            // Not echoed: it may be the key itself.
            Err(SecretError::InvalidSource(format!(
                "a value of {} characters without a known prefix",
                s.chars().count()
            )))
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "file:{}", p.display()),
            KeySource::Env(v) => write!(f, "env:{v}"),
            KeySource::Command { program, .. } => write!(f, "cmd:{program}"),
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl KeySource {
    /// Reads the key.
    pub fn load(&self) -> Result<SecretKey, SecretError> {
        let origin = self.to_string();
        match self {
            KeySource::File(path) => {
                let shown = path.display().to_string();
                let meta = std::fs::metadata(path)
                    .map_err(|e| SecretError::File { path: shown.clone(), reason: e.to_string() })?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = meta.permissions().mode() & 0o777;
                    if mode & 0o077 != 0 {
                        return Err(SecretError::Permissions { path: shown, mode });
                    }
                }
                let _ = meta;
                let text = Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| SecretError::File { path: shown, reason: e.to_string() })?,
                );
                SecretKey::parse(&text, &origin)
            }
            KeySource::Env(name) => {
                let text = Zeroizing::new(std::env::var(name).map_err(|_| SecretError::MissingEnv(name.clone()))?);
                SecretKey::parse(&text, &origin)
            }
            KeySource::Command { program, args } => {
                let out = std::process::Command::new(program)
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| SecretError::Command { program: program.clone(), reason: e.to_string() })?;
                let stdout = Zeroizing::new(out.stdout);
                if !out.status.success() {
                    return Err(SecretError::Command {
                        program: program.clone(),
                        reason: format!("exited with {}", out.status),
                    });
                }
                let text = Zeroizing::new(
                    String::from_utf8(stdout.to_vec()).map_err(|_| SecretError::BadEncoding(origin.clone()))?,
                );
                SecretKey::parse(&text, &origin)
            }
        }
    }
}

/// Writes a new random key to `path` with mode 0600, refusing to overwrite.
pub fn write_new_key_file(path: &std::path::Path) -> std::io::Result<SecretKey> {
    use std::io::Write;
    let key = SecretKey::generate();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(key.to_hex().as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_base64_and_rejects_others() {
        let hex_key = "00".repeat(31) + "ff";
        let k = SecretKey::parse(&format!("  {hex_key}\n"), "test").unwrap();
        assert_eq!(k.expose()[31], 0xff);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(SecretKey::parse(&b64, "t").unwrap().expose(), &[7u8; 32]);
        assert!(SecretKey::parse("abcd", "t").is_err());
        assert!(SecretKey::parse(&"zz".repeat(32), "t").is_err());
    }

    #[test]
    fn debug_shows_id_not_key() {
        let k = SecretKey::from_bytes([0xab; 32]);
        let d = format!("{k:?}");
        assert!(d.starts_with("SecretKey(id="));
        assert!(!d.contains("abab"));
        assert_ne!(k.key_id(), SecretKey::from_bytes([0xac; 32]).key_id());
    }

    #[test]
    fn key_file_with_loose_permissions_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        let key = write_new_key_file(&p).unwrap();
        let src: KeySource = format!("file:{}", p.display()).parse().unwrap();
        assert_eq!(src.load().unwrap(), key);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(src.load(), Err(SecretError::Permissions { .. })));
        assert!(write_new_key_file(&p).is_err(), "must not overwrite an existing key");
    }

    #[test]
    fn an_invalid_source_is_never_echoed() {
        // A key pasted where its source belongs.
        let pasted = "3f9a1c0be4d7a2c8e6b1f0d9c3a7e5b24f8d1c6a9e3b7f0c2d5a8e1b4c7f0a3d";
        let msg = pasted.parse::<KeySource>().unwrap_err().to_string();
        assert!(!msg.contains(pasted) && !msg.contains(&pasted[..8]), "{msg}");
        assert!(msg.contains("64 characters"), "{msg}");
        for bad in ["file:", "env:", "cmd:  "] {
            assert!(matches!(bad.parse::<KeySource>(), Err(SecretError::InvalidSource(_))), "{bad}");
        }
    }

    #[test]
    fn env_and_command_sources() {
        let hex_key = "11".repeat(32);
        std::env::set_var("SALUS_TEST_SECRET_KEY", &hex_key);
        let k: KeySource = "env:SALUS_TEST_SECRET_KEY".parse().unwrap();
        assert_eq!(k.load().unwrap().expose(), &[0x11; 32]);
        let c: KeySource = format!("cmd:/bin/echo {hex_key}").parse().unwrap();
        assert_eq!(c.load().unwrap().expose(), &[0x11; 32]);
        let bad: KeySource = "cmd:/bin/false".parse().unwrap();
        assert!(matches!(bad.load(), Err(SecretError::Command { .. })));
        assert!("vault:x".parse::<KeySource>().is_err());
        assert!(matches!(
            "env:SALUS_NO_SUCH_VAR_XYZ".parse::<KeySource>().unwrap().load(),
            Err(SecretError::MissingEnv(_))
        ));
    }

    #[test]
    fn derived_keys_differ_by_purpose() {
        let k = SecretKey::from_bytes([1; 32]);
        assert_ne!(k.derive("audit-hmac"), k.derive("audit-enc"));
        assert_eq!(k.derive("x"), k.derive("x"));
    }
}

//! `[audit.forward]`: streaming the audit trail's metadata to a SIEM
//! (RFC 5424 over TLS, at least once; see `salus_audit::forward`).
//!
//! Checked at start-up like every key: a bad target or name is a one-line
//! error naming the key, before the trail is opened or the model loaded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{bad, ConfigError};
use salus_audit::forward::{parse_target, ForwardSettings, MessageHeader, MAX_BATCH_RECORDS};

/// `[audit.forward]`. The section being present turns forwarding on.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardConfig {
    /// `false` keeps the section but forwards nothing.
    pub enabled: bool,
    /// The collector, `host:port` (syslog over TLS is port 6514).
    pub target: String,
    /// The name the collector's certificate must carry; unset: the host of `target`.
    pub server_name: Option<String>,
    /// PEM CA certificates trusted for the collector; unset: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for collectors that require mTLS…
    pub client_cert: Option<PathBuf>,
    /// …and its private key.
    pub client_key: Option<PathBuf>,
    /// The cursor (last seq the collector accepted); unset: `<audit.dir>/forward.cursor`.
    pub cursor_file: Option<PathBuf>,
    /// Most records per batch (also the most sent twice after a broken connection).
    pub batch_records: usize,
    /// Past this lag (records durable but not yet forwarded) `/ready` warns.
    pub lag_warning_records: u64,
    /// Reconnection waits double from 250 ms up to this many seconds.
    pub reconnect_max_backoff_secs: u64,
    /// At shutdown, seconds spent forwarding what is still unsent.
    pub shutdown_flush_secs: u64,
    /// APP-NAME of the messages.
    pub app_name: String,
    /// HOSTNAME of the messages; unset: the trail's instance name.
    pub hostname: Option<String>,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            enabled: true,
            target: String::new(),
            server_name: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            cursor_file: None,
            batch_records: 500,
            lag_warning_records: 10_000,
            reconnect_max_backoff_secs: 30,
            shutdown_flush_secs: 5,
            app_name: "salus".into(),
            hostname: None,
        }
    }
}

/// 1..=`max` printable US-ASCII characters (an RFC 5424 header field).
fn header_field(v: &str, max: usize, key: &'static str) -> Result<(), ConfigError> {
    if v.is_empty() || v.len() > max || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(key, format!("use 1-{max} printable ASCII characters, no spaces")));
    }
    Ok(())
}

impl ForwardConfig {
    /// Checks every key (files are read when the forwarder starts).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if self.target.is_empty() {
            return Err(bad(
                "audit.forward.target",
                "must be set: the syslog collector as host:port (e.g. siem.hospital.example:6514)",
            ));
        }
        let (host, _) = parse_target(&self.target).map_err(|e| bad("audit.forward.target", e))?;
        let name = self.server_name.as_deref().unwrap_or(&host);
        if rustls::pki_types::ServerName::try_from(name).is_err() {
            let key = if self.server_name.is_some() { "audit.forward.server_name" } else { "audit.forward.target" };
            return Err(bad(key, format!("'{name}' is not a DNS name or an IP address")));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            let key = if self.client_cert.is_some() { "audit.forward.client_key" } else { "audit.forward.client_cert" };
            return Err(bad(key, "client_cert and client_key are set together (mTLS) or not at all"));
        }
        if !(1..=MAX_BATCH_RECORDS).contains(&self.batch_records) {
            return Err(bad("audit.forward.batch_records", format!("must be 1 to {MAX_BATCH_RECORDS}")));
        }
        for (key, v) in [
            ("audit.forward.lag_warning_records", self.lag_warning_records),
            ("audit.forward.reconnect_max_backoff_secs", self.reconnect_max_backoff_secs),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1"));
            }
        }
        if self.reconnect_max_backoff_secs > 3600 {
            return Err(bad("audit.forward.reconnect_max_backoff_secs", "must be at most 3600"));
        }
        if self.shutdown_flush_secs > 300 {
            return Err(bad("audit.forward.shutdown_flush_secs", "must be at most 300"));
        }
        header_field(&self.app_name, 48, "audit.forward.app_name")?;
        if let Some(h) = &self.hostname {
            header_field(h, 255, "audit.forward.hostname")?;
        }
        if self.cursor_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(bad("audit.forward.cursor_file", "must not be empty"));
        }
        Ok(())
    }

    /// The forwarder's settings; `None` when `enabled = false`.
    pub fn to_settings(&self, audit_dir: &Path) -> Result<Option<ForwardSettings>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        self.validate()?;
        let cursor = self.cursor_file.clone().unwrap_or_else(|| audit_dir.join("forward.cursor"));
        let mut s =
            ForwardSettings::new(&self.target, cursor).map_err(|e| bad("audit.forward.target", e.to_string()))?;
        s.server_name = self.server_name.clone();
        s.ca_file = self.ca_file.clone();
        s.client_cert = self.client_cert.clone();
        s.client_key = self.client_key.clone();
        s.batch_records = self.batch_records;
        s.lag_warning_records = self.lag_warning_records;
        s.reconnect_max_backoff = Duration::from_secs(self.reconnect_max_backoff_secs);
        s.shutdown_flush = Duration::from_secs(self.shutdown_flush_secs);
        s.header = MessageHeader { app_name: self.app_name.clone(), hostname: self.hostname.clone() };
        Ok(Some(s))
    }
}

impl super::AuditConfig {
    /// The SIEM forwarder's settings, when `[audit.forward]` is present and enabled.
    pub fn forward_settings(&self) -> Result<Option<ForwardSettings>, ConfigError> {
        match &self.forward {
            Some(f) => f.to_settings(&self.dir),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn section_from_the_environment_maps_to_settings() {
        let v = r#"{target = "siem.hospital.example:6514", ca_file = "/etc/salus/siem-ca.pem", batch_records = 50, hostname = "gw-1"}"#;
        let c = Config::load(None, env(&[("SALUS_AUDIT__FORWARD", v)])).unwrap();
        c.validate().unwrap();
        let f = c.audit.forward.as_ref().unwrap();
        let s = f.to_settings(Path::new("/var/lib/salus/audit")).unwrap().unwrap();
        assert_eq!((s.host.as_str(), s.port, s.batch_records), ("siem.hospital.example", 6514, 50));
        assert_eq!(s.cursor_file, Path::new("/var/lib/salus/audit/forward.cursor"));
        assert_eq!(s.ca_file.as_deref(), Some(Path::new("/etc/salus/siem-ca.pem")));
        assert_eq!(s.header.hostname.as_deref(), Some("gw-1"));
        assert_eq!(s.reconnect_max_backoff, Duration::from_secs(30));
        // No section: no forwarding; enabled = false: none either.
        assert!(Config::default().audit.forward.is_none());
        let off = ForwardConfig { enabled: false, ..ForwardConfig::default() };
        assert!(off.to_settings(Path::new("/x")).unwrap().is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str)] = &[
            ("{}", "audit.forward.target"),
            (r#"{target = "siem.example"}"#, "audit.forward.target"),
            (r#"{target = "siem.example:99999"}"#, "audit.forward.target"),
            (r#"{target = "siem.example:6514", server_name = "bad name"}"#, "audit.forward.server_name"),
            (r#"{target = "siem.example:6514", client_cert = "/c.pem"}"#, "audit.forward.client_key"),
            (r#"{target = "siem.example:6514", batch_records = 0}"#, "audit.forward.batch_records"),
            (r#"{target = "siem.example:6514", lag_warning_records = 0}"#, "audit.forward.lag_warning_records"),
            (
                r#"{target = "siem.example:6514", reconnect_max_backoff_secs = 0}"#,
                "audit.forward.reconnect_max_backoff_secs",
            ),
            (r#"{target = "siem.example:6514", app_name = "sa lus"}"#, "audit.forward.app_name"),
        ];
        for (v, key) in cases {
            let c = Config::load(None, env(&[("SALUS_AUDIT__FORWARD", v)])).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{v}: {e}");
        }
        let e = Config::load(None, env(&[("SALUS_AUDIT__FORWARD", r#"{target = "a:1", tarket = 1}"#)]));
        assert!(e.unwrap_err().to_string().contains("tarket"), "unknown keys are refused");
    }
}

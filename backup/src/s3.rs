//! S3-compatible object storage through the `object_store` crate:
//! credentials from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web identity, container or
//! instance credentials — whatever `AmazonS3Builder::from_env` finds),
//! `AWS_REGION`, `AWS_ENDPOINT_URL` for a non-AWS endpoint; TLS with rustls
//! (ring) on the system's roots plus an optional configured CA.
//!
//! Uploads are one signed `PUT` each (SigV4 by `object_store`'s
//! [`AwsAuthorizer`], sent on its HTTP client) so that the Object Lock headers
//! (`x-amz-object-lock-mode`, `x-amz-object-lock-retain-until-date`) and the
//! `Content-MD5` / `x-amz-checksum-sha256` that S3 requires with them are part
//! of the signed request; `If-None-Match: *` makes the write create-only.
//! Listing and reading use `object_store` itself. Credentials, signatures
//! and request headers are never logged or put in an error message.

use std::time::Duration;

use base64::Engine as _;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::{HttpClient, HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector};
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt};

use crate::error::BackupError;
use crate::target::{check_name, ObjectLock, PutOutcome, TargetOptions};

/// Attempts of one upload (the first and the retries), with exponential
/// backoff from 250 ms up to 8 s between them.
const PUT_ATTEMPTS: u32 = 8;

pub struct S3Target {
    store: AmazonS3,
    http: HttpClient,
    bucket: String,
    /// Key prefix without a trailing `/` (may be empty).
    prefix: String,
    region: String,
    /// `https://host[:port]/bucket` (path style) or the bucket's own endpoint.
    base_url: String,
    lock: ObjectLock,
}

impl std::fmt::Debug for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Target({})", self.describe())
    }
}

fn store_err(context: impl Into<String>, e: impl std::fmt::Display) -> BackupError {
    BackupError::Target { context: context.into(), message: e.to_string() }
}

fn loopback_host(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl S3Target {
    /// `bucket[/prefix]` (after `s3://`).
    pub(crate) fn open(spec: &str, opts: &TargetOptions) -> Result<S3Target, BackupError> {
        // reqwest is built without a bundled crypto provider: use ring, as the rest of Salus.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (bucket, prefix) = spec.split_once('/').unwrap_or((spec, ""));
        let prefix = prefix.trim_matches('/').to_string();
        if bucket.is_empty() {
            return Err(BackupError::Invalid(format!("s3://{spec}: no bucket")));
        }
        if !prefix.is_empty() {
            check_name(&prefix).map_err(|_| {
                BackupError::Invalid(format!("s3://{spec}: the prefix may hold only A-Z a-z 0-9 . _ - /"))
            })?;
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(e) = &opts.endpoint {
            builder = builder.with_endpoint(e);
        }
        if let Some(r) = &opts.region {
            builder = builder.with_region(r);
        }
        let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
        let region = builder.get_config_value(&AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let virtual_hosted = builder
            .get_config_value(&AmazonS3ConfigKey::VirtualHostedStyleRequest)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let base_url = match (&endpoint, virtual_hosted) {
            (Some(e), true) => e.trim_end_matches('/').to_string(),
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let wants_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        if base_url.starts_with("http://") {
            if !wants_http {
                return Err(BackupError::Invalid(format!(
                    "S3 endpoint {} is plain HTTP: use https (AWS_ALLOW_HTTP=true is accepted only for a loopback endpoint, in tests)",
                    endpoint.as_deref().unwrap_or("")
                )));
            }
            if !loopback_host(&base_url) {
                return Err(BackupError::Invalid(format!(
                    "AWS_ALLOW_HTTP is accepted only for a loopback endpoint, not {}",
                    endpoint.as_deref().unwrap_or("")
                )));
            }
        }
        let mut client = ClientOptions::new()
            .with_allow_http(base_url.starts_with("http://"))
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(600));
        if let Some(ca) = &opts.ca_file {
            let pem = std::fs::read(ca).map_err(|e| BackupError::io(format!("reading CA file {}", ca.display()), e))?;
            let certs = object_store::Certificate::from_pem_bundle(&pem)
                .map_err(|e| store_err(format!("CA file {}", ca.display()), e))?;
            for c in certs {
                client = client.with_root_certificate(c);
            }
        }
        let http = ReqwestConnector::default().connect(&client).map_err(|e| store_err("S3 HTTP client", e))?;
        let store =
            builder.with_client_options(client).build().map_err(|e| store_err(format!("S3 bucket {bucket}"), e))?;
        Ok(S3Target { store, http, bucket: bucket.to_string(), prefix, region, base_url, lock: opts.object_lock })
    }

    pub(crate) fn describe(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn key(&self, name: &str) -> Result<String, BackupError> {
        check_name(name)?;
        Ok(if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) })
    }

    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        let full = self.key(prefix.trim_end_matches('/'))?;
        let path = StorePath::parse(&full).map_err(|e| store_err("object name", e))?;
        let metas: Vec<_> = self
            .store
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|e| store_err(format!("listing {}/{prefix}", self.describe()), e))?;
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .filter_map(|m| m.location.as_ref().strip_prefix(&strip).map(|n| (n.to_string(), m.size)))
            .collect();
        out.sort();
        Ok(out)
    }

    pub(crate) async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, BackupError> {
        let path = StorePath::parse(self.key(name)?).map_err(|e| store_err("object name", e))?;
        let ctx = || format!("reading {}/{name}", self.describe());
        match self.store.get(&path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| store_err(ctx(), e))?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err(ctx(), e)),
        }
    }

    /// One signed, create-only PUT (with Object Lock headers when configured),
    /// retried with backoff on network errors, 5xx, 408 and 429.
    pub(crate) async fn put(&self, name: &str, bytes: Vec<u8>, sha256: [u8; 32]) -> Result<PutOutcome, BackupError> {
        let key = self.key(name)?;
        let url = format!("{}/{key}", self.base_url);
        let ctx = || format!("uploading {}/{name}", self.describe());
        let md5 = {
            use md5::Digest;
            base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&bytes))
        };
        let body = bytes::Bytes::from(bytes);
        let lock = match self.lock {
            ObjectLock::Off => None,
            ObjectLock::Compliance { days } => Some(("COMPLIANCE", days)),
            ObjectLock::Governance { days } => Some(("GOVERNANCE", days)),
        };
        let retain_until = lock.map(|(_, days)| {
            let t = time::OffsetDateTime::now_utc() + time::Duration::days(days as i64);
            t.replace_nanosecond(0)
                .expect("0 ns is valid")
                .format(&time::format_description::well_known::Rfc3339)
                .expect("formatting a UTC time")
        });
        let mut delay = Duration::from_millis(250);
        let mut last_err = String::new();
        for attempt in 1..=PUT_ATTEMPTS {
            if attempt > 1 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
            }
            let cred = self.store.credentials().get_credential().await.map_err(|e| store_err("S3 credentials", e))?;
            let mut req = http::Request::builder()
                .method(http::Method::PUT)
                .uri(&url)
                .header(http::header::CONTENT_LENGTH, body.len())
                .header("content-md5", &md5)
                .header("x-amz-checksum-sha256", base64::engine::general_purpose::STANDARD.encode(sha256))
                .header(http::header::IF_NONE_MATCH, "*");
            if let (Some((mode, _)), Some(until)) = (lock, &retain_until) {
                req = req.header("x-amz-object-lock-mode", mode).header("x-amz-object-lock-retain-until-date", until);
            }
            let mut req: HttpRequest =
                req.body(HttpRequestBody::from(body.clone())).map_err(|e| store_err(ctx(), e))?;
            AwsAuthorizer::new(&cred, "s3", &self.region)
                .try_authorize(&mut req, Some(&sha256))
                .map_err(|e| store_err(ctx(), e))?;
            let resp = match self.http.execute(req).await {
                Ok(r) => r,
                Err(e) => {
                    last_err = e.to_string();
                    tracing::warn!(object = name, attempt, error = %last_err, "backup upload failed; retrying");
                    continue;
                }
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(PutOutcome::Created);
            }
            let text =
                resp.into_body().bytes().await.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            let code = xml_field(&text, "Code").unwrap_or_default();
            let message = xml_field(&text, "Message").unwrap_or_default();
            if status == http::StatusCode::PRECONDITION_FAILED {
                return Ok(PutOutcome::Existed);
            }
            last_err = format!("HTTP {status} {code} {message}").trim().to_string();
            let retry = status.is_server_error()
                || status == http::StatusCode::TOO_MANY_REQUESTS
                || status == http::StatusCode::REQUEST_TIMEOUT
                || code == "ConditionalRequestConflict";
            if !retry {
                let lower = message.to_ascii_lowercase();
                let hint =
                    if code == "InvalidRequest" && (lower.contains("object lock") || lower.contains("objectlock")) {
                        " (the bucket needs Object Lock enabled, or pass --object-lock off)"
                    } else {
                        ""
                    };
                return Err(store_err(ctx(), format!("{last_err}{hint}")));
            }
            tracing::warn!(object = name, attempt, error = %last_err, "backup upload failed; retrying");
        }
        Err(store_err(ctx(), format!("{last_err} (after {PUT_ATTEMPTS} attempts)")))
    }
}

/// The text of `<tag>…</tag>` in an S3 error body (short, no markup).
fn xml_field(body: &str, tag: &str) -> Option<String> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = body[start..].find(&format!("</{tag}>"))? + start;
    Some(body[start..end].chars().filter(|c| !c.is_control()).take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection_and_error_fields() {
        assert!(loopback_host("http://127.0.0.1:9000/b"));
        assert!(loopback_host("http://localhost:9000"));
        assert!(loopback_host("http://[::1]:9000/b"));
        assert!(!loopback_host("http://minio.internal:9000/b"));
        assert!(!loopback_host("http://10.0.0.1/b"));
        let body = "<Error><Code>AccessDenied</Code><Message>no</Message></Error>";
        assert_eq!(xml_field(body, "Code").as_deref(), Some("AccessDenied"));
        assert_eq!(xml_field(body, "Message").as_deref(), Some("no"));
    }
}

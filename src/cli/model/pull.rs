//! `salus model pull`: fetch a model repository from a Hugging Face-compatible hub
//! and seal it on the fly.
//!
//! `hf-hub` provides the repository metadata (file list with sizes and LFS SHA-256,
//! the commit the revision resolves to, the token, the endpoint) and the file URLs.
//! The bytes do not go through hf-hub's download API, which writes plaintext into
//! its cache: each file is streamed with `ureq` straight into the [`SealWriter`],
//! so plaintext exists only in process memory. Downloads are pinned to the resolved
//! commit; a dropped connection resumes the current file with an HTTP `Range`
//! request from the byte where it stopped. LFS files are checked against the hub's
//! SHA-256 before the next file starts.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use hf_hub::{Repo, RepoType};

use salus_seal::format::{self, ObjectKind};
use salus_seal::{is_model_file, LockedBuffer, PartSpec, SealError, SealSummary, SealWriter};
use salus_sensitive::secret::SecretKey;

/// Why a pull failed. Messages name the repository and file, never the token.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The hub refused, answered badly, or the download failed for good.
    #[error("model hub: {0}")]
    Hub(String),
    /// Writing the sealed file failed.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// Where and how to pull from.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Hub base URL; `None` means `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Bearer token (normally `HF_TOKEN`); never logged.
    pub token: Option<String>,
    /// Files to pull; empty means every top-level model file ([`is_model_file`]).
    pub files: Vec<String>,
    pub chunk_size: u32,
    /// Consecutive failed attempts per file before giving up.
    pub max_retries: u32,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            endpoint: None,
            token: None,
            files: Vec::new(),
            chunk_size: format::DEFAULT_CHUNK_SIZE,
            max_retries: 5,
        }
    }
}

/// One file to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub name: String,
    pub size: u64,
    /// SHA-256 from the hub's LFS metadata, when the file is stored in LFS.
    pub sha256: Option<[u8; 32]>,
}

/// The resolved pull: repository, pinned commit and files.
#[derive(Debug, Clone)]
pub struct PullPlan {
    pub repo: String,
    pub commit: String,
    pub files: Vec<HubFile>,
    api: hf_hub::api::sync::Api,
}

impl PullPlan {
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn hub_err(msg: impl Into<String>) -> PullError {
    PullError::Hub(msg.into())
}

/// Splits `REPO[@REVISION]`.
pub fn parse_repo_spec(spec: &str) -> Result<(String, String), PullError> {
    let (repo, rev) = match spec.split_once('@') {
        Some((r, v)) => (r, v),
        None => (spec, "main"),
    };
    let ok = |s: &str| {
        !s.is_empty() && !s.contains("..") && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    if !ok(repo) || !ok(rev) || repo.starts_with('/') || repo.ends_with('/') {
        return Err(hub_err(format!("invalid repository '{spec}': expected OWNER/NAME[@REVISION]")));
    }
    Ok((repo.to_string(), rev.to_string()))
}

/// Asks the hub for the repository's files at `revision` and picks the model files.
pub fn plan(repo: &str, revision: &str, opts: &PullOptions) -> Result<PullPlan, PullError> {
    let mut builder = hf_hub::api::sync::ApiBuilder::new().with_progress(false).with_token(opts.token.clone());
    if let Some(ep) = &opts.endpoint {
        builder = builder.with_endpoint(ep.trim_end_matches('/').to_string());
    }
    let api = builder.build().map_err(|e| hub_err(format!("cannot build client: {e}")))?;
    let api_repo = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    let info: serde_json::Value = api_repo
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(|e| hub_err(format!("repository {repo}@{revision}: {}", describe_ureq(&e))))?
        .into_json()
        .map_err(|e| hub_err(format!("repository {repo}@{revision}: bad metadata: {e}")))?;
    let commit = info["sha"].as_str().ok_or_else(|| hub_err("metadata lacks the commit sha"))?.to_string();
    if commit.is_empty() || !commit.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(hub_err("metadata has an invalid commit sha"));
    }
    let siblings = info["siblings"].as_array().ok_or_else(|| hub_err("metadata lacks the file list"))?;
    let mut files = Vec::new();
    for s in siblings {
        let Some(name) = s["rfilename"].as_str() else {
            continue;
        };
        let wanted = if opts.files.is_empty() { is_model_file(name) } else { opts.files.iter().any(|f| f == name) };
        if !wanted || name.contains('/') {
            continue;
        }
        let size = s["size"]
            .as_u64()
            .or_else(|| s["lfs"]["size"].as_u64())
            .ok_or_else(|| hub_err(format!("metadata lacks the size of {name}")))?;
        let sha256 = match s["lfs"]["sha256"].as_str() {
            Some(h) => {
                let mut d = [0u8; 32];
                hex::decode_to_slice(h, &mut d).map_err(|_| hub_err(format!("bad LFS sha256 for {name}")))?;
                Some(d)
            }
            None => None,
        };
        files.push(HubFile { name: name.to_string(), size, sha256 });
    }
    for want in &opts.files {
        if !files.iter().any(|f| &f.name == want) {
            return Err(hub_err(format!("{repo}@{revision} has no top-level file {want}")));
        }
    }
    files.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    if !files.iter().any(|f| f.name.ends_with(".safetensors") || f.name.ends_with(".gguf")) {
        return Err(hub_err(format!("{repo}@{revision} holds no .safetensors or .gguf files to pull")));
    }
    Ok(PullPlan { repo: repo.to_string(), commit, files, api })
}

fn describe_ureq(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, _) => format!("HTTP status {code}"),
        ureq::Error::Transport(t) => format!("transport error: {}", t.kind()),
    }
}

/// Streams every planned file into a new sealed file at `out`.
/// `progress` receives the number of plaintext bytes received, incrementally.
pub fn pull(
    plan: &PullPlan,
    out: &Path,
    kek: &SecretKey,
    opts: &PullOptions,
    progress: &dyn Fn(u64),
) -> Result<SealSummary, PullError> {
    let gguf_only = plan.files.len() == 1 && plan.files[0].name.ends_with(".gguf");
    let kind = if gguf_only { ObjectKind::Gguf } else { ObjectKind::Directory };
    let name = plan.repo.rsplit('/').next().unwrap_or(&plan.repo).to_string();
    let specs = plan.files.iter().map(|f| PartSpec { name: f.name.clone(), len: f.size }).collect();
    let mut w = SealWriter::create(out, kek, kind, &name, specs, opts.chunk_size)?;
    // Pinned to the resolved commit so that a resumed range reads the same bytes.
    let pinned = plan.api.repo(Repo::with_revision(plan.repo.clone(), RepoType::Model, plan.commit.clone()));
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .redirect_auth_headers(ureq::RedirectAuthHeaders::Never)
        .build();
    // Network plaintext lands in locked, non-dumpable memory (never swap).
    let mut buf = LockedBuffer::new(1 << 20)?;
    for f in &plan.files {
        let url = pinned.url(&f.name);
        let mut failures = 0u32;
        while w.current_part_written() < f.size {
            let offset = w.current_part_written();
            match fetch_from(&agent, &url, opts.token.as_deref(), offset, f, &mut w, buf.as_mut_slice(), progress) {
                Ok(()) => {}
                Err(Fetch::Fatal(e)) => return Err(e),
                Err(Fetch::Retry(reason)) => {
                    failures = if w.current_part_written() > offset { 1 } else { failures + 1 };
                    if failures > opts.max_retries {
                        return Err(hub_err(format!("{}: giving up after {failures} attempts: {reason}", f.name)));
                    }
                    tracing::warn!(file = %f.name, offset = w.current_part_written(), %reason, "download interrupted; resuming");
                    std::thread::sleep(Duration::from_millis(200 * failures as u64));
                }
            }
        }
        w.end_part(f.sha256).map_err(|e| match e {
            SealError::Input { reason, .. } => hub_err(format!("{}: {reason}", f.name)),
            other => PullError::Seal(other),
        })?;
    }
    Ok(w.finish()?)
}

enum Fetch {
    Retry(String),
    Fatal(PullError),
}

/// One GET from `offset` to the end (or until the connection drops).
#[allow(clippy::too_many_arguments)]
fn fetch_from(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    offset: u64,
    f: &HubFile,
    w: &mut SealWriter,
    buf: &mut [u8],
    progress: &dyn Fn(u64),
) -> Result<(), Fetch> {
    let mut req = agent.get(url);
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    if offset > 0 {
        req = req.set("Range", &format!("bytes={offset}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, _)) if code >= 500 || code == 429 => {
            return Err(Fetch::Retry(format!("HTTP status {code}")))
        }
        Err(e @ ureq::Error::Status(..)) => {
            return Err(Fetch::Fatal(hub_err(format!("{}: {}", f.name, describe_ureq(&e)))))
        }
        Err(e) => return Err(Fetch::Retry(describe_ureq(&e))),
    };
    let mut skip = 0u64;
    if offset > 0 {
        match resp.status() {
            206 => {
                let start = resp
                    .header("Content-Range")
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(offset) {
                    return Err(Fetch::Fatal(hub_err(format!("{}: server answered a different range", f.name))));
                }
            }
            // The server ignored Range: skip what we already have.
            200 => skip = offset,
            s => return Err(Fetch::Fatal(hub_err(format!("{}: unexpected HTTP status {s}", f.name)))),
        }
    }
    let mut body = resp.into_reader().take(f.size - offset + skip + 1);
    loop {
        let n = match body.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Fetch::Retry(format!("read error: {}", e.kind()))),
        };
        let mut data = &buf[..n];
        if skip > 0 {
            let s = (skip as usize).min(data.len());
            skip -= s as u64;
            data = &data[s..];
        }
        if data.is_empty() {
            continue;
        }
        if w.current_part_written() + data.len() as u64 > f.size {
            return Err(Fetch::Fatal(hub_err(format!("{}: more bytes than the hub's metadata announced", f.name))));
        }
        w.write(data).map_err(|e| Fetch::Fatal(e.into()))?;
        progress(data.len() as u64);
    }
    if w.current_part_written() < f.size {
        return Err(Fetch::Retry("connection closed early".into()));
    }
    Ok(())
}

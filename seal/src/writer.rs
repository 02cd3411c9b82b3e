//! Sealing: streams plaintext parts through AES-256-GCM STREAM into a new file.
//!
//! The writer works on a stream of bytes so that the hub puller can feed network
//! bodies straight in (plaintext never touches the disk). Part names and lengths are
//! declared up front because the header (bound into every chunk) carries the total
//! plaintext length and the manifest length; the SHA-256 of each part is computed
//! on the fly and lands in the sealed manifest at the end.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::format::{self, Header, KeySlot, ObjectKind, Part, HEADER_LEN, SLOT_OFFSETS};
use super::memory::LockedBuffer;
use super::SealError;
use salus_sensitive::secret::SecretKey;

/// A part to be sealed: its base name and exact length in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSpec {
    pub name: String,
    pub len: u64,
}

/// What a finished seal produced.
#[derive(Debug, Clone)]
pub struct SealSummary {
    pub path: PathBuf,
    pub kind: ObjectKind,
    pub name: String,
    pub parts: Vec<Part>,
    pub fingerprint: String,
    pub kek_id: String,
    pub sealed_len: u64,
}

/// Streaming sealer. Writes to a temporary file beside `out`; [`SealWriter::finish`]
/// fsyncs and renames it into place. Dropping an unfinished writer removes the
/// temporary file.
pub struct SealWriter {
    out: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    header: Header,
    bound: [u8; format::BOUND_LEN],
    cipher: Aes256Gcm,
    kek_id: String,
    /// Plaintext of the chunk being filled, in locked, non-dumpable memory.
    buf: LockedBuffer,
    filled: usize,
    chunk_index: u64,
    specs: Vec<PartSpec>,
    current: usize,
    current_written: u64,
    hasher: Sha256,
    parts: Vec<Part>,
}

fn io_err(path: &Path, e: std::io::Error) -> SealError {
    SealError::Io { path: path.display().to_string(), reason: e.to_string() }
}

impl SealWriter {
    /// Starts sealing `parts` (in this order) of a `kind` object called `name` to `out`.
    /// Refuses to overwrite an existing `out`.
    pub fn create(
        out: &Path,
        kek: &SecretKey,
        kind: ObjectKind,
        name: &str,
        parts: Vec<PartSpec>,
        chunk_size: u32,
    ) -> Result<Self, SealError> {
        let shown = out.display().to_string();
        let bad = |reason: String| SealError::Input { path: shown.clone(), reason };
        if out.exists() {
            return Err(bad("output already exists; refusing to overwrite".into()));
        }
        if parts.is_empty() {
            return Err(bad("nothing to seal".into()));
        }
        for (i, p) in parts.iter().enumerate() {
            format::validate_part_name(&p.name).map_err(&bad)?;
            if parts[..i].iter().any(|q| q.name == p.name) {
                return Err(bad(format!("duplicate part name {}", p.name)));
            }
        }
        if kind == ObjectKind::Gguf && parts.len() != 1 {
            return Err(bad("a GGUF object has exactly one part".into()));
        }
        let manifest_len = format::manifest_len(parts.iter().map(|p| p.name.as_str()));
        let plaintext_len = parts.iter().map(|p| p.len).sum::<u64>() + manifest_len;
        let mut nonce_prefix = [0u8; format::NONCE_PREFIX_LEN];
        rand::Rng::fill(&mut rand::rng(), &mut nonce_prefix[..]);
        let header = Header {
            kind,
            chunk_size,
            plaintext_len,
            manifest_len: u32::try_from(manifest_len).map_err(|_| bad("manifest too large".into()))?,
            nonce_prefix,
            name: name.to_string(),
        };
        let bound = header.encode().map_err(&bad)?;
        let data_key = SecretKey::generate();
        let slot = format::wrap_data_key(kek, &bound, &data_key);
        let cipher = Aes256Gcm::new_from_slice(data_key.expose()).expect("32-byte key");

        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "sealed".into());
        let tmp = dir.join(format!(".{base}.sealing-{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut w = SealWriter {
            out: out.to_path_buf(),
            tmp,
            file: Some(BufWriter::with_capacity(4 << 20, file)),
            header,
            bound,
            cipher,
            kek_id: kek.key_id(),
            buf: LockedBuffer::new(chunk_size as usize)?,
            filled: 0,
            chunk_index: 0,
            specs: parts,
            current: 0,
            current_written: 0,
            hasher: Sha256::new(),
            parts: Vec::new(),
        };
        let mut head = vec![0u8; HEADER_LEN];
        head[..format::BOUND_LEN].copy_from_slice(&bound);
        head[SLOT_OFFSETS[0]..SLOT_OFFSETS[0] + format::SLOT_LEN].copy_from_slice(&slot.encode());
        head[SLOT_OFFSETS[1]..SLOT_OFFSETS[1] + format::SLOT_LEN].copy_from_slice(&KeySlot::Empty.encode());
        w.write_file(&head)?;
        Ok(w)
    }

    /// The part currently being written (`None` once all parts are complete).
    pub fn current_part(&self) -> Option<&PartSpec> {
        self.specs.get(self.current)
    }

    /// Bytes of the current part written so far (the resume offset for a download).
    pub fn current_part_written(&self) -> u64 {
        self.current_written
    }

    /// Feeds bytes of the current part. Errors if they run past its declared length.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), SealError> {
        let Some(spec) = self.specs.get(self.current) else {
            return Err(self.input_error("more data than declared parts".into()));
        };
        if data.len() as u64 > spec.len - self.current_written {
            let name = spec.name.clone();
            return Err(self.input_error(format!("part {name} is longer than its declared length")));
        }
        self.hasher.update(data);
        self.current_written += data.len() as u64;
        while !data.is_empty() {
            let n = self.push_plain(data)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Ends the current part: checks its length and, if given, its SHA-256.
    pub fn end_part(&mut self, expected_sha256: Option<[u8; 32]>) -> Result<Part, SealError> {
        let Some(spec) = self.specs.get(self.current).cloned() else {
            return Err(self.input_error("no part in progress".into()));
        };
        if self.current_written != spec.len {
            return Err(self
                .input_error(format!("part {} has {} bytes, expected {}", spec.name, self.current_written, spec.len)));
        }
        let sha256: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        if let Some(want) = expected_sha256 {
            if want != sha256 {
                return Err(self.input_error(format!("part {} does not match its expected SHA-256", spec.name)));
            }
        }
        let part = Part { name: spec.name, len: spec.len, sha256 };
        self.parts.push(part.clone());
        self.current += 1;
        self.current_written = 0;
        Ok(part)
    }

    /// Writes the manifest, the final chunk, fsyncs and renames into place.
    pub fn finish(mut self) -> Result<SealSummary, SealError> {
        if self.current != self.specs.len() {
            return Err(self.input_error("not all declared parts were written".into()));
        }
        let manifest = Zeroizing::new(format::encode_manifest(&self.parts));
        debug_assert_eq!(manifest.len() as u32, self.header.manifest_len);
        let mut data = &manifest[..];
        while !data.is_empty() {
            let n = self.push_plain(data)?;
            data = &data[n..];
        }
        if self.chunk_index < self.header.chunk_count() {
            // Only reachable for an empty stream: the single, empty, final chunk.
            self.seal_chunk()?;
        }
        let mut file = self.file.take().ok_or_else(|| self.input_error("writer already closed".into()))?;
        file.flush().map_err(|e| io_err(&self.tmp, e))?;
        let file = file.into_inner().map_err(|e| io_err(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&self.tmp, e))?;
        drop(file);
        if self.out.exists() {
            return Err(self.input_error("output appeared while sealing; refusing to overwrite".into()));
        }
        std::fs::rename(&self.tmp, &self.out).map_err(|e| io_err(&self.out, e))?;
        if let Some(dir) = self.out.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(SealSummary {
            path: self.out.clone(),
            kind: self.header.kind,
            name: self.header.name.clone(),
            fingerprint: format::fingerprint(self.header.kind, &self.parts),
            parts: std::mem::take(&mut self.parts),
            kek_id: self.kek_id.clone(),
            sealed_len: self.header.sealed_len(),
        })
    }

    fn input_error(&self, reason: String) -> SealError {
        SealError::Input { path: self.out.display().to_string(), reason }
    }

    fn write_file(&mut self, bytes: &[u8]) -> Result<(), SealError> {
        let tmp = self.tmp.clone();
        match self.file.as_mut() {
            Some(f) => f.write_all(bytes).map_err(|e| io_err(&tmp, e)),
            None => Err(self.input_error("writer already closed".into())),
        }
    }

    /// Buffers plaintext; seals a chunk whenever one is complete. Returns bytes taken.
    fn push_plain(&mut self, data: &[u8]) -> Result<usize, SealError> {
        let (_, want) = self.header.chunk_range(self.chunk_index);
        let take = (want - self.filled).min(data.len());
        if take == 0 {
            return Err(self.input_error("more plaintext than declared".into()));
        }
        self.buf.as_mut_slice()[self.filled..self.filled + take].copy_from_slice(&data[..take]);
        self.filled += take;
        if self.filled == want && want > 0 {
            self.seal_chunk()?;
        }
        Ok(take)
    }

    fn seal_chunk(&mut self) -> Result<(), SealError> {
        let count = self.header.chunk_count();
        if self.chunk_index >= count {
            return Err(self.input_error("more plaintext than declared".into()));
        }
        let last = self.chunk_index + 1 == count;
        let nonce = format::chunk_nonce(&self.header.nonce_prefix, self.chunk_index as u32, last);
        let filled = self.filled;
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &self.bound, &mut self.buf.as_mut_slice()[..filled])
            .map_err(|_| self.input_error("chunk encryption failed".into()))?;
        // The buffer now holds ciphertext; write it out from a borrowed file handle.
        let tmp = self.tmp.clone();
        let file = self.file.as_mut().ok_or_else(|| SealError::Input {
            path: tmp.display().to_string(),
            reason: "writer already closed".into(),
        })?;
        file.write_all(&self.buf.as_slice()[..filled])
            .and_then(|_| file.write_all(&tag))
            .map_err(|e| io_err(&tmp, e))?;
        self.filled = 0;
        self.chunk_index += 1;
        Ok(())
    }
}

impl Drop for SealWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() || self.tmp.exists() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Files of a model directory that are sealed (and read, for plaintext loading):
/// weights (`*.safetensors`, `*.gguf`), JSON configs and tokenizer files
/// (`*.json`), chat templates (`*.jinja`), `tokenizer.model`, `merges.txt`,
/// `vocab.txt`. Hidden files and everything else are skipped.
pub fn is_model_file(name: &str) -> bool {
    !name.starts_with('.')
        && (name.ends_with(".safetensors")
            || name.ends_with(".gguf")
            || name.ends_with(".json")
            || name.ends_with(".jinja")
            || matches!(name, "tokenizer.model" | "merges.txt" | "vocab.txt"))
}

/// A plaintext model on disk: what it is and which files make it up.
#[derive(Debug, Clone)]
pub struct PlaintextLayout {
    pub kind: ObjectKind,
    /// Display name: the directory name, or the GGUF file name without `.gguf`.
    pub name: String,
    /// Files in part order (sorted by name), each with its part name and length.
    pub files: Vec<(PathBuf, PartSpec)>,
}

impl PlaintextLayout {
    pub fn total_len(&self) -> u64 {
        self.files.iter().map(|(_, s)| s.len).sum()
    }
}

/// The kind, display name and files of a plaintext model at `input`.
pub fn plaintext_layout(input: &Path) -> Result<PlaintextLayout, SealError> {
    let shown = input.display().to_string();
    let bad = |reason: String| SealError::Input { path: shown.clone(), reason };
    let meta = std::fs::metadata(input).map_err(|e| io_err(input, e))?;
    let base = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    if meta.is_dir() {
        let mut files = Vec::new();
        for e in std::fs::read_dir(input).map_err(|e| io_err(input, e))? {
            let e = e.map_err(|e| io_err(input, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let ft = e.file_type().map_err(|err| io_err(&e.path(), err))?;
            if ft.is_file() && is_model_file(&name) {
                let len = e.metadata().map_err(|err| io_err(&e.path(), err))?.len();
                files.push((e.path(), PartSpec { name, len }));
            }
        }
        files.sort_by(|a, b| a.1.name.as_bytes().cmp(b.1.name.as_bytes()));
        if !files.iter().any(|(_, p)| p.name.ends_with(".safetensors") || p.name.ends_with(".gguf")) {
            return Err(bad("directory holds no .safetensors or .gguf files".into()));
        }
        Ok(PlaintextLayout { kind: ObjectKind::Directory, name: base, files })
    } else {
        let mut magic = [0u8; 4];
        let mut f = File::open(input).map_err(|e| io_err(input, e))?;
        let n = f.read(&mut magic).map_err(|e| io_err(input, e))?;
        if n < 4 || &magic != b"GGUF" {
            return Err(bad("not a GGUF file (bad magic) and not a model directory".into()));
        }
        let stem = base.strip_suffix(".gguf").unwrap_or(&base).to_string();
        let part = if base.ends_with(".gguf") { base.clone() } else { format!("{base}.gguf") };
        let files = vec![(input.to_path_buf(), PartSpec { name: part, len: meta.len() })];
        Ok(PlaintextLayout { kind: ObjectKind::Gguf, name: stem, files })
    }
}

/// Seals a plaintext GGUF file or model directory at `input` into `out`.
/// `progress` receives the number of plaintext bytes consumed, incrementally.
pub fn seal_path(
    input: &Path,
    out: &Path,
    kek: &SecretKey,
    name: Option<&str>,
    chunk_size: u32,
    progress: &dyn Fn(u64),
) -> Result<SealSummary, SealError> {
    let layout = plaintext_layout(input)?;
    let specs = layout.files.iter().map(|(_, s)| s.clone()).collect();
    let mut w = SealWriter::create(out, kek, layout.kind, name.unwrap_or(&layout.name), specs, chunk_size)?;
    let mut buf = LockedBuffer::new(1 << 20)?;
    for (path, _) in &layout.files {
        let mut f = File::open(path).map_err(|e| io_err(path, e))?;
        loop {
            let n = match f.read(buf.as_mut_slice()) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(path, e)),
            };
            w.write(&buf.as_slice()[..n]).map_err(|_| SealError::Input {
                path: path.display().to_string(),
                reason: "file grew while it was being sealed".into(),
            })?;
            progress(n as u64);
        }
        w.end_part(None).map_err(|_| SealError::Input {
            path: path.display().to_string(),
            reason: "file shrank while it was being sealed".into(),
        })?;
    }
    w.finish()
}

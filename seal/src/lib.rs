//! Sealed model weights: encrypted at rest, decrypted only into locked process memory.
//!
//! Why: model weights are PHI — a model fine-tuned on clinical notes can reproduce
//! them — so Salus stores them encrypted and never writes plaintext to disk, tmpfs
//! or a file mapping. The byte format is specified in `docs/sealed-format.md`;
//! briefly: a 4 KiB header (bound fields + two key slots), then the payload as
//! AES-256-GCM STREAM chunks (nonce = 7-byte prefix ‖ BE u32 counter ‖ last flag;
//! AAD = the bound header), the plaintext stream being every part of the model
//! followed by a manifest of part names, lengths and SHA-256 digests.
//!
//! * [`load_model`] is what `salus serve` calls: sealed file → decrypt (all cores)
//!   into [`LockedBuffer`] memory; plaintext only with `allow_plaintext`.
//! * [`seal_path`] / [`SealWriter`] seal local files or a byte stream (`salus model pull`
//!   streams a hub repository into it).
//! * [`SealedFile`] inspects, verifies and [`rewrap`]s (key rotation in place).
//! * [`harden_process`] disables core dumps and ptrace at start-up.
//!
//! The weights fingerprint is defined in [`format::fingerprint`] and is the same
//! for the sealed and the plaintext form of a model.

pub mod format;
mod memory;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;
use salus_models::{ModelSource, WeightBytes};
use sha2::{Digest, Sha256};

pub use format::{ObjectKind, Part, DEFAULT_CHUNK_SIZE};
pub use memory::{harden_process, process_hardening_state, LockedBuffer, LockedSlice};
pub use reader::{rewrap, SealedFile, SealedFileReport, SealedInfo};
pub use writer::{is_model_file, plaintext_layout, seal_path, PartSpec, PlaintextLayout, SealSummary, SealWriter};

use salus_sensitive::secret::{KeySource, SecretError};

/// Errors of the sealed-weights layer. Every message names the file and the
/// failure; none contains key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    /// The file does not start with the sealed magic.
    #[error("{path}: not a sealed Salus file (bad magic)")]
    NotSealed { path: String },
    /// The header's format version is not one this build reads.
    #[error("{path}: unsupported sealed format version {version}")]
    UnsupportedVersion { path: String, version: u16 },
    /// A header field is invalid (flipped bit, non-zero padding, bad key slot…).
    #[error("{path}: corrupt sealed header: {reason}")]
    CorruptHeader { path: String, reason: String },
    /// The file length disagrees with the header: truncated or trailing data.
    #[error("{path}: file is {actual} bytes but its header requires exactly {expected} (truncated or trailing data)")]
    Length { path: String, expected: u64, actual: u64 },
    /// No key slot belongs to the given KEK.
    #[error("{path}: sealed under key id {sealed_under}, but the given key encryption key has id {given}")]
    WrongKek { path: String, sealed_under: String, given: String },
    /// A key slot names this KEK but does not authenticate (tampered header or slot).
    #[error("{path}: the data key does not unwrap under the given key encryption key (header or key slot tampered)")]
    KeyUnwrap { path: String },
    /// A payload chunk failed authentication (corrupt, reordered, duplicated or truncated).
    #[error("{path}: chunk {chunk} of {chunks} failed authentication (corrupted, reordered or tampered data)")]
    ChunkAuth { path: String, chunk: u64, chunks: u64 },
    /// The sealed manifest is malformed or disagrees with the header.
    #[error("{path}: invalid sealed manifest: {reason}")]
    Manifest { path: String, reason: String },
    /// A part's recomputed SHA-256 differs from the manifest.
    #[error("{path}: part {part} does not match its recorded SHA-256")]
    PartDigest { path: String, part: String },
    /// A sealed file was given but no key encryption key.
    #[error("{path}: sealed weights need a key encryption key (--kek / weights_kek)")]
    NoKek { path: String },
    /// Plaintext weights while they are not allowed.
    #[error("{path}: plaintext weights refused; seal them with `salus model seal`, or set allow_plaintext_weights = true (development only)")]
    PlaintextRefused { path: String },
    /// The key encryption key could not be read.
    #[error("key encryption key: {0}")]
    Key(#[from] SecretError),
    /// Bad input to the sealer (missing files, length mismatch, existing output…).
    #[error("{path}: {reason}")]
    Input { path: String, reason: String },
    /// Allocating, locking or advising plaintext memory failed.
    #[error("plaintext memory: {0}")]
    Memory(String),
    /// An operation was interrupted (test hook); the file is left readable.
    #[error("{path}: operation interrupted")]
    Interrupted { path: String },
}

/// A model ready to hand to `salus_models`: in-memory files and their fingerprint.
#[derive(Debug, Clone)]
pub struct LoadedWeights {
    pub source: ModelSource,
    /// Hex SHA-256 of the plaintext (see [`format::fingerprint`]): identical for the
    /// sealed and the plaintext form of the same model.
    pub fingerprint: String,
    /// Whether the weights came from a sealed file.
    pub sealed: bool,
}

/// Loads a model for serving.
///
/// * a sealed file → the KEK is read from `kek`, the data key unwrapped, every chunk
///   authenticated and decrypted in parallel into locked, non-dumpable memory;
///   any failure returns an error naming the file, with no partial weights;
/// * a plaintext GGUF file or model directory → only if `allow_plaintext`
///   (development), read into locked memory as well; otherwise
///   [`SealError::PlaintextRefused`].
pub fn load_model(path: &Path, kek: Option<&KeySource>, allow_plaintext: bool) -> Result<LoadedWeights, SealError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| reader::io_err(path, e))?;
    let is_sealed = meta.is_file() && {
        let mut magic = [0u8; 8];
        let mut f = File::open(path).map_err(|e| reader::io_err(path, e))?;
        let n = f.read(&mut magic).map_err(|e| reader::io_err(path, e))?;
        n == 8 && &magic == format::MAGIC
    };
    if is_sealed {
        let Some(kek) = kek else {
            return Err(SealError::NoKek { path: shown });
        };
        let kek = kek.load()?;
        let (source, fingerprint) = reader::load_sealed(path, &kek)?;
        tracing::info!(path = %shown, %fingerprint, "sealed weights decrypted into locked memory");
        return Ok(LoadedWeights { source, fingerprint, sealed: true });
    }
    if !allow_plaintext {
        return Err(SealError::PlaintextRefused { path: shown });
    }
    tracing::warn!(path = %shown, "loading PLAINTEXT weights (allow_plaintext_weights = true): development only");
    let (source, fingerprint) = load_plaintext(path)?;
    Ok(LoadedWeights { source, fingerprint, sealed: false })
}

/// Reads a plaintext model (same file selection as the sealer) into locked memory
/// and computes its fingerprint.
fn load_plaintext(path: &Path) -> Result<(ModelSource, String), SealError> {
    let PlaintextLayout { kind, name, files } = plaintext_layout(path)?;
    let loaded: Vec<(String, LockedBuffer, [u8; 32])> = files
        .par_iter()
        .map(|(p, spec)| {
            let buf = read_locked(p, spec.len)?;
            let sha: [u8; 32] = Sha256::digest(buf.as_slice()).into();
            Ok((spec.name.clone(), buf, sha))
        })
        .collect::<Result<_, SealError>>()?;
    let mut source = ModelSource::new(name);
    let mut parts = Vec::with_capacity(loaded.len());
    for (name, buf, sha256) in loaded {
        parts.push(Part { name: name.clone(), len: buf.len() as u64, sha256 });
        let buf = Arc::new(buf);
        let len = buf.len();
        source.insert(name, WeightBytes::new(LockedSlice::new(buf, 0..len)));
    }
    Ok((source, format::fingerprint(kind, &parts)))
}

/// Reads a whole file into a new locked buffer (parallel positional reads).
fn read_locked(path: &Path, len: u64) -> Result<LockedBuffer, SealError> {
    let f = File::open(path).map_err(|e| reader::io_err(path, e))?;
    let mut buf = LockedBuffer::new(len as usize)?;
    buf.as_mut_slice()
        .par_chunks_mut(8 << 20)
        .enumerate()
        .try_for_each(|(i, dest)| f.read_exact_at(dest, (i as u64) * (8 << 20)).map_err(|e| reader::io_err(path, e)))?;
    let actual = f.metadata().map_err(|e| reader::io_err(path, e))?.len();
    if actual != len {
        return Err(SealError::Input {
            path: path.display().to_string(),
            reason: "file changed while being read".into(),
        });
    }
    Ok(buf)
}

/// Header fields of a sealed file; no key needed.
pub fn inspect(path: &Path) -> Result<SealedInfo, SealError> {
    Ok(SealedFile::open(path)?.info())
}

/// Decrypts and checks every chunk and every part digest without keeping plaintext.
pub fn verify(path: &Path, kek: &KeySource, progress: &dyn Fn(u64)) -> Result<SealedFileReport, SealError> {
    let kek = kek.load()?;
    SealedFile::open(path)?.verify(&kek, progress)
}

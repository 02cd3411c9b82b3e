//! Reading sealed files: header inspection, parallel decryption into locked
//! memory, streaming verification, and key rotation (rewrap).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::format::{self, Header, HeaderProblem, KeySlot, ObjectKind, Part, BOUND_LEN, HEADER_LEN, SLOT_OFFSETS};
use super::memory::{LockedBuffer, LockedSlice};
use super::SealError;
use salus_models::{ModelSource, WeightBytes};
use salus_sensitive::secret::SecretKey;

/// An opened sealed file whose header parsed and whose length matches it.
pub struct SealedFile {
    path: PathBuf,
    file: File,
    pub header: Header,
    bound: [u8; BOUND_LEN],
    pub slots: [KeySlot; 2],
    pub file_len: u64,
}

/// Header fields of a sealed file (no key needed).
#[derive(Debug, Clone)]
pub struct SealedInfo {
    pub format_version: u16,
    pub kind: ObjectKind,
    pub name: String,
    pub chunk_size: u32,
    pub chunk_count: u64,
    pub plaintext_len: u64,
    pub manifest_len: u32,
    pub nonce_prefix_hex: String,
    /// KEK ids of the used key slots (two only while a rewrap is incomplete).
    pub kek_ids: Vec<String>,
    pub file_len: u64,
}

/// Result of a successful `verify`.
#[derive(Debug, Clone)]
pub struct SealedFileReport {
    pub kind: ObjectKind,
    pub name: String,
    pub parts: Vec<Part>,
    pub fingerprint: String,
    pub chunks: u64,
}

/// Where a rewrap is interrupted (tests of the crash-safety argument; product
/// code always passes `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RewrapFault {
    None,
    /// Only half of the new key slot reaches the file (a torn write), then stop.
    TornNewSlot,
    /// Stop after the new slot is durable, before the old slot is cleared.
    BeforeClearingOldSlot,
}

pub(super) fn io_err(path: &Path, e: std::io::Error) -> SealError {
    SealError::Io { path: path.display().to_string(), reason: e.to_string() }
}

impl SealedFile {
    pub fn open(path: &Path) -> Result<Self, SealError> {
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        Self::from_file(path, file)
    }

    fn from_file(path: &Path, file: File) -> Result<Self, SealError> {
        let shown = path.display().to_string();
        let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let mut head = vec![0u8; HEADER_LEN];
        if file_len < HEADER_LEN as u64 {
            let mut magic = [0u8; 8];
            let n = file.read_at(&mut magic, 0).map_err(|e| io_err(path, e))?;
            if n == 8 && &magic == format::MAGIC {
                return Err(SealError::Length { path: shown, expected: HEADER_LEN as u64, actual: file_len });
            }
            return Err(SealError::NotSealed { path: shown });
        }
        file.read_exact_at(&mut head, 0).map_err(|e| io_err(path, e))?;
        let mut bound = [0u8; BOUND_LEN];
        bound.copy_from_slice(&head[..BOUND_LEN]);
        let header = Header::decode(&bound).map_err(|p| match p {
            HeaderProblem::NotSealed => SealError::NotSealed { path: shown.clone() },
            HeaderProblem::Version(v) => SealError::UnsupportedVersion { path: shown.clone(), version: v },
            HeaderProblem::Corrupt(reason) => SealError::CorruptHeader { path: shown.clone(), reason },
        })?;
        let slot = |i: usize| {
            KeySlot::decode(&head[SLOT_OFFSETS[i]..SLOT_OFFSETS[i] + format::SLOT_LEN]).map_err(|reason| {
                SealError::CorruptHeader { path: shown.clone(), reason: format!("key slot {i}: {reason}") }
            })
        };
        let slots = [slot(0)?, slot(1)?];
        if head[SLOT_OFFSETS[1] + format::SLOT_LEN..].iter().any(|&b| b != 0) {
            return Err(SealError::CorruptHeader { path: shown, reason: "reserved header bytes are not zero".into() });
        }
        if file_len != header.sealed_len() {
            return Err(SealError::Length { path: shown, expected: header.sealed_len(), actual: file_len });
        }
        Ok(SealedFile { path: path.to_path_buf(), file, header, bound, slots, file_len })
    }

    pub fn info(&self) -> SealedInfo {
        SealedInfo {
            format_version: format::FORMAT_VERSION,
            kind: self.header.kind,
            name: self.header.name.clone(),
            chunk_size: self.header.chunk_size,
            chunk_count: self.header.chunk_count(),
            plaintext_len: self.header.plaintext_len,
            manifest_len: self.header.manifest_len,
            nonce_prefix_hex: hex::encode(self.header.nonce_prefix),
            kek_ids: self.slots.iter().filter_map(KeySlot::kek_id_hex).collect(),
            file_len: self.file_len,
        }
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// Unwraps the data key with `kek`; returns it and the slot index it came from.
    pub fn unwrap_key(&self, kek: &SecretKey) -> Result<(SecretKey, usize), SealError> {
        let id = kek.key_id();
        let mut id_matched = false;
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.kek_id_hex().as_deref() == Some(id.as_str()) {
                id_matched = true;
                if let Some(dk) = format::unwrap_data_key(kek, &self.bound, slot) {
                    return Ok((dk, i));
                }
            }
        }
        if id_matched {
            Err(SealError::KeyUnwrap { path: self.shown() })
        } else {
            Err(SealError::WrongKek {
                path: self.shown(),
                sealed_under: self.slots.iter().filter_map(KeySlot::kek_id_hex).collect::<Vec<_>>().join(", "),
                given: id,
            })
        }
    }

    /// Reads and decrypts chunk `i` into `dest` (exactly the chunk's plaintext length).
    fn decrypt_chunk(&self, cipher: &Aes256Gcm, i: u64, dest: &mut [u8]) -> Result<(), SealError> {
        let count = self.header.chunk_count();
        let off = self.header.chunk_file_offset(i);
        let mut tag = [0u8; format::TAG_LEN];
        let auth = || SealError::ChunkAuth { path: self.shown(), chunk: i, chunks: count };
        self.file.read_exact_at(dest, off).map_err(|e| io_err(&self.path, e))?;
        self.file.read_exact_at(&mut tag, off + dest.len() as u64).map_err(|e| io_err(&self.path, e))?;
        let nonce = format::chunk_nonce(&self.header.nonce_prefix, i as u32, i + 1 == count);
        cipher
            .decrypt_in_place_detached(Nonce::from_slice(&nonce), &self.bound, dest, Tag::from_slice(&tag))
            .map_err(|_| auth())
    }

    /// Decrypts every chunk, in parallel on the rayon pool, straight into one locked
    /// buffer holding the whole plaintext stream (parts, then manifest).
    pub fn decrypt_all(&self, data_key: &SecretKey) -> Result<LockedBuffer, SealError> {
        let cipher = Aes256Gcm::new_from_slice(data_key.expose()).expect("32-byte key");
        let len = usize::try_from(self.header.plaintext_len)
            .map_err(|_| SealError::Memory("sealed object larger than the address space".into()))?;
        let mut buf = LockedBuffer::new(len)?;
        if len == 0 {
            self.decrypt_chunk(&cipher, 0, &mut [])?;
            return Ok(buf);
        }
        // Every chunk is tried and the lowest failing one reported, so a damaged file
        // names the same chunk on every load (a short-circuiting parallel loop would
        // report whichever failing chunk a worker reached first).
        let first_failure = buf
            .as_mut_slice()
            .par_chunks_mut(self.header.chunk_size as usize)
            .enumerate()
            .filter_map(|(i, dest)| self.decrypt_chunk(&cipher, i as u64, dest).err().map(|e| (i, e)))
            .min_by_key(|(i, _)| *i);
        match first_failure {
            Some((_, e)) => Err(e),
            None => Ok(buf),
        }
    }

    /// Splits a decrypted stream into its manifest parts (validated against the header).
    pub fn parts_of(&self, plain: &[u8]) -> Result<Vec<Part>, SealError> {
        let moff = (self.header.plaintext_len - self.header.manifest_len as u64) as usize;
        let parts = format::decode_manifest(&plain[moff..])
            .map_err(|reason| SealError::Manifest { path: self.shown(), reason })?;
        self.check_parts(&parts)?;
        Ok(parts)
    }

    fn check_parts(&self, parts: &[Part]) -> Result<(), SealError> {
        let moff = self.header.plaintext_len - self.header.manifest_len as u64;
        let bad = |reason: &str| Err(SealError::Manifest { path: self.shown(), reason: reason.into() });
        if parts.iter().try_fold(0u64, |a, p| a.checked_add(p.len)) != Some(moff) {
            return bad("part lengths do not add up to the payload length");
        }
        if self.header.kind == ObjectKind::Gguf && (parts.len() != 1 || !parts[0].name.ends_with(".gguf")) {
            return bad("a GGUF object must hold exactly one .gguf part");
        }
        Ok(())
    }

    /// Decrypts the chunks that hold the manifest (the tail of the stream).
    fn read_manifest(&self, cipher: &Aes256Gcm) -> Result<Vec<Part>, SealError> {
        let h = &self.header;
        let cs = h.chunk_size as u64;
        let moff = h.plaintext_len - h.manifest_len as u64;
        let first = if h.plaintext_len == 0 { 0 } else { moff.min(h.plaintext_len - 1) / cs };
        let start = first * cs;
        let mut tail = LockedBuffer::new((h.plaintext_len - start) as usize)?;
        let mut pos = 0usize;
        for i in first..h.chunk_count() {
            let (_, len) = h.chunk_range(i);
            self.decrypt_chunk(cipher, i, &mut tail.as_mut_slice()[pos..pos + len])?;
            pos += len;
        }
        let parts = format::decode_manifest(&tail.as_slice()[(moff - start) as usize..])
            .map_err(|reason| SealError::Manifest { path: self.shown(), reason })?;
        self.check_parts(&parts)?;
        Ok(parts)
    }

    /// Decrypts and authenticates every chunk in order and recomputes each part's
    /// SHA-256, keeping only one chunk of plaintext (in locked memory) at a time.
    pub fn verify(&self, kek: &SecretKey, progress: &dyn Fn(u64)) -> Result<SealedFileReport, SealError> {
        let (dk, _) = self.unwrap_key(kek)?;
        let cipher = Aes256Gcm::new_from_slice(dk.expose()).expect("32-byte key");
        let parts = self.read_manifest(&cipher)?;
        let h = &self.header;
        let mut scratch = LockedBuffer::new(h.chunk_size as usize)?;
        // Part boundaries in stream offsets.
        let mut bounds = Vec::with_capacity(parts.len());
        let mut acc = 0u64;
        for p in &parts {
            bounds.push((acc, acc + p.len));
            acc += p.len;
        }
        let mut hashers: Vec<Sha256> = parts.iter().map(|_| Sha256::new()).collect();
        for i in 0..h.chunk_count() {
            let (start, len) = h.chunk_range(i);
            let dest = &mut scratch.as_mut_slice()[..len];
            self.decrypt_chunk(&cipher, i, dest)?;
            let end = start + len as u64;
            for (k, &(ps, pe)) in bounds.iter().enumerate() {
                let (s, e) = (ps.max(start), pe.min(end));
                if s < e {
                    hashers[k].update(&dest[(s - start) as usize..(e - start) as usize]);
                }
            }
            progress(len as u64);
        }
        for (p, hsh) in parts.iter().zip(hashers) {
            let got: [u8; 32] = hsh.finalize().into();
            if got != p.sha256 {
                return Err(SealError::PartDigest { path: self.shown(), part: p.name.clone() });
            }
        }
        Ok(SealedFileReport {
            kind: h.kind,
            name: h.name.clone(),
            fingerprint: format::fingerprint(h.kind, &parts),
            parts,
            chunks: h.chunk_count(),
        })
    }
}

/// Decrypts a sealed file into locked memory and builds the model source.
pub(super) fn load_sealed(path: &Path, kek: &SecretKey) -> Result<(ModelSource, String), SealError> {
    let sealed = SealedFile::open(path)?;
    let (dk, _) = sealed.unwrap_key(kek)?;
    let plain = Arc::new(sealed.decrypt_all(&dk)?);
    let parts = sealed.parts_of(plain.as_slice())?;
    let mut source = ModelSource::new(sealed.header.name.clone());
    let mut off = 0usize;
    for p in &parts {
        let end = off + p.len as usize;
        source.insert(p.name.clone(), WeightBytes::new(LockedSlice::new(plain.clone(), off..end)));
        off = end;
    }
    Ok((source, format::fingerprint(sealed.header.kind, &parts)))
}

/// Key rotation: re-wraps the data key from `from` to `to` without touching the
/// payload. The new wrapping goes into the other key slot and is fsynced and read
/// back before the old slot is zeroed (and fsynced), so at every instant at least
/// one slot unwraps: an interruption leaves the file readable under the old key
/// (and, past the first fsync, under the new key too; rerun to finish).
pub fn rewrap(path: &Path, from: &SecretKey, to: &SecretKey) -> Result<(), SealError> {
    rewrap_with_fault(path, from, to, RewrapFault::None)
}

pub(crate) fn rewrap_with_fault(
    path: &Path,
    from: &SecretKey,
    to: &SecretKey,
    fault: RewrapFault,
) -> Result<(), SealError> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| io_err(path, e))?;
    let sealed = SealedFile::from_file(path, file)?;
    let (dk, old) = sealed.unwrap_key(from)?;
    let target = 1 - old;
    let new_slot = format::wrap_data_key(to, &sealed.bound, &dk).encode();
    let f = &sealed.file;
    let interrupted = || SealError::Interrupted { path: path.display().to_string() };
    if fault == RewrapFault::TornNewSlot {
        f.write_all_at(&new_slot[..format::SLOT_LEN / 2], SLOT_OFFSETS[target] as u64).map_err(|e| io_err(path, e))?;
        f.sync_data().map_err(|e| io_err(path, e))?;
        return Err(interrupted());
    }
    f.write_all_at(&new_slot, SLOT_OFFSETS[target] as u64).map_err(|e| io_err(path, e))?;
    f.sync_data().map_err(|e| io_err(path, e))?;
    if fault == RewrapFault::BeforeClearingOldSlot {
        return Err(interrupted());
    }
    // Read back: the new slot must unwrap under `to` before the old one is destroyed.
    let reread = SealedFile::open(path)?;
    match format::unwrap_data_key(to, &reread.bound, &reread.slots[target]) {
        Some(dk2) if dk2 == dk => {}
        _ => return Err(SealError::KeyUnwrap { path: path.display().to_string() }),
    }
    f.write_all_at(&[0u8; format::SLOT_LEN], SLOT_OFFSETS[old] as u64).map_err(|e| io_err(path, e))?;
    f.sync_data().map_err(|e| io_err(path, e))?;
    Ok(())
}

//! The sealed file format, version 1 (specified in `docs/sealed-format.md`).
//!
//! ```text
//! 0     .. 2048   bound header: fixed fields, name, zero padding (AAD of every chunk)
//! 2048  .. 2176   key slot 0   (KEK id, wrap nonce, wrapped data key)
//! 2176  .. 2304   key slot 1
//! 2304  .. 4096   zero
//! 4096  ..        payload: STREAM chunks, each ciphertext ‖ 16-byte tag
//! ```
//!
//! The key slots sit outside the associated data so that key rotation rewrites
//! 128 bytes, never the payload; each slot is itself authenticated (AES-GCM with
//! the bound header as AAD), so a torn or tampered slot simply fails to unwrap.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use salus_sensitive::secret::SecretKey;

pub const MAGIC: &[u8; 8] = b"SALUSEAL";
pub const FORMAT_VERSION: u16 = 1;
pub const ALGORITHM_AES256GCM_STREAM: u8 = 1;
pub const HEADER_LEN: usize = 4096;
pub const BOUND_LEN: usize = 2048;
pub const SLOT_OFFSETS: [usize; 2] = [2048, 2176];
pub const SLOT_LEN: usize = 128;
pub const TAG_LEN: usize = 16;
pub const NONCE_PREFIX_LEN: usize = 7;
pub const MAX_NAME_LEN: usize = 1024;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
pub const MIN_CHUNK_SIZE: u32 = 16;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
pub const MANIFEST_MAGIC: &[u8; 8] = b"SALUSMAN";
/// Purpose string for deriving the wrapping key from a KEK (`SecretKey::derive`).
pub const WRAP_PURPOSE: &str = "salus-seal-wrap/v1";
const WRAP_AAD_LABEL: &[u8] = b"salus-seal/v1 key-wrap";
const FIXED_LEN: usize = 42;

/// What was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A single GGUF file (one part).
    Gguf,
    /// A model directory (config, tokenizer files, safetensors shards).
    Directory,
}

impl ObjectKind {
    pub fn code(self) -> u8 {
        match self {
            ObjectKind::Gguf => 1,
            ObjectKind::Directory => 2,
        }
    }
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(ObjectKind::Gguf),
            2 => Some(ObjectKind::Directory),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Gguf => "gguf",
            ObjectKind::Directory => "directory",
        }
    }
}

/// The fields of the bound header (bytes 0..2048).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: ObjectKind,
    pub chunk_size: u32,
    /// Plaintext length of the whole stream: all parts, then the manifest.
    pub plaintext_len: u64,
    pub manifest_len: u32,
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
    pub name: String,
}

impl Header {
    /// Number of STREAM chunks (at least one; the last may be short or empty).
    pub fn chunk_count(&self) -> u64 {
        if self.plaintext_len == 0 {
            1
        } else {
            self.plaintext_len.div_ceil(self.chunk_size as u64)
        }
    }

    /// Exact length of a well-formed sealed file with this header.
    pub fn sealed_len(&self) -> u64 {
        HEADER_LEN as u64 + self.plaintext_len + self.chunk_count() * TAG_LEN as u64
    }

    /// Plaintext range of chunk `i` within the stream.
    pub fn chunk_range(&self, i: u64) -> (u64, usize) {
        let start = i * self.chunk_size as u64;
        let len = (self.plaintext_len - start.min(self.plaintext_len)).min(self.chunk_size as u64);
        (start, len as usize)
    }

    /// File offset of chunk `i`'s ciphertext.
    pub fn chunk_file_offset(&self, i: u64) -> u64 {
        HEADER_LEN as u64 + i * (self.chunk_size as u64 + TAG_LEN as u64)
    }

    /// Serializes the bound region (exactly [`BOUND_LEN`] bytes).
    pub fn encode(&self) -> Result<[u8; BOUND_LEN], String> {
        validate_name(&self.name)?;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(format!("chunk size {} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}", self.chunk_size));
        }
        if self.chunk_count() > u32::MAX as u64 + 1 {
            return Err("too many chunks for a 32-bit counter".into());
        }
        let mut b = [0u8; BOUND_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        b[10] = ALGORITHM_AES256GCM_STREAM;
        b[11] = self.kind.code();
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        b[16..20].copy_from_slice(&self.chunk_size.to_be_bytes());
        b[20..28].copy_from_slice(&self.plaintext_len.to_be_bytes());
        b[28..32].copy_from_slice(&self.manifest_len.to_be_bytes());
        b[32..39].copy_from_slice(&self.nonce_prefix);
        b[39] = 0;
        b[40..42].copy_from_slice(&(self.name.len() as u16).to_be_bytes());
        b[FIXED_LEN..FIXED_LEN + self.name.len()].copy_from_slice(self.name.as_bytes());
        Ok(b)
    }

    /// Parses and strictly validates the bound region (padding must be zero).
    pub fn decode(b: &[u8; BOUND_LEN]) -> Result<Self, HeaderProblem> {
        if &b[0..8] != MAGIC {
            return Err(HeaderProblem::NotSealed);
        }
        let version = u16::from_be_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION {
            return Err(HeaderProblem::Version(version));
        }
        let bad = |s: &str| Err(HeaderProblem::Corrupt(s.to_string()));
        if b[10] != ALGORITHM_AES256GCM_STREAM {
            return bad("unknown algorithm id");
        }
        let Some(kind) = ObjectKind::from_code(b[11]) else {
            return bad("unknown object kind");
        };
        if u32::from_be_bytes(b[12..16].try_into().unwrap_or_default()) != HEADER_LEN as u32 {
            return bad("unexpected header length");
        }
        let chunk_size = u32::from_be_bytes(b[16..20].try_into().unwrap_or_default());
        let plaintext_len = u64::from_be_bytes(b[20..28].try_into().unwrap_or_default());
        let manifest_len = u32::from_be_bytes(b[28..32].try_into().unwrap_or_default());
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        nonce_prefix.copy_from_slice(&b[32..39]);
        if b[39] != 0 {
            return bad("reserved byte is not zero");
        }
        let name_len = u16::from_be_bytes([b[40], b[41]]) as usize;
        if name_len > MAX_NAME_LEN {
            return bad("name too long");
        }
        let Ok(name) = std::str::from_utf8(&b[FIXED_LEN..FIXED_LEN + name_len]) else {
            return bad("name is not UTF-8");
        };
        if b[FIXED_LEN + name_len..].iter().any(|&x| x != 0) {
            return bad("header padding is not zero");
        }
        if manifest_len as u64 > plaintext_len {
            return bad("manifest longer than the plaintext");
        }
        let h = Header { kind, chunk_size, plaintext_len, manifest_len, nonce_prefix, name: name.to_string() };
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return bad("chunk size out of range");
        }
        if h.chunk_count() > u32::MAX as u64 + 1 {
            return bad("too many chunks");
        }
        if let Err(e) = validate_name(&h.name) {
            return bad(&e);
        }
        Ok(h)
    }
}

/// Why a header did not parse (the caller adds the file name).
#[derive(Debug)]
pub enum HeaderProblem {
    NotSealed,
    Version(u16),
    Corrupt(String),
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!("name longer than {MAX_NAME_LEN} bytes"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("name contains control characters".into());
    }
    Ok(())
}

/// The STREAM nonce of chunk `index`: prefix(7) ‖ u32 BE counter ‖ last-chunk flag.
pub fn chunk_nonce(prefix: &[u8; NONCE_PREFIX_LEN], index: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    n
}

/// A decoded key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySlot {
    Empty,
    Used { kek_id: [u8; 8], nonce: [u8; 12], wrapped: [u8; 48] },
}

impl KeySlot {
    pub fn encode(&self) -> [u8; SLOT_LEN] {
        let mut s = [0u8; SLOT_LEN];
        if let KeySlot::Used { kek_id, nonce, wrapped } = self {
            s[0] = 1;
            s[1..9].copy_from_slice(kek_id);
            s[9..21].copy_from_slice(nonce);
            s[21..69].copy_from_slice(wrapped);
        }
        s
    }

    pub fn decode(s: &[u8]) -> Result<Self, String> {
        match s[0] {
            0 if s.iter().all(|&b| b == 0) => Ok(KeySlot::Empty),
            // A used slot names a KEK (an all-zero id is a flipped state bit of an
            // empty slot) and keeps its reserved tail zero.
            1 if s[1..9].iter().any(|&b| b != 0) && s[69..SLOT_LEN].iter().all(|&b| b == 0) => {
                let mut kek_id = [0u8; 8];
                kek_id.copy_from_slice(&s[1..9]);
                let mut nonce = [0u8; 12];
                nonce.copy_from_slice(&s[9..21]);
                let mut wrapped = [0u8; 48];
                wrapped.copy_from_slice(&s[21..69]);
                Ok(KeySlot::Used { kek_id, nonce, wrapped })
            }
            _ => Err("malformed key slot".into()),
        }
    }

    pub fn kek_id_hex(&self) -> Option<String> {
        match self {
            KeySlot::Empty => None,
            KeySlot::Used { kek_id, .. } => Some(hex::encode(kek_id)),
        }
    }
}

/// The raw 8-byte KEK id (`SecretKey::key_id` is its hex form).
pub fn kek_id_bytes(kek: &SecretKey) -> [u8; 8] {
    let mut id = [0u8; 8];
    // key_id() is 16 hex digits produced by hex::encode; decoding cannot fail.
    let _ = hex::decode_to_slice(kek.key_id(), &mut id);
    id
}

fn wrap_aad(bound: &[u8; BOUND_LEN], kek_id: &[u8; 8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(WRAP_AAD_LABEL.len() + BOUND_LEN + 8);
    aad.extend_from_slice(WRAP_AAD_LABEL);
    aad.extend_from_slice(bound);
    aad.extend_from_slice(kek_id);
    aad
}

/// Wraps the data key under `kek` (AES-256-GCM with the derived wrapping key).
pub fn wrap_data_key(kek: &SecretKey, bound: &[u8; BOUND_LEN], data_key: &SecretKey) -> KeySlot {
    let kek_id = kek_id_bytes(kek);
    let wk = kek.derive(WRAP_PURPOSE);
    let cipher = Aes256Gcm::new_from_slice(wk.expose()).expect("32-byte key");
    let mut nonce = [0u8; 12];
    rand::Rng::fill(&mut rand::rng(), &mut nonce[..]);
    let mut buf = Zeroizing::new([0u8; 32]);
    buf.copy_from_slice(data_key.expose());
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &wrap_aad(bound, &kek_id), &mut buf[..])
        .expect("32-byte message is within AES-GCM limits");
    let mut wrapped = [0u8; 48];
    wrapped[..32].copy_from_slice(&buf[..]);
    wrapped[32..].copy_from_slice(&tag);
    KeySlot::Used { kek_id, nonce, wrapped }
}

/// Unwraps the data key from a slot; `None` if the slot is empty, belongs to another
/// KEK, or fails authentication.
pub fn unwrap_data_key(kek: &SecretKey, bound: &[u8; BOUND_LEN], slot: &KeySlot) -> Option<SecretKey> {
    let KeySlot::Used { kek_id, nonce, wrapped } = slot else {
        return None;
    };
    if *kek_id != kek_id_bytes(kek) {
        return None;
    }
    let wk = kek.derive(WRAP_PURPOSE);
    let cipher = Aes256Gcm::new_from_slice(wk.expose()).ok()?;
    let mut buf = Zeroizing::new([0u8; 32]);
    buf.copy_from_slice(&wrapped[..32]);
    cipher
        .decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            &wrap_aad(bound, kek_id),
            &mut buf[..],
            aes_gcm::Tag::from_slice(&wrapped[32..]),
        )
        .ok()?;
    Some(SecretKey::from_bytes(*buf))
}

/// One file of the sealed object, as listed in the sealed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub len: u64,
    pub sha256: [u8; 32],
}

/// Checks a part name: a plain base name, no path separators.
pub fn validate_part_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.len() > u16::MAX as usize {
        return Err("empty or reserved part name".into());
    }
    if name.contains('/') || name.contains('\\') || name.chars().any(|c| c.is_control()) {
        return Err("part name contains a path separator or control character".into());
    }
    Ok(())
}

/// Length of the encoded manifest for these part names (independent of digests,
/// so the header can be written before the parts are hashed).
pub fn manifest_len<'a>(names: impl IntoIterator<Item = &'a str>) -> u64 {
    12 + names.into_iter().map(|n| 2 + n.len() as u64 + 8 + 32).sum::<u64>()
}

/// Encodes the manifest: magic ‖ u32 count ‖ (u16 name len ‖ name ‖ u64 len ‖ sha256)*.
pub fn encode_manifest(parts: &[Part]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(MANIFEST_MAGIC);
    m.extend_from_slice(&(parts.len() as u32).to_be_bytes());
    for p in parts {
        m.extend_from_slice(&(p.name.len() as u16).to_be_bytes());
        m.extend_from_slice(p.name.as_bytes());
        m.extend_from_slice(&p.len.to_be_bytes());
        m.extend_from_slice(&p.sha256);
    }
    m
}

/// Decodes and validates a manifest: exact length, valid unique names.
pub fn decode_manifest(m: &[u8]) -> Result<Vec<Part>, String> {
    fn take<'a>(m: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], String> {
        let s = m.get(*pos..*pos + n).ok_or("manifest truncated")?;
        *pos += n;
        Ok(s)
    }
    let mut pos = 0;
    if take(m, &mut pos, 8)? != MANIFEST_MAGIC {
        return Err("bad manifest magic".into());
    }
    let count = u32::from_be_bytes(take(m, &mut pos, 4)?.try_into().unwrap_or_default()) as usize;
    let mut parts: Vec<Part> = Vec::new();
    for _ in 0..count {
        let nlen = u16::from_be_bytes(take(m, &mut pos, 2)?.try_into().unwrap_or_default()) as usize;
        let name = std::str::from_utf8(take(m, &mut pos, nlen)?).map_err(|_| "part name is not UTF-8")?.to_string();
        validate_part_name(&name)?;
        if parts.iter().any(|p| p.name == name) {
            return Err("duplicate part name".into());
        }
        let len = u64::from_be_bytes(take(m, &mut pos, 8)?.try_into().unwrap_or_default());
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(take(m, &mut pos, 32)?);
        parts.push(Part { name, len, sha256 });
    }
    if pos != m.len() {
        return Err("trailing bytes after the manifest".into());
    }
    Ok(parts)
}

/// The weights fingerprint, identical for the sealed and plaintext forms:
/// * a GGUF (one part): hex SHA-256 of the file, as `sha256sum` prints it;
/// * a directory: hex SHA-256 of the `sha256sum`-style listing of its parts, sorted
///   by name: for each part, `<hex sha256>  <name>\n`.
pub fn fingerprint(kind: ObjectKind, parts: &[Part]) -> String {
    match (kind, parts) {
        (ObjectKind::Gguf, [only]) => hex::encode(only.sha256),
        _ => {
            let mut sorted: Vec<&Part> = parts.iter().collect();
            sorted.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
            let mut h = Sha256::new();
            for p in sorted {
                h.update(hex::encode(p.sha256).as_bytes());
                h.update(b"  ");
                h.update(p.name.as_bytes());
                h.update(b"\n");
            }
            hex::encode(h.finalize())
        }
    }
}

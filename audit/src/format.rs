//! Byte-level format of the trail (described in the module doc of `audit`):
//! keys, segment headers, record frames, sealed segments, RFC 6962 hashing.

use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::digest::{Context as Sha256Ctx, SHA256};
use subtle::ConstantTimeEq;

use super::event::TextHmac;
use salus_sensitive::secret::SecretKey;

pub(crate) const LOG_MAGIC: &[u8; 8] = b"SALAUDL1";
pub(crate) const SEALED_MAGIC: &[u8; 8] = b"SALAUDS1";
pub(crate) const FORMAT_VERSION: u16 = 1;
pub(crate) const LOG_HEADER_LEN: usize = 100;
const LOG_HEADER_BODY: usize = 68;
pub(crate) const SEALED_HEADER_LEN: usize = 192;
pub(crate) const FRAME_HEADER_LEN: usize = 24;
/// Upper bound on one encrypted record; larger length fields are corruption.
pub(crate) const MAX_FRAME: usize = 1 << 20;
const TAG_LEN: usize = 16;
const RECORD_AAD: &[u8] = b"salus-audit-record/v1";

/// The keys of one trail, all derived from the master key.
///
/// SHA-256, HMAC and AES-256-GCM on the per-record path use `ring` (assembly
/// with AES-NI/PCLMUL/AVX): about twice as fast as the portable
/// implementations on CPUs without SHA extensions, which is most of the
/// writer's per-record cost. `ring` keeps derived key schedules (HMAC pad
/// states, AES round keys) that it does not zeroize on drop; the raw keys
/// ([`SecretKey`]) are zeroized, and these schedules live only as long as the
/// log (or the open segment).
pub struct AuditKeys {
    enc: SecretKey,
    header: ring::hmac::Key,
    hmac: ring::hmac::Key,
    /// Authenticates `keys.recorded` (see `key_baseline.rs`).
    baseline: ring::hmac::Key,
    signing: ed25519_dalek::SigningKey,
    key_id: String,
}

/// The AES-256-GCM key of one segment.
pub(crate) type SegmentCipher = LessSafeKey;

impl AuditKeys {
    pub fn from_master(master: &SecretKey) -> Self {
        let seed = master.derive("audit-signing");
        AuditKeys {
            enc: master.derive("audit-enc"),
            header: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, master.derive("audit-header").expose()),
            hmac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, master.derive("audit-hmac").expose()),
            baseline: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, master.derive("audit-keys-recorded").expose()),
            signing: ed25519_dalek::SigningKey::from_bytes(seed.expose()),
            key_id: master.key_id(),
        }
    }

    /// The master key's public id (16 hex digits), stored in segment headers.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// `HMAC-SHA256(audit HMAC key, text)`: what the trail stores for a prompt
    /// or completion. Takes `Phi` so only protected text flows in.
    pub fn text_hmac<T: zeroize::Zeroize + AsRef<[u8]>>(&self, text: &salus_sensitive::Phi<T>) -> TextHmac {
        TextHmac::from_hex(self.hmac_hex(text.expose().as_ref()))
    }

    /// The same HMAC of raw bytes, in hex (for `salus audit hash`).
    pub fn hmac_hex(&self, text: &[u8]) -> String {
        let tag = ring::hmac::sign(&self.hmac, text);
        let mut out = [0u8; 64];
        hex_into(tag.as_ref(), &mut out);
        String::from_utf8(out.to_vec()).expect("hex is ASCII")
    }

    /// `HMAC-SHA256(audit-keys-recorded key, body)`: authenticates the key-store
    /// baseline file, so that it cannot be edited to hide a key.
    pub fn baseline_mac(&self, body: &[u8]) -> [u8; 32] {
        ring::hmac::sign(&self.baseline, body).as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }

    pub(crate) fn signing_key(&self) -> &ed25519_dalek::SigningKey {
        &self.signing
    }

    pub(crate) fn segment_cipher(&self, index: u64, salt: &[u8; 16]) -> SegmentCipher {
        let k = self.enc.derive(&format!("segment/{index}/{}", hex::encode(salt)));
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.expose()).expect("32-byte key"))
    }

    fn header_mac(&self, body: &[u8]) -> [u8; 32] {
        ring::hmac::sign(&self.header, body).as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
    }
}

/// Lower-case hex of `bytes` into `out` (`out.len() == 2 * bytes.len()`), no allocation.
pub(crate) fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
}

/// RFC 6962 leaf hash of a record: the record's chain hash.
pub(crate) fn leaf_hash(record: &[u8]) -> [u8; 32] {
    let mut h = Sha256Ctx::new(&SHA256);
    h.update(&[0u8]);
    h.update(record);
    h.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn node_hash(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256Ctx::new(&SHA256);
    h.update(&[1u8]);
    h.update(l);
    h.update(r);
    h.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// RFC 6962 Merkle tree hash over leaf hashes (SHA-256 of "" when empty).
pub(crate) fn merkle_root(leaves: &[[u8; 32]]) -> [u8; 32] {
    match leaves.len() {
        0 => ring::digest::digest(&SHA256, b"").as_ref().try_into().expect("SHA-256 is 32 bytes"),
        1 => leaves[0],
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros()); // largest power of two < n
            node_hash(&merkle_root(&leaves[..k]), &merkle_root(&leaves[k..]))
        }
    }
}

pub(crate) fn log_name(index: u64) -> String {
    format!("seg-{index:016}.log")
}
pub(crate) fn sealed_name(index: u64) -> String {
    format!("seg-{index:016}.sealed")
}
/// A segment being created: its header is written here, then linked to the `.log`.
pub(crate) fn log_tmp_name(index: u64) -> String {
    format!("seg-{index:016}.log.tmp")
}
/// A seal in progress: renamed to the `.sealed` when whole.
pub(crate) fn sealed_tmp_name(index: u64) -> String {
    format!("seg-{index:016}.sealed.tmp")
}

/// A segment file found in the audit directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SegFile {
    Log(u64),
    Sealed(u64),
    SealedTmp(u64),
    LogTmp(u64),
}

pub(crate) fn parse_name(name: &str) -> Option<SegFile> {
    let rest = name.strip_prefix("seg-")?;
    let (num, ext) = rest.split_once('.')?;
    if num.len() != 16 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index: u64 = num.parse().ok()?;
    match ext {
        "log" => Some(SegFile::Log(index)),
        "sealed" => Some(SegFile::Sealed(index)),
        "sealed.tmp" => Some(SegFile::SealedTmp(index)),
        "log.tmp" => Some(SegFile::LogTmp(index)),
        _ => None,
    }
}

/// All segment files of a directory, sorted by index.
pub(crate) fn list_segments(dir: &Path) -> std::io::Result<Vec<(SegFile, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seg) = entry.file_name().to_str().and_then(parse_name) {
            out.push((seg, entry.path()));
        }
    }
    out.sort_by_key(|(s, _)| match s {
        SegFile::Log(i) => (*i, 1),
        SegFile::Sealed(i) => (*i, 0),
        SegFile::SealedTmp(i) => (*i, 2),
        SegFile::LogTmp(i) => (*i, 3),
    });
    Ok(out)
}

/// Header of an open (`.log`) segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LogHeader {
    pub index: u64,
    pub first_seq: u64,
    pub created_ms: i64,
    pub salt: [u8; 16],
    pub key_id: [u8; 16],
}

impl LogHeader {
    pub fn encode(&self, keys: &AuditKeys) -> [u8; LOG_HEADER_LEN] {
        let mut b = [0u8; LOG_HEADER_LEN];
        b[0..8].copy_from_slice(LOG_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..28].copy_from_slice(&self.first_seq.to_le_bytes());
        b[28..36].copy_from_slice(&self.created_ms.to_le_bytes());
        b[36..52].copy_from_slice(&self.salt);
        b[52..68].copy_from_slice(&self.key_id);
        let mac = keys.header_mac(&b[..LOG_HEADER_BODY]);
        b[68..100].copy_from_slice(&mac);
        b
    }

    /// Parses and authenticates a header; the error is a short problem description.
    pub fn decode(b: &[u8], keys: &AuditKeys) -> Result<LogHeader, String> {
        if b.len() < LOG_HEADER_LEN {
            return Err(format!("header truncated ({} of {LOG_HEADER_LEN} bytes)", b.len()));
        }
        if &b[0..8] != LOG_MAGIC {
            return Err("bad magic (not an open audit segment)".into());
        }
        let key_id: [u8; 16] = b[52..68].try_into().unwrap();
        if key_id != key_id_bytes(keys) {
            return Err(format!("written with key id {}, not {}", String::from_utf8_lossy(&key_id), keys.key_id()));
        }
        let mac = keys.header_mac(&b[..LOG_HEADER_BODY]);
        if !bool::from(mac[..].ct_eq(&b[68..100])) {
            return Err("header authentication failed (modified header)".into());
        }
        let version = u16::from_le_bytes(b[8..10].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(format!("unsupported format version {version}"));
        }
        Ok(LogHeader {
            index: u64::from_le_bytes(b[12..20].try_into().unwrap()),
            first_seq: u64::from_le_bytes(b[20..28].try_into().unwrap()),
            created_ms: i64::from_le_bytes(b[28..36].try_into().unwrap()),
            salt: b[36..52].try_into().unwrap(),
            key_id,
        })
    }
}

pub(crate) fn key_id_bytes(keys: &AuditKeys) -> [u8; 16] {
    let mut out = [b'0'; 16];
    let id = keys.key_id().as_bytes();
    let n = id.len().min(16);
    out[..n].copy_from_slice(&id[..n]);
    out
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    b
}

fn record_aad(index: u64, seq: u64) -> [u8; 37] {
    let mut aad = [0u8; 37];
    aad[..21].copy_from_slice(RECORD_AAD);
    aad[21..29].copy_from_slice(&index.to_le_bytes());
    aad[29..37].copy_from_slice(&seq.to_le_bytes());
    aad
}

/// Starts a frame at the end of `out`: reserves its header and returns where
/// it starts. The caller appends the record's plaintext, then calls [`seal_frame`].
pub(crate) fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    start
}

/// Encrypts, in place, the record appended after the frame header at `start`,
/// appends the tag and fills in the header (`len | seq | nonce`).
pub(crate) fn seal_frame(cipher: &SegmentCipher, index: u64, seq: u64, out: &mut Vec<u8>, start: usize) {
    let nonce: [u8; 12] = random_bytes();
    let aad = record_aad(index, seq);
    let tag = cipher
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad),
            &mut out[start + FRAME_HEADER_LEN..],
        )
        .expect("AES-GCM encryption of a bounded buffer cannot fail");
    out.extend_from_slice(tag.as_ref());
    let ct_len = (out.len() - start - FRAME_HEADER_LEN) as u32;
    out[start..start + 4].copy_from_slice(&ct_len.to_le_bytes());
    out[start + 4..start + 12].copy_from_slice(&seq.to_le_bytes());
    out[start + 12..start + 24].copy_from_slice(&nonce);
}

/// Result of reading one frame at the start of `buf`.
pub(crate) enum Frame {
    /// A valid frame: its seq, the decrypted record, and its total length.
    Ok { seq: u64, record: Vec<u8>, len: usize },
    /// The frame runs past the end of the buffer.
    Incomplete,
    /// The length field is impossible.
    BadLength,
    /// Decryption/authentication failed; `len` is the length the frame claims.
    BadAuth { seq: u64, len: usize },
}

pub(crate) fn decode_frame(cipher: &SegmentCipher, index: u64, buf: &[u8]) -> Frame {
    if buf.len() < FRAME_HEADER_LEN {
        return Frame::Incomplete;
    }
    let ct_len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    if !(TAG_LEN..=MAX_FRAME).contains(&ct_len) {
        return Frame::BadLength;
    }
    let len = FRAME_HEADER_LEN + ct_len;
    if buf.len() < len {
        return Frame::Incomplete;
    }
    let seq = u64::from_le_bytes(buf[4..12].try_into().unwrap());
    let aad = record_aad(index, seq);
    let nonce = Nonce::try_assume_unique_for_key(&buf[12..24]).expect("12-byte nonce");
    let mut record = buf[24..len].to_vec();
    match cipher.open_in_place(nonce, Aad::from(&aad), &mut record) {
        Ok(plain) => {
            let n = plain.len();
            record.truncate(n);
            Frame::Ok { seq, record, len }
        }
        Err(_) => Frame::BadAuth { seq, len },
    }
}

/// Header of a sealed segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SealedHeader {
    pub index: u64,
    pub first_seq: u64,
    pub count: u64,
    pub created_ms: i64,
    pub sealed_ms: i64,
    pub prev_hash: [u8; 32],
    pub last_hash: [u8; 32],
    pub merkle_root: [u8; 32],
    pub salt: [u8; 16],
    pub key_id: [u8; 16],
    pub nonce: [u8; 12],
}

impl SealedHeader {
    pub fn encode(&self) -> [u8; SEALED_HEADER_LEN] {
        let mut b = [0u8; SEALED_HEADER_LEN];
        b[0..8].copy_from_slice(SEALED_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..28].copy_from_slice(&self.first_seq.to_le_bytes());
        b[28..36].copy_from_slice(&self.count.to_le_bytes());
        b[36..44].copy_from_slice(&self.created_ms.to_le_bytes());
        b[44..52].copy_from_slice(&self.sealed_ms.to_le_bytes());
        b[52..84].copy_from_slice(&self.prev_hash);
        b[84..116].copy_from_slice(&self.last_hash);
        b[116..148].copy_from_slice(&self.merkle_root);
        b[148..164].copy_from_slice(&self.salt);
        b[164..180].copy_from_slice(&self.key_id);
        b[180..192].copy_from_slice(&self.nonce);
        b
    }

    /// Parses (not yet authenticated: that happens when the body decrypts).
    pub fn decode(b: &[u8]) -> Result<SealedHeader, String> {
        if b.len() < SEALED_HEADER_LEN {
            return Err(format!("header truncated ({} of {SEALED_HEADER_LEN} bytes)", b.len()));
        }
        if &b[0..8] != SEALED_MAGIC {
            return Err("bad magic (not a sealed audit segment)".into());
        }
        let version = u16::from_le_bytes(b[8..10].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(format!("unsupported format version {version}"));
        }
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap());
        Ok(SealedHeader {
            index: u(12..20),
            first_seq: u(20..28),
            count: u(28..36),
            created_ms: u(36..44) as i64,
            sealed_ms: u(44..52) as i64,
            prev_hash: b[52..84].try_into().unwrap(),
            last_hash: b[84..116].try_into().unwrap(),
            merkle_root: b[116..148].try_into().unwrap(),
            salt: b[148..164].try_into().unwrap(),
            key_id: b[164..180].try_into().unwrap(),
            nonce: b[180..192].try_into().unwrap(),
        })
    }
}

/// Builds a sealed segment file's bytes from its records.
pub(crate) fn encode_sealed(keys: &AuditKeys, mut header: SealedHeader, records: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::with_capacity(records.iter().map(|r| r.len() + 4).sum());
    for r in records {
        body.extend_from_slice(&(r.len() as u32).to_le_bytes());
        body.extend_from_slice(r);
    }
    let compressed = zstd::bulk::compress(&body, 3).expect("zstd compression of an in-memory buffer");
    header.salt = random_bytes();
    header.nonce = random_bytes();
    header.key_id = key_id_bytes(keys);
    let hb = header.encode();
    let cipher = keys.segment_cipher(header.index, &header.salt);
    let mut out = Vec::with_capacity(SEALED_HEADER_LEN + compressed.len() + TAG_LEN);
    out.extend_from_slice(&hb);
    out.extend_from_slice(&compressed);
    let tag = cipher
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(header.nonce),
            Aad::from(&hb),
            &mut out[SEALED_HEADER_LEN..],
        )
        .expect("AES-GCM encryption of a bounded buffer cannot fail");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Decrypts and splits a sealed segment. Checks authenticity, the record count
/// and the Merkle root; returns the header and the records.
pub(crate) fn decode_sealed(keys: &AuditKeys, bytes: &[u8]) -> Result<(SealedHeader, Vec<Vec<u8>>), String> {
    let header = SealedHeader::decode(bytes)?;
    if header.key_id != key_id_bytes(keys) {
        return Err(format!("written with key id {}, not {}", String::from_utf8_lossy(&header.key_id), keys.key_id()));
    }
    let cipher = keys.segment_cipher(header.index, &header.salt);
    let mut compressed = bytes[SEALED_HEADER_LEN..].to_vec();
    let plain_len = cipher
        .open_in_place(
            Nonce::assume_unique_for_key(header.nonce),
            Aad::from(&bytes[..SEALED_HEADER_LEN]),
            &mut compressed,
        )
        .map_err(|_| "authentication failed (modified or truncated sealed segment)".to_string())?
        .len();
    compressed.truncate(plain_len);
    let limit = (header.count as usize).saturating_mul(MAX_FRAME + 4).min(1 << 34);
    let body =
        zstd::bulk::decompress(&compressed, limit.max(1 << 20)).map_err(|e| format!("decompression failed: {e}"))?;
    let mut records = Vec::with_capacity(header.count as usize);
    let mut pos = 0;
    while pos < body.len() {
        if body.len() - pos < 4 {
            return Err("body framing truncated".into());
        }
        let n = u32::from_le_bytes(body[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 4;
        if body.len() - pos < n {
            return Err("body framing truncated".into());
        }
        records.push(body[pos..pos + n].to_vec());
        pos += n;
    }
    if records.len() as u64 != header.count {
        return Err(format!("header says {} records, body holds {}", header.count, records.len()));
    }
    let leaves: Vec<[u8; 32]> = records.iter().map(|r| leaf_hash(r)).collect();
    if merkle_root(&leaves) != header.merkle_root {
        return Err("Merkle root does not match the records".into());
    }
    Ok((header, records))
}

/// `fsync` on a directory, so that creations, renames and deletions are durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

pub(crate) fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formatting the current UTC time")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merkle_matches_rfc6962_shape() {
        let l: Vec<[u8; 32]> = (0u8..5).map(|i| leaf_hash(&[i])).collect();
        // 5 leaves: k = 4 → node(node(node(0,1),node(2,3)), 4)
        let expect = node_hash(&node_hash(&node_hash(&l[0], &l[1]), &node_hash(&l[2], &l[3])), &l[4]);
        assert_eq!(merkle_root(&l), expect);
        assert_eq!(merkle_root(&l[..1]), l[0]);
        assert_eq!(hex::encode(merkle_root(&[])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_name(&log_name(7)), Some(SegFile::Log(7)));
        assert_eq!(parse_name(&sealed_name(12)), Some(SegFile::Sealed(12)));
        assert_eq!(parse_name("seg-12.log"), None);
        assert_eq!(parse_name("checkpoint.json"), None);
    }
}

//! Envelope encryption of backup objects (format in the crate docs).
//!
//! Each `salus backup create` run draws one random data key (DEK). Every
//! object it uploads is AES-256-GCM under that DEK with a fresh random nonce,
//! and carries the DEK wrapped under the backup key (the key-encryption key,
//! KEK) in its header, so an object is readable on its own (an interrupted
//! run's objects are reused by the next one). The manifest lists the wraps of
//! every DEK its objects use, under the current backup key: rotating the
//! backup key rewraps DEKs in the next manifest and never rewrites an object
//! (objects are immutable, e.g. under S3 Object Lock).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use salus_sensitive::secret::SecretKey;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub(crate) const OBJECT_MAGIC: &[u8; 8] = b"SALBAKO1";
pub(crate) const OBJECT_VERSION: u16 = 1;
pub(crate) const OBJECT_HEADER_LEN: usize = 124;
pub(crate) const TAG_LEN: usize = 16;
/// Purpose string deriving the wrapping key from the backup key.
pub(crate) const WRAP_PURPOSE: &str = "salus-backup-wrap/v1";
const WRAP_AAD_LABEL: &[u8] = b"salus-backup/v1 key-wrap";
const WRAPPED_LEN: usize = 32 + TAG_LEN;

/// SHA-256, hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::Rng::fill(&mut rand::rng(), &mut b[..]);
    b
}

fn id_bytes(id: &str) -> Result<[u8; 16], String> {
    <[u8; 16]>::try_from(id.as_bytes()).map_err(|_| format!("key id '{id}' is not 16 characters"))
}

fn cipher(key: &SecretKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose()).expect("32-byte key"))
}

/// A data key wrapped under a backup key, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    /// The data key's id ([`SecretKey::key_id`]).
    pub id: String,
    /// The id of the backup key it is wrapped under.
    pub kek_id: String,
    /// Hex AES-GCM nonce of the wrap.
    pub nonce: String,
    /// Hex AES-256-GCM(wrapping key, data key) with its tag (48 bytes).
    pub wrapped: String,
}

fn wrap_aad(dek_id: &str, kek_id: &str) -> Vec<u8> {
    [WRAP_AAD_LABEL, dek_id.as_bytes(), kek_id.as_bytes()].concat()
}

/// Wraps `dek` under `kek` (via the derived wrapping key).
pub(crate) fn wrap(dek: &SecretKey, kek: &SecretKey) -> WrappedKey {
    let (dek_id, kek_id) = (dek.key_id(), kek.key_id());
    let nonce: [u8; 12] = random();
    let mut buf = dek.expose().to_vec();
    let tag = cipher(&kek.derive(WRAP_PURPOSE))
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(wrap_aad(&dek_id, &kek_id)),
            &mut buf,
        )
        .expect("AES-GCM of 32 bytes");
    buf.extend_from_slice(tag.as_ref());
    WrappedKey { id: dek_id, kek_id, nonce: hex::encode(nonce), wrapped: hex::encode(buf) }
}

/// Unwraps a data key; checks it is the key its id names.
pub(crate) fn unwrap(w: &WrappedKey, kek: &SecretKey) -> Result<SecretKey, String> {
    if w.kek_id != kek.key_id() {
        return Err(format!("wrapped under backup key id {}, not {}", w.kek_id, kek.key_id()));
    }
    let nonce: [u8; 12] =
        hex::decode(&w.nonce).ok().and_then(|v| v.try_into().ok()).ok_or("wrap nonce is not 12 bytes of hex")?;
    let mut buf = Zeroizing::new(hex::decode(&w.wrapped).map_err(|_| "wrapped key is not hex")?);
    if buf.len() != WRAPPED_LEN {
        return Err("wrapped key is not 48 bytes".into());
    }
    let plain = cipher(&kek.derive(WRAP_PURPOSE))
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(wrap_aad(&w.id, &w.kek_id)), &mut buf[..])
        .map_err(|_| "data key does not unwrap (modified, or another backup key)".to_string())?;
    let key = SecretKey::from_bytes(plain[..32].try_into().expect("32 bytes"));
    if key.key_id() != w.id {
        return Err("unwrapped data key does not match its id".into());
    }
    Ok(key)
}

/// The header of a stored object (before its ciphertext).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ObjectHeader {
    /// The wrap of the data key that encrypts the object (under the backup
    /// key current when it was written).
    pub key: WrappedKey,
    pub nonce: [u8; 12],
    pub plain_len: u64,
}

impl ObjectHeader {
    fn encode(&self) -> Result<[u8; OBJECT_HEADER_LEN], String> {
        let mut b = [0u8; OBJECT_HEADER_LEN];
        b[0..8].copy_from_slice(OBJECT_MAGIC);
        b[8..10].copy_from_slice(&OBJECT_VERSION.to_le_bytes());
        b[12..28].copy_from_slice(&id_bytes(&self.key.id)?);
        b[28..44].copy_from_slice(&id_bytes(&self.key.kek_id)?);
        let wn = hex::decode(&self.key.nonce).map_err(|_| "bad wrap nonce")?;
        let ww = hex::decode(&self.key.wrapped).map_err(|_| "bad wrapped key")?;
        if wn.len() != 12 || ww.len() != WRAPPED_LEN {
            return Err("bad key wrap".into());
        }
        b[44..56].copy_from_slice(&wn);
        b[56..104].copy_from_slice(&ww);
        b[104..116].copy_from_slice(&self.nonce);
        b[116..124].copy_from_slice(&self.plain_len.to_le_bytes());
        Ok(b)
    }

    /// Parses the header of a stored object (authenticated only when the body decrypts).
    pub(crate) fn decode(b: &[u8]) -> Result<ObjectHeader, String> {
        if b.len() < OBJECT_HEADER_LEN + TAG_LEN {
            return Err(format!("truncated ({} bytes)", b.len()));
        }
        if &b[0..8] != OBJECT_MAGIC {
            return Err("not a backup object (bad magic)".into());
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != OBJECT_VERSION || b[10..12] != [0, 0] {
            return Err(format!("unsupported object format version {version}"));
        }
        let text = |r: std::ops::Range<usize>| {
            std::str::from_utf8(&b[r]).map(str::to_string).map_err(|_| "key id is not ASCII".to_string())
        };
        Ok(ObjectHeader {
            key: WrappedKey {
                id: text(12..28)?,
                kek_id: text(28..44)?,
                nonce: hex::encode(&b[44..56]),
                wrapped: hex::encode(&b[56..104]),
            },
            nonce: b[104..116].try_into().expect("12 bytes"),
            plain_len: u64::from_le_bytes(b[116..124].try_into().expect("8 bytes")),
        })
    }
}

/// The data key of one `create` run, with its wrap under the backup key.
pub(crate) struct DataKey {
    pub key: SecretKey,
    pub wrap: WrappedKey,
}

impl DataKey {
    pub(crate) fn generate(kek: &SecretKey) -> DataKey {
        let key = SecretKey::generate();
        let wrap = wrap(&key, kek);
        DataKey { key, wrap }
    }
}

/// Encrypts `plain` into a stored object (header ‖ ciphertext ‖ tag).
pub(crate) fn seal_object(dek: &DataKey, plain: &[u8]) -> Vec<u8> {
    let header = ObjectHeader { key: dek.wrap.clone(), nonce: random(), plain_len: plain.len() as u64 };
    let hb = header.encode().expect("a wrap made by this crate encodes");
    let mut out = Vec::with_capacity(OBJECT_HEADER_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&hb);
    out.extend_from_slice(plain);
    let tag = cipher(&dek.key)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(header.nonce),
            Aad::from(&hb[..]),
            &mut out[OBJECT_HEADER_LEN..],
        )
        .expect("AES-GCM of an in-memory buffer");
    out.extend_from_slice(tag.as_ref());
    out
}

/// Decrypts a stored object with its data key (`stored` is consumed: the
/// plaintext is decrypted in place).
pub(crate) fn open_object(dek: &SecretKey, mut stored: Vec<u8>) -> Result<Vec<u8>, String> {
    let header = ObjectHeader::decode(&stored)?;
    if header.key.id != dek.key_id() {
        return Err(format!("encrypted under data key {}, not {}", header.key.id, dek.key_id()));
    }
    if stored.len() as u64 != OBJECT_HEADER_LEN as u64 + header.plain_len + TAG_LEN as u64 {
        return Err(format!(
            "length {} does not match the header's plaintext length {}",
            stored.len(),
            header.plain_len
        ));
    }
    let hb: [u8; OBJECT_HEADER_LEN] = stored[..OBJECT_HEADER_LEN].try_into().expect("header length");
    let n = cipher(dek)
        .open_in_place(Nonce::assume_unique_for_key(header.nonce), Aad::from(&hb[..]), &mut stored[OBJECT_HEADER_LEN..])
        .map_err(|_| "authentication failed (modified or truncated object)".to_string())?
        .len();
    stored.copy_within(OBJECT_HEADER_LEN..OBJECT_HEADER_LEN + n, 0);
    stored.truncate(n);
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_fail_on_any_flipped_byte() {
        let kek = SecretKey::generate();
        let dek = DataKey::generate(&kek);
        let plain = b"sealed segment bytes".repeat(100);
        let stored = seal_object(&dek, &plain);
        let header = ObjectHeader::decode(&stored).unwrap();
        let key = unwrap(&header.key, &kek).unwrap();
        assert_eq!(open_object(&key, stored.clone()).unwrap(), plain);
        for at in [0, 13, 50, 110, 120, OBJECT_HEADER_LEN + 3, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[at] ^= 0x10;
            let r = ObjectHeader::decode(&bad).and_then(|h| unwrap(&h.key, &kek)).and_then(|k| open_object(&k, bad));
            assert!(r.is_err(), "flipped byte {at} went unnoticed");
        }
        assert!(unwrap(&dek.wrap, &SecretKey::generate()).is_err());
    }
}

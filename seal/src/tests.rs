//! Tests of the sealed format: round trips, tampering, rewrap, memory, hub pull.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::format::{self, HEADER_LEN, TAG_LEN};
use super::reader::{rewrap_with_fault, RewrapFault};
use super::*;
use salus_sensitive::secret::{write_new_key_file, KeySource, SecretKey};

struct Fixture {
    dir: tempfile::TempDir,
    kek: SecretKey,
    kek_src: KeySource,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("kek");
    let kek = write_new_key_file(&p).unwrap();
    Fixture { kek_src: KeySource::File(p), kek, dir }
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A second key, written to its own file.
    fn other_key(&self, name: &str) -> (SecretKey, KeySource) {
        let p = self.path(name);
        (write_new_key_file(&p).unwrap(), KeySource::File(p))
    }
}

fn random_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed as u32).to_le_bytes()[2]).collect()
}

/// Seals `parts` with the streaming writer (feeding in uneven pieces).
fn seal_parts(out: &Path, kek: &SecretKey, kind: ObjectKind, parts: &[(&str, Vec<u8>)], cs: u32) -> SealSummary {
    let specs = parts.iter().map(|(n, d)| PartSpec { name: n.to_string(), len: d.len() as u64 }).collect();
    let mut w = SealWriter::create(out, kek, kind, "test-model", specs, cs).unwrap();
    for (_, d) in parts {
        for piece in d.chunks(7) {
            w.write(piece).unwrap();
        }
        w.end_part(Some(Sha256::digest(d).into())).unwrap();
    }
    w.finish().unwrap()
}

fn sha_hex(d: &[u8]) -> String {
    hex::encode(Sha256::digest(d))
}

#[test]
fn round_trip_at_chunk_boundaries() {
    let fx = fixture();
    let cs = 64u32;
    // The stream is the part followed by a 60-byte manifest for the name "m.gguf".
    assert_eq!(format::manifest_len(["m.gguf"]), 60);
    for (i, size) in [0usize, 1, 4, 5, 63, 64, 65, 128, 1000].into_iter().enumerate() {
        let data = random_bytes(size, i as u8);
        let out = fx.path(&format!("m{size}.sealed"));
        let summary = seal_parts(&out, &fx.kek, ObjectKind::Gguf, &[("m.gguf", data.clone())], cs);
        assert_eq!(summary.fingerprint, sha_hex(&data), "size {size}");
        let info = inspect(&out).unwrap();
        assert_eq!(info.plaintext_len, size as u64 + 60);
        assert_eq!(info.chunk_count, ((size as u64 + 60).div_ceil(cs as u64)).max(1));
        assert_eq!(
            std::fs::metadata(&out).unwrap().len(),
            HEADER_LEN as u64 + info.plaintext_len + 16 * info.chunk_count
        );
        let loaded = load_model(&out, Some(&fx.kek_src), false).unwrap();
        assert!(loaded.sealed);
        assert_eq!(loaded.fingerprint, sha_hex(&data));
        assert_eq!(loaded.source.name, "test-model");
        assert_eq!(loaded.source.get("m.gguf").unwrap().as_slice(), &data[..], "size {size}");
        assert_eq!(loaded.source.files().count(), 1);
        let report = verify(&out, &fx.kek_src, &|_| {}).unwrap();
        assert_eq!(report.fingerprint, sha_hex(&data));
    }
}

#[test]
fn empty_stream_edge_cases_of_the_header() {
    let h = format::Header {
        kind: ObjectKind::Gguf,
        chunk_size: 16,
        plaintext_len: 0,
        manifest_len: 0,
        nonce_prefix: [1; 7],
        name: "x".into(),
    };
    assert_eq!(h.chunk_count(), 1);
    assert_eq!(h.chunk_range(0), (0, 0));
    let h2 = format::Header { plaintext_len: 33, ..h.clone() };
    assert_eq!(h2.chunk_count(), 3);
    assert_eq!(h2.chunk_range(2), (32, 1));
    let enc = h2.encode().unwrap();
    assert_eq!(format::Header::decode(&enc).unwrap(), h2);
    assert_eq!(format::chunk_nonce(&[9; 7], 0x01020304, true), [9, 9, 9, 9, 9, 9, 9, 1, 2, 3, 4, 1]);
}

fn write_model_dir(root: &Path) -> PathBuf {
    let d = root.join("tiny-llama");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("config.json"), br#"{"hidden_size":8}"#).unwrap();
    std::fs::write(d.join("tokenizer.json"), b"{}").unwrap();
    std::fs::write(d.join("model-00001-of-00002.safetensors"), random_bytes(300, 1)).unwrap();
    std::fs::write(d.join("model-00002-of-00002.safetensors"), random_bytes(77, 2)).unwrap();
    std::fs::write(d.join("README.md"), b"not sealed").unwrap();
    std::fs::write(d.join(".hidden.json"), b"not sealed").unwrap();
    d
}

#[test]
fn directory_and_gguf_fingerprints_match_plaintext_form() {
    let fx = fixture();
    let dir = write_model_dir(fx.dir.path());
    let out = fx.path("dir.sealed");
    let summary = seal_path(&dir, &out, &fx.kek, None, 64, &|_| {}).unwrap();
    assert_eq!(summary.kind, ObjectKind::Directory);
    assert_eq!(summary.parts.len(), 4, "README.md and hidden files are not model files");
    let sealed = load_model(&out, Some(&fx.kek_src), false).unwrap();
    let plain = load_model(&dir, None, true).unwrap();
    assert!(!plain.sealed);
    assert_eq!(sealed.fingerprint, plain.fingerprint);
    assert_eq!(sealed.fingerprint, summary.fingerprint);
    // Definition: SHA-256 of the sorted `sha256sum` listing.
    let mut names: Vec<_> = summary.parts.iter().map(|p| p.name.clone()).collect();
    names.sort();
    let listing: String =
        names.iter().map(|n| format!("{}  {n}\n", sha_hex(&std::fs::read(dir.join(n)).unwrap()))).collect();
    assert_eq!(sealed.fingerprint, sha_hex(listing.as_bytes()));
    for (name, bytes) in plain.source.files() {
        assert_eq!(sealed.source.get(name).unwrap().as_slice(), bytes.as_slice(), "{name}");
    }
    assert!(sealed.source.get("README.md").is_none());

    let gguf = fx.path("tiny.Q4.gguf");
    let mut g = b"GGUF".to_vec();
    g.extend(random_bytes(5000, 3));
    std::fs::write(&gguf, &g).unwrap();
    let out = fx.path("tiny.sealed");
    let s = seal_path(&gguf, &out, &fx.kek, None, 1024, &|_| {}).unwrap();
    assert_eq!((s.kind, s.name.as_str()), (ObjectKind::Gguf, "tiny.Q4"));
    let sealed = load_model(&out, Some(&fx.kek_src), false).unwrap();
    let plain = load_model(&gguf, None, true).unwrap();
    assert_eq!(sealed.fingerprint, sha_hex(&g));
    assert_eq!(plain.fingerprint, sha_hex(&g));
    assert_eq!(sealed.source.gguf().unwrap().1.as_slice(), &g[..]);
}

#[test]
fn plaintext_refused_unless_allowed_and_sealed_needs_a_kek() {
    let fx = fixture();
    let gguf = fx.path("p.gguf");
    std::fs::write(&gguf, b"GGUF0000").unwrap();
    let e = load_model(&gguf, Some(&fx.kek_src), false).unwrap_err();
    assert!(matches!(e, SealError::PlaintextRefused { .. }), "{e}");
    assert!(e.to_string().contains("p.gguf") && e.to_string().contains("allow_plaintext_weights"));
    let out = fx.path("p.sealed");
    seal_path(&gguf, &out, &fx.kek, None, 64, &|_| {}).unwrap();
    assert!(matches!(load_model(&out, None, true), Err(SealError::NoKek { .. })));
    // Not a GGUF, not a directory.
    let junk = fx.path("junk.bin");
    std::fs::write(&junk, b"hello").unwrap();
    assert!(matches!(seal_path(&junk, &fx.path("j.sealed"), &fx.kek, None, 64, &|_| {}), Err(SealError::Input { .. })));
    // Refuses to overwrite.
    assert!(matches!(seal_path(&gguf, &out, &fx.kek, None, 64, &|_| {}), Err(SealError::Input { .. })));
}

/// A sealed GGUF with several full chunks; returns (path, bytes).
fn sealed_sample(fx: &Fixture) -> (PathBuf, Vec<u8>) {
    let out = fx.path("sample.sealed");
    seal_parts(&out, &fx.kek, ObjectKind::Gguf, &[("m.gguf", random_bytes(100, 9))], 32);
    let bytes = std::fs::read(&out).unwrap();
    (out, bytes)
}

fn load_err(path: &Path, bytes: &[u8], src: &KeySource) -> SealError {
    std::fs::write(path, bytes).unwrap();
    let e = load_model(path, Some(src), false).expect_err("tampered file must not load");
    assert!(e.to_string().contains(&path.display().to_string()), "error must name the file: {e}");
    e
}

#[test]
fn wrong_key_and_foreign_kek_id_are_refused() {
    let fx = fixture();
    let (path, bytes) = sealed_sample(&fx);
    let (other, other_src) = fx.other_key("other-kek");
    let e = load_err(&path, &bytes, &other_src);
    match &e {
        SealError::WrongKek { sealed_under, given, .. } => {
            assert_eq!(sealed_under, &fx.kek.key_id());
            assert_eq!(given, &other.key_id());
        }
        e => panic!("expected WrongKek, got {e}"),
    }
    // Forge the slot's KEK id to the other key's id: the unwrap must still fail.
    let mut forged = bytes.clone();
    forged[format::SLOT_OFFSETS[0] + 1..format::SLOT_OFFSETS[0] + 9].copy_from_slice(&format::kek_id_bytes(&other));
    assert!(matches!(load_err(&path, &forged, &other_src), SealError::KeyUnwrap { .. }));
    assert!(verify(&path, &other_src, &|_| {}).is_err());
}

#[test]
fn every_flipped_header_bit_is_detected() {
    let fx = fixture();
    let (path, bytes) = sealed_sample(&fx);
    for i in 0..HEADER_LEN {
        let mut t = bytes.clone();
        t[i] ^= 1 << (i % 8);
        std::fs::write(&path, &t).unwrap();
        let r = load_model(&path, Some(&fx.kek_src), false);
        assert!(r.is_err(), "flipped bit in header byte {i} went unnoticed");
    }
}

#[test]
fn every_flipped_payload_bit_is_detected_with_its_chunk() {
    let fx = fixture();
    let (path, bytes) = sealed_sample(&fx);
    let per_chunk = 32 + TAG_LEN;
    for i in HEADER_LEN..bytes.len() {
        let mut t = bytes.clone();
        t[i] ^= 0x80 >> (i % 8);
        match load_err(&path, &t, &fx.kek_src) {
            SealError::ChunkAuth { chunk, chunks, .. } => {
                assert_eq!(chunk as usize, (i - HEADER_LEN) / per_chunk);
                assert_eq!(chunks, 5);
            }
            e => panic!("byte {i}: expected ChunkAuth, got {e}"),
        }
    }
}

#[test]
fn truncation_garbage_swaps_and_duplicates_are_detected() {
    let fx = fixture();
    let (path, bytes) = sealed_sample(&fx);
    let per_chunk = 32 + TAG_LEN;
    // Truncated anywhere: inside the header, at and between chunk boundaries.
    for len in (0..bytes.len()).rev() {
        let e = load_err(&path, &bytes[..len], &fx.kek_src);
        if len >= 8 {
            assert!(matches!(e, SealError::Length { .. }), "len {len}: {e}");
        }
    }
    // Appended garbage.
    let mut g = bytes.clone();
    g.extend_from_slice(b"garbage");
    assert!(matches!(load_err(&path, &g, &fx.kek_src), SealError::Length { .. }));
    let chunk = |t: &[u8], i: usize| t[HEADER_LEN + i * per_chunk..HEADER_LEN + (i + 1) * per_chunk].to_vec();
    let put = |t: &mut Vec<u8>, i: usize, c: &[u8]| {
        t[HEADER_LEN + i * per_chunk..HEADER_LEN + (i + 1) * per_chunk].copy_from_slice(c)
    };
    // Swapped chunks 1 and 2.
    let mut s = bytes.clone();
    let (c1, c2) = (chunk(&bytes, 1), chunk(&bytes, 2));
    put(&mut s, 1, &c2);
    put(&mut s, 2, &c1);
    let e = load_err(&path, &s, &fx.kek_src);
    assert!(matches!(e, SealError::ChunkAuth { chunk: 1, .. }), "swapped chunks: {e}");
    // Chunk 0 duplicated over chunk 1.
    let mut d = bytes.clone();
    put(&mut d, 1, &chunk(&bytes, 0));
    let e = load_err(&path, &d, &fx.kek_src);
    assert!(matches!(e, SealError::ChunkAuth { chunk: 1, .. }), "duplicated chunk: {e}");
    // Chunk 1 duplicated by insertion, header length fixed up: the header is bound
    // into every chunk, so the new length breaks them all.
    let mut ins = bytes[..HEADER_LEN + 2 * per_chunk].to_vec();
    ins.extend_from_slice(&chunk(&bytes, 1));
    ins.extend_from_slice(&bytes[HEADER_LEN + 2 * per_chunk..]);
    let old_len = u64::from_be_bytes(ins[20..28].try_into().unwrap());
    ins[20..28].copy_from_slice(&(old_len + 32).to_be_bytes());
    assert!(load_err(&path, &ins, &fx.kek_src).to_string().contains("sample.sealed"));
    // The final chunk dropped and the header's length fixed up: refused.
    let mut short = bytes[..bytes.len() - per_chunk].to_vec();
    short[20..28].copy_from_slice(&128u64.to_be_bytes());
    load_err(&path, &short, &fx.kek_src);
    // And the pristine file still loads.
    std::fs::write(&path, &bytes).unwrap();
    load_model(&path, Some(&fx.kek_src), false).unwrap();
}

#[test]
fn verify_checks_every_chunk_without_loading() {
    let fx = fixture();
    let (path, bytes) = sealed_sample(&fx);
    let seen = std::cell::Cell::new(0u64);
    let r = verify(&path, &fx.kek_src, &|n| seen.set(seen.get() + n)).unwrap();
    assert_eq!(seen.get(), 160, "progress covers the whole stream");
    assert_eq!(r.chunks, 5);
    assert_eq!(r.fingerprint, sha_hex(&random_bytes(100, 9)));
    let mut t = bytes.clone();
    t[HEADER_LEN + 50] ^= 4;
    std::fs::write(&path, &t).unwrap();
    assert!(matches!(verify(&path, &fx.kek_src, &|_| {}), Err(SealError::ChunkAuth { chunk: 1, .. })));
}

#[test]
fn rewrap_rotates_the_key_without_touching_the_payload() {
    let fx = fixture();
    let (path, before) = sealed_sample(&fx);
    let (new, new_src) = fx.other_key("new-kek");
    rewrap(&path, &fx.kek, &new).unwrap();
    let after = std::fs::read(&path).unwrap();
    assert_eq!(&before[..format::BOUND_LEN], &after[..format::BOUND_LEN], "bound header unchanged");
    assert_eq!(&before[HEADER_LEN..], &after[HEADER_LEN..], "payload unchanged");
    assert_eq!(inspect(&path).unwrap().kek_ids, vec![new.key_id()]);
    load_model(&path, Some(&new_src), false).unwrap();
    assert!(matches!(load_model(&path, Some(&fx.kek_src), false), Err(SealError::WrongKek { .. })));
    // Wrong `from` key: refused, file untouched.
    assert!(rewrap(&path, &fx.kek, &new).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), after);
}

#[test]
fn interrupted_rewrap_leaves_the_original_readable() {
    let fx = fixture();
    let (path, _) = sealed_sample(&fx);
    let (new, new_src) = fx.other_key("new-kek");
    let orig = std::fs::read(&path).unwrap();
    let e = rewrap_with_fault(&path, &fx.kek, &new, RewrapFault::TornNewSlot).unwrap_err();
    assert!(matches!(e, SealError::Interrupted { .. }));
    // Torn write: the half-written slot fails to unwrap; the old slot is intact.
    let torn = std::fs::read(&path).unwrap();
    assert_ne!(torn, orig, "the fault hook must really have written half a slot");
    let s0 = format::SLOT_OFFSETS[0];
    assert_eq!(&torn[s0..s0 + format::SLOT_LEN], &orig[s0..s0 + format::SLOT_LEN]);
    assert_eq!(&torn[HEADER_LEN..], &orig[HEADER_LEN..]);
    load_model(&path, Some(&fx.kek_src), false).unwrap();
    assert!(load_model(&path, Some(&new_src), false).is_err());
    // Rerunning the rewrap recovers.
    rewrap(&path, &fx.kek, &new).unwrap();
    load_model(&path, Some(&new_src), false).unwrap();

    // Interrupted after the new slot is durable: both keys work; rerun finishes.
    let p3 = fx.path("third.sealed");
    seal_parts(&p3, &fx.kek, ObjectKind::Gguf, &[("m.gguf", random_bytes(70, 2))], 32);
    rewrap_with_fault(&p3, &fx.kek, &new, RewrapFault::BeforeClearingOldSlot).unwrap_err();
    load_model(&p3, Some(&fx.kek_src), false).unwrap();
    load_model(&p3, Some(&new_src), false).unwrap();
    assert_eq!(inspect(&p3).unwrap().kek_ids.len(), 2);
    rewrap(&p3, &fx.kek, &new).unwrap();
    assert!(load_model(&p3, Some(&fx.kek_src), false).is_err());
    load_model(&p3, Some(&new_src), false).unwrap();
}

#[test]
fn locked_buffer_is_zeroed_usable_and_a_weight_buffer() {
    let mut b = LockedBuffer::new(10_000).unwrap();
    assert!(b.as_slice().iter().all(|&x| x == 0));
    b.as_mut_slice()[9_999] = 7;
    let shared = std::sync::Arc::new(b);
    let w = salus_models::WeightBytes::new(LockedSlice::new(shared.clone(), 9_990..10_000));
    assert_eq!(w.len(), 10);
    assert_eq!(w.as_slice()[9], 7);
    assert!(LockedBuffer::new(0).unwrap().is_empty());
    // An out-of-range slice is clamped to empty rather than panicking.
    assert_eq!(salus_models::WeightBytes::new(LockedSlice::new(shared, 5..20_000)).len(), 0);
}

#[test]
fn harden_process_disables_dumps_in_a_child() {
    if std::env::var_os("SALUS_SEAL_HARDEN_CHILD").is_some() {
        harden_process().unwrap();
        let (dumpable, core) = process_hardening_state();
        assert!(!dumpable);
        assert_eq!(core, 0);
        return;
    }
    // Run in a child process so the test binary itself stays dumpable.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tests::harden_process_disables_dumps_in_a_child", "--test-threads=1"])
        .env("SALUS_SEAL_HARDEN_CHILD", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
    // The filter must have matched this test (a renamed module would run none).
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "the child ran no test");
    assert!(process_hardening_state().0, "parent must be unaffected");
}

//! The harness' canaries and the scanner that looks for them, in every form
//! they could take (raw, lowercase, hex, base64 at every alignment), and the
//! collection of everything the server produced.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("read /dev/urandom");
    b
}

pub fn hex(bytes: &[u8], upper: bool) -> String {
    let digits: &[u8; 16] = if upper { b"0123456789ABCDEF" } else { b"0123456789abcdef" };
    bytes.iter().flat_map(|b| [digits[(b >> 4) as usize] as char, digits[(b & 15) as usize] as char]).collect()
}

/// Base64 without padding (`url`: the URL-safe alphabet).
pub fn base64(bytes: &[u8], url: bool) -> String {
    let alphabet: &[u8] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The canaries of one run and the byte patterns that betray them.
pub struct Canaries {
    /// (injection point, canary)
    pub list: Vec<(String, String)>,
    /// Canaries that belong in the decrypted audit records (a signed-in
    /// user's display name, an accepted break-glass reason) and nowhere else.
    pub audit_only: Vec<usize>,
}

impl Canaries {
    pub fn new() -> Self {
        Canaries { list: Vec::new(), audit_only: Vec::new() }
    }

    /// A canary that must appear in the decrypted audit records, and nowhere else.
    pub fn mint_audit_only(&mut self, point: &str) -> String {
        let c = self.mint(point);
        self.audit_only.push(self.list.len() - 1);
        c
    }

    /// A fresh canary for an injection point: `CANARY` + 16 random upper-case hex digits.
    pub fn mint(&mut self, point: &str) -> String {
        let c = format!("CANARY{}", hex(&random_bytes(8), true));
        self.list.push((point.to_string(), c.clone()));
        c
    }

    pub fn scanner(&self) -> Scanner {
        let mut needles = Vec::new();
        for (i, (_, c)) in self.list.iter().enumerate() {
            let raw = c.as_bytes();
            let mut forms: Vec<(&'static str, Vec<u8>)> = vec![
                ("raw", raw.to_vec()),
                ("lowercase", c.to_ascii_lowercase().into_bytes()),
                ("hex", hex(raw, false).into_bytes()),
                ("HEX", hex(raw, true).into_bytes()),
            ];
            // Base64 of a stream containing the canary at any offset contains the
            // encoding of the canary's bytes from the next 3-byte boundary on.
            for skip in 0..3 {
                let sub = &raw[skip..];
                let sub = &sub[..sub.len() / 3 * 3];
                forms.push(("base64", base64(sub, false).into_bytes()));
                forms.push(("base64url", base64(sub, true).into_bytes()));
            }
            for (form, bytes) in forms {
                needles.push(Needle { canary: i, form, bytes });
            }
        }
        let mut index: HashMap<[u8; 8], Vec<usize>> = HashMap::new();
        for (n, needle) in needles.iter().enumerate() {
            let key: [u8; 8] = needle.bytes[..8].try_into().unwrap();
            index.entry(key).or_default().push(n);
        }
        Scanner { needles, index, points: self.list.clone(), audit_only: self.audit_only.clone() }
    }
}

pub struct Needle {
    pub canary: usize,
    pub form: &'static str,
    pub bytes: Vec<u8>,
}

pub struct Scanner {
    pub needles: Vec<Needle>,
    pub index: HashMap<[u8; 8], Vec<usize>>,
    pub points: Vec<(String, String)>,
    pub audit_only: Vec<usize>,
}

impl Scanner {
    /// Every (injection point, form) found in `data`.
    pub fn find(&self, data: &[u8]) -> Vec<String> {
        self.find_canaries(data).into_iter().map(|(_, hit)| hit).collect()
    }

    /// Every hit in `data` with its canary's index.
    pub fn find_canaries(&self, data: &[u8]) -> Vec<(usize, String)> {
        let mut found = Vec::new();
        if data.len() < 8 {
            return found;
        }
        for at in 0..=data.len() - 8 {
            let key: [u8; 8] = data[at..at + 8].try_into().unwrap();
            if let Some(ns) = self.index.get(&key) {
                for &n in ns {
                    let needle = &self.needles[n];
                    if data[at..].starts_with(&needle.bytes) {
                        let hit = format!("{} ({}) at byte {at}", self.points[needle.canary].0, needle.form);
                        found.push((needle.canary, hit));
                    }
                }
            }
        }
        found
    }
}

/// Everything the server produced outside HTTP responses, by source.
#[derive(Default)]
pub struct Produced {
    pub sources: Vec<(String, Vec<u8>)>,
}

impl Produced {
    pub fn add(&mut self, name: impl Into<String>, bytes: Vec<u8>) {
        self.sources.push((name.into(), bytes));
    }

    pub fn add_tree(&mut self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                self.add_tree(&p);
            } else if ft.is_file() {
                let bytes = std::fs::read(&p).unwrap_or_else(|err| panic!("reading {}: {err}", p.display()));
                self.add(p.display().to_string(), bytes);
            }
        }
    }

    pub fn total(&self) -> usize {
        self.sources.iter().map(|(_, b)| b.len()).sum()
    }
}

//! GGML block formats (bit-exact with GGUF files) and their decoding into the
//! uniform "group" form the kernels use: per element an unsigned (or, for Q8_0,
//! signed) small integer `q`, and per group of 16 or 32 elements a scale `d`
//! and an offset `m`, so that `w = d * q + m`.
//!
//! Every supported type maps onto that form exactly (in real arithmetic):
//! Q4_0 is `d*(q-8)` = `d*q + (-8d)`; Q4_K's sub-block scales are folded into
//! per-32 `d*sc` and `-dmin*mn`; Q6_K's per-16 scales give 16-element groups.

use half::f16;

/// GGUF block types with a kernel in this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// How the decoded integers are stored in the packed layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    /// 4-bit unsigned (0..=15), two per byte.
    Nib4,
    /// 8-bit unsigned (0..=63).
    U8,
    /// 8-bit signed (Q8_0), no offset term.
    I8,
}

impl GgmlType {
    pub const ALL: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// Elements per GGML block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => 256,
        }
    }

    /// Bytes per GGML block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
        }
    }

    /// The GGML type id used in GGUF files.
    pub fn ggml_id(self) -> u32 {
        match self {
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
        }
    }

    /// The type with GGML type id `id`, if it has a kernel here.
    pub fn from_ggml_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// Elements per scale group in the decoded form.
    pub(crate) fn group(self) -> usize {
        match self {
            GgmlType::Q6_K => 16,
            _ => 32,
        }
    }

    pub(crate) fn storage(self) -> Storage {
        match self {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => Storage::Nib4,
            GgmlType::Q8_0 => Storage::I8,
            GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K | GgmlType::Q6_K => Storage::U8,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
#[inline]
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Decodes one GGML block (`block.len() == ty.type_size()`) into `q`
/// (`block_size` values), `d` and `m` (`block_size / group` values each).
pub(crate) fn decode_block(ty: GgmlType, b: &[u8], q: &mut [u8], d: &mut [f32], m: &mut [f32]) {
    debug_assert_eq!(b.len(), ty.type_size());
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (dd, mm, qs) = if ty == GgmlType::Q4_0 {
                let dd = f16_at(b, 0);
                (dd, -8.0 * dd, &b[2..18])
            } else {
                (f16_at(b, 0), f16_at(b, 2), &b[4..20])
            };
            for j in 0..16 {
                q[j] = qs[j] & 0x0F;
                q[j + 16] = qs[j] >> 4;
            }
            d[0] = dd;
            m[0] = mm;
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (dd, mm, qh, qs) = if ty == GgmlType::Q5_0 {
                let dd = f16_at(b, 0);
                (dd, -16.0 * dd, &b[2..6], &b[6..22])
            } else {
                (f16_at(b, 0), f16_at(b, 2), &b[4..8], &b[8..24])
            };
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            for j in 0..16 {
                q[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            d[0] = dd;
            m[0] = mm;
        }
        GgmlType::Q8_0 => {
            d[0] = f16_at(b, 0);
            m[0] = 0.0;
            q[..32].copy_from_slice(&b[2..34]);
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let dall = f16_at(b, 0);
            let dmin = f16_at(b, 2);
            let scales = &b[4..16];
            let (qh, qs) = if ty == GgmlType::Q4_K { (None, &b[16..144]) } else { (Some(&b[16..48]), &b[48..176]) };
            for c in 0..4 {
                let ql = &qs[32 * c..32 * c + 32];
                for half in 0..2 {
                    let j = 2 * c + half;
                    let (sc, mn) = scale_min_k4(j, scales);
                    d[j] = dall * sc as f32;
                    m[j] = -(dmin * mn as f32);
                    for l in 0..32 {
                        let mut v = if half == 0 { ql[l] & 0x0F } else { ql[l] >> 4 };
                        if let Some(qh) = qh {
                            if qh[l] & (1u8 << j) != 0 {
                                v += 16;
                            }
                        }
                        q[32 * j + l] = v;
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let dall = f16_at(b, 208);
            #[allow(clippy::needless_range_loop)] // `e` also picks the bytes of `ql`/`qh`/`sc`
            for e in 0..256 {
                let idx = e / 128;
                let r = e % 128;
                let quarter = r / 32;
                let l = r % 32;
                let lo = ql[64 * idx + l + 32 * (quarter & 1)];
                let lo = if quarter < 2 { lo & 0x0F } else { lo >> 4 };
                let hi = (qh[32 * idx + l] >> (2 * quarter)) & 3;
                q[e] = lo | (hi << 4);
            }
            for g in 0..16 {
                let s = dall * (sc[g] as i8) as f32;
                d[g] = s;
                m[g] = -32.0 * s;
            }
        }
    }
}

/// Dequantizes one GGML row (`bytes` = the row's blocks) into `out` (scalar,
/// straight from the GGML layout; used by tests and for embedding lookups).
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let bs = ty.block_size();
    let g = ty.group();
    let mut q = [0u8; 256];
    let mut d = [0f32; 16];
    let mut m = [0f32; 16];
    for (blk, o) in bytes.chunks_exact(ty.type_size()).zip(out.chunks_exact_mut(bs)) {
        decode_block(ty, blk, &mut q[..bs], &mut d[..bs / g], &mut m[..bs / g]);
        for (i, o) in o.iter_mut().enumerate() {
            let gi = i / g;
            *o = if ty == GgmlType::Q8_0 { d[0] * (q[i] as i8) as f32 } else { d[gi] * q[i] as f32 + m[gi] };
        }
    }
}

//! Quantized matrix multiplication `out[m, rows] = x[m, cols] · W[rows, cols]^T`
//! with `W` in a GGUF block format.
//!
//! Design (why it is fast):
//! - At load, weights are decoded into the uniform group form of [`formats`]
//!   and repacked into **tiles of 16 weight rows**: for each group of 16/32
//!   columns, 64-byte vectors hold 4 consecutive elements of each of the 16
//!   rows, followed by the 16 rows' scales and offsets. One broadcast of 4
//!   activation bytes then feeds a single `vpdpbusd` that advances 16 row dot
//!   products at once — no horizontal sums, and each weight byte is loaded
//!   once per call whatever the number of activation rows (they are processed
//!   in register tiles of up to 6 rows while the weight tile sits in L1).
//! - Activations are quantized on the fly to signed 8 bits per group (scale
//!   `d`, integer sum), like llama.cpp's Q8_0/Q8_1; the group dot product is
//!   exact in integers and one FMA per group applies `d_w·d_x` and `m_w·d_x·Σq`.
//! - Work is split over weight tiles across the persistent [`crate::pool`].
//!
//! Paths: AVX-512 VNNI (`vpdpbusd`), AVX2+FMA+F16C (`vpmaddubsw`), and a
//! portable scalar path that is the reference in tests. All eight types run on
//! all three paths.

pub(crate) mod formats;
mod pack;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

pub use formats::{dequantize_row, GgmlType};
pub use pack::QuantMatrix;

/// Which implementation runs a matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Portable scalar code; the reference.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI.
    Avx512Vnni,
}

impl KernelPath {
    pub const ALL: [KernelPath; 3] = [KernelPath::Scalar, KernelPath::Avx2, KernelPath::Avx512Vnni];

    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512Vnni => "avx512vnni",
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The path by name (`scalar`, `avx2`, `avx512vnni`).
    pub fn from_name(name: &str) -> Option<KernelPath> {
        KernelPath::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The path every matmul takes: the one forced with [`KernelPath::force`],
    /// else the fastest this CPU has.
    pub fn best() -> KernelPath {
        static DETECTED: std::sync::OnceLock<KernelPath> = std::sync::OnceLock::new();
        match FORCED_PATH.load(std::sync::atomic::Ordering::Relaxed) {
            1 => KernelPath::Scalar,
            2 => KernelPath::Avx2,
            3 => KernelPath::Avx512Vnni,
            _ => *DETECTED.get_or_init(|| {
                [KernelPath::Avx512Vnni, KernelPath::Avx2]
                    .into_iter()
                    .find(|p| p.is_available())
                    .unwrap_or(KernelPath::Scalar)
            }),
        }
    }

    /// Forces every later matmul onto `path` (`None`: the fastest available
    /// again). Process-wide: the model loader applies the configured
    /// `kernels.cpu_path` through it. Refuses a path this CPU cannot run.
    pub fn force(path: Option<KernelPath>) -> Result<(), crate::KernelError> {
        let code = match path {
            None => 0,
            Some(p) if !p.is_available() => return Err(crate::KernelError::PathUnavailable(p.name())),
            Some(KernelPath::Scalar) => 1,
            Some(KernelPath::Avx2) => 2,
            Some(KernelPath::Avx512Vnni) => 3,
        };
        FORCED_PATH.store(code, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The forced path (0: none; see [`KernelPath::force`]).
static FORCED_PATH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// How far ahead of the group being computed a tile kernel asks for weight
/// bytes, on its first pass over a tile (later row blocks find the tile in L1).
///
/// Why: with several activation rows the kernel is compute-bound, so the
/// weights arrive slower than the hardware prefetchers expect and it stalls
/// on them; and weights read once per step (far larger than the caches) would
/// otherwise push out of L3 what *is* reused between steps — the KV cache and
/// activations. A non-temporal prefetch fixes both: a batch-8 decode step of
/// the default model went from 5.6 to 4.4 ms, batch 1 from 2.30 to 2.17 ms
/// (`cargo bench --bench step`, interleaved runs; README).
pub(crate) const WEIGHT_PREFETCH_AHEAD: usize = 5120;

/// Non-temporal prefetch of the `len` bytes at `p`. Any address is allowed: a
/// prefetch never faults (the pointer is only formed with wrapping arithmetic).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_weights(p: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: a prefetch has no architectural effect and never faults.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_NTA }>(p.wrapping_add(off) as *const i8)
        };
        off += 64;
    }
}

/// Activations quantized to signed 8 bits per group: `x ≈ d[g] * q`.
pub(crate) struct QActs {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    /// `d[g] * Σ q` over the group.
    pub s: Vec<f32>,
    /// `Σ q` over the group.
    pub qsum: Vec<i32>,
    pub cols: usize,
    pub ngroups: usize,
}

#[inline(always)]
fn quantize_rows_body(x: &[f32], group: usize, q: &mut [i8], d: &mut [f32], s: &mut [f32], qsum: &mut [i32]) {
    // The two group sizes of the formats get fixed-length loops (vectorized);
    // the arithmetic is the same either way.
    match group {
        32 => quantize_groups::<32>(x, q, d, s, qsum),
        16 => quantize_groups::<16>(x, q, d, s, qsum),
        _ => quantize_groups_any(x, group, q, d, s, qsum),
    }
}

#[inline(always)]
fn quantize_groups<const G: usize>(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], qsum: &mut [i32]) {
    for (gi, (xs, qs)) in x.chunks_exact(G).zip(q.chunks_exact_mut(G)).enumerate() {
        let xs: &[f32; G] = xs.try_into().expect("chunk of G");
        let qs: &mut [i8; G] = qs.try_into().expect("chunk of G");
        // |x| (NaN as 0, as the reference fold ignores it) and a halving max
        // tree: no NaN-ordered scalar chain, so it vectorizes.
        let mut lanes = [0f32; G];
        for i in 0..G {
            lanes[i] = if xs[i].is_nan() { 0.0 } else { xs[i].abs() };
        }
        let mut w = G;
        while w > 1 {
            w /= 2;
            for i in 0..w {
                lanes[i] = lanes[i].max(lanes[i + w]);
            }
        }
        let amax = lanes[0];
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        // round-half-even of the clamped value by the 1.5·2^23 trick: the same
        // integers as `round_ties_even().clamp(-127, 127) as i32` (NaN → 0), but
        // only selects and bit casts, which vectorize (a saturating float→int
        // cast does not).
        const MAGIC: f32 = 12_582_912.0;
        let mut ints = [0i32; G];
        for i in 0..G {
            let t = xs[i] * id;
            let t = if t.is_nan() { 0.0 } else { t };
            let t = t.clamp(-127.0, 127.0);
            ints[i] = ((t + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
            qs[i] = ints[i] as i8;
        }
        let sum: i32 = ints.iter().sum();
        d[gi] = dd;
        qsum[gi] = sum;
        s[gi] = dd * sum as f32;
    }
}

fn quantize_groups_any(x: &[f32], group: usize, q: &mut [i8], d: &mut [f32], s: &mut [f32], qsum: &mut [i32]) {
    for (gi, (xs, qs)) in x.chunks_exact(group).zip(q.chunks_exact_mut(group)).enumerate() {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let mut sum = 0i32;
        for (o, v) in qs.iter_mut().zip(xs) {
            let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
            *o = r as i8;
            sum += r;
        }
        d[gi] = dd;
        qsum[gi] = sum;
        s[gi] = dd * sum as f32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn quantize_rows_avx512(x: &[f32], group: usize, q: &mut [i8], d: &mut [f32], s: &mut [f32], qsum: &mut [i32]) {
    quantize_rows_body(x, group, q, d, s, qsum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_rows_avx2(x: &[f32], group: usize, q: &mut [i8], d: &mut [f32], s: &mut [f32], qsum: &mut [i32]) {
    quantize_rows_body(x, group, q, d, s, qsum)
}

fn quantize_rows(
    path: KernelPath,
    x: &[f32],
    group: usize,
    q: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    qsum: &mut [i32],
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller only passes a path that `is_available()` on this
        // CPU; the buffers are sized by `quantize_acts` for these rows.
        KernelPath::Avx512Vnni if group == 32 => unsafe { x86_avx512::quantize_g32(x, q, d, s, qsum) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller only passes a path that `is_available()` on this CPU.
        KernelPath::Avx512Vnni => unsafe { quantize_rows_avx512(x, group, q, d, s, qsum) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        KernelPath::Avx2 => unsafe { quantize_rows_avx2(x, group, q, d, s, qsum) },
        _ => quantize_rows_body(x, group, q, d, s, qsum),
    }
}

/// Quantizes `x` (`m` rows of `cols`) per `group` elements; rows are split
/// across the pool when there are many.
pub(crate) fn quantize_acts(path: KernelPath, x: &[f32], m: usize, cols: usize, group: usize) -> QActs {
    let ngroups = cols / group;
    let mut a = QActs {
        q: vec![0i8; m * cols],
        d: vec![0f32; m * ngroups],
        s: vec![0f32; m * ngroups],
        qsum: vec![0i32; m * ngroups],
        cols,
        ngroups,
    };
    if m < 8 {
        quantize_rows(path, x, group, &mut a.q, &mut a.d, &mut a.s, &mut a.qsum);
        return a;
    }
    let chunks = crate::pool::num_threads().max(1) * 2;
    let rows_per = m.div_ceil(chunks);
    let ptrs =
        (SendPtr(a.q.as_mut_ptr()), SendPtr(a.d.as_mut_ptr()), SendPtr(a.s.as_mut_ptr()), SendPtr(a.qsum.as_mut_ptr()));
    crate::pool::parallel_for(m.div_ceil(rows_per), &|t| {
        let r0 = t * rows_per;
        let r1 = (r0 + rows_per).min(m);
        let n = r1 - r0;
        // SAFETY: tasks cover disjoint row ranges `r0..r1` of each buffer, all
        // within the allocations made above, which outlive `parallel_for`.
        unsafe {
            let q = std::slice::from_raw_parts_mut(ptrs.0.get().add(r0 * cols), n * cols);
            let d = std::slice::from_raw_parts_mut(ptrs.1.get().add(r0 * ngroups), n * ngroups);
            let s = std::slice::from_raw_parts_mut(ptrs.2.get().add(r0 * ngroups), n * ngroups);
            let qs = std::slice::from_raw_parts_mut(ptrs.3.get().add(r0 * ngroups), n * ngroups);
            quantize_rows(path, &x[r0 * cols..r1 * cols], group, q, d, s, qs);
        }
    });
    a
}

/// A raw pointer that may be shared with pool tasks writing disjoint ranges.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: used only to hand disjoint sub-ranges of one buffer to pool tasks.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    #[inline(always)]
    pub fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed-size (vectorized) group quantizer gives exactly the integers and
    /// scales of the plain loop, including zeros, infinities' neighbours and NaN.
    #[test]
    fn fixed_size_quantizer_equals_the_plain_loop() {
        let mut rng = crate::test_rng::XorShift32(0x9E37_79B9);
        for group in [16usize, 32] {
            for case in 0..200 {
                let n = group * 4;
                let mut x: Vec<f32> = (0..n).map(|_| rng.centered(8.0)).collect();
                match case % 5 {
                    0 => x[..group].iter_mut().for_each(|v| *v = 0.0),
                    1 => x[3] = f32::NAN,
                    2 => x[5] = 1e30,
                    3 => x.iter_mut().for_each(|v| *v = (*v * 4.0).round() / 4.0), // ties
                    _ => {}
                }
                let mut a = (vec![0i8; n], vec![0f32; 4], vec![0f32; 4], vec![0i32; 4]);
                let mut b = (vec![0i8; n], vec![0f32; 4], vec![0f32; 4], vec![0i32; 4]);
                quantize_rows_body(&x, group, &mut a.0, &mut a.1, &mut a.2, &mut a.3);
                quantize_groups_any(&x, group, &mut b.0, &mut b.1, &mut b.2, &mut b.3);
                assert_eq!(a.0, b.0, "group {group} case {case}");
                assert_eq!(a.3, b.3);
                assert_eq!(
                    a.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    /// Every path's quantizer (the AVX-512 one has its own code for groups of
    /// 32) gives the reference loop's integers and scales bit for bit,
    /// including NaN, infinities, huge values, zero groups and ties.
    #[test]
    fn every_path_quantizes_like_the_reference() {
        let mut rng = crate::test_rng::XorShift32(0x1234_5678);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for path in KernelPath::ALL.into_iter().filter(|p| p.is_available()) {
            for group in [16usize, 32] {
                for case in 0..300 {
                    let n = group * 6;
                    let mut x: Vec<f32> = (0..n).map(|_| rng.centered(8.0)).collect();
                    match case % 7 {
                        0 => x[..group].iter_mut().for_each(|v| *v = 0.0),
                        1 => x[3] = f32::NAN,
                        2 => x[5] = 1e30,
                        3 => x.iter_mut().for_each(|v| *v = (*v * 4.0).round() / 4.0),
                        4 => x[group + 1] = f32::INFINITY,
                        5 => x[2 * group..3 * group].iter_mut().for_each(|v| *v = f32::NAN),
                        _ => x.iter_mut().for_each(|v| *v *= 1e-30),
                    }
                    let a = quantize_acts(path, &x, 6, group, group);
                    let mut b = (vec![0i8; n], vec![0f32; 6], vec![0f32; 6], vec![0i32; 6]);
                    quantize_groups_any(&x, group, &mut b.0, &mut b.1, &mut b.2, &mut b.3);
                    let what = format!("{} group {group} case {case}", path.name());
                    assert_eq!(a.q, b.0, "{what}");
                    assert_eq!(a.qsum, b.3, "{what}");
                    assert_eq!(bits(&a.d), bits(&b.1), "{what}");
                    assert_eq!(bits(&a.s), bits(&b.2), "{what}");
                }
            }
        }
    }
}

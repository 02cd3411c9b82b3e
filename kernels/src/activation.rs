//! The SwiGLU gate `silu(g) · u` over rows of `[g | u]`.
//!
//! Why here and not in the model code: the workspace is compiled for baseline
//! x86-64, so a plain loop in `salus-models` runs 4 lanes wide on one thread
//! while the other core waits at the next matmul. With a batch of 8 decode rows
//! that was about 5 % of a step. Here the same arithmetic is compiled for
//! AVX-512 / AVX2 (the quantized matmul's path, picked at run time) and split over the kernels' pool. Rust
//! never fuses or reorders float operations, so every path gives bitwise the
//! same result as the portable one.

use crate::math::exp_nonpositive;
use crate::qmatmul::{KernelPath, SendPtr};

/// Below this many outputs the gate runs on the calling thread.
const PARALLEL_MIN: usize = 4096;
/// Outputs per pool task.
const TASK: usize = 2048;

/// `out[r][c] = silu(gu[r][c]) · gu[r][n + c]` for rows of `2n` values.
///
/// # Panics
/// When `gu.len() != 2 · out.len()` or `out.len()` is not a multiple of `n`
/// (the caller checks shapes first).
pub fn silu_mul(gu: &[f32], n: usize, out: &mut [f32]) {
    assert!(n > 0 && out.len().is_multiple_of(n) && gu.len() == 2 * out.len(), "silu_mul: shape mismatch");
    let total = out.len();
    let ptr = SendPtr(out.as_mut_ptr());
    let span = move |lo: usize, hi: usize| {
        // SAFETY: tasks write disjoint ranges `lo..hi` of `out`, which outlives
        // the (blocking) parallel loop below.
        let out = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(lo), hi - lo) };
        dispatch(gu, n, lo, out);
    };
    if total < PARALLEL_MIN {
        span(0, total);
    } else {
        crate::pool::parallel_for(total.div_ceil(TASK), &|t| span(t * TASK, ((t + 1) * TASK).min(total)));
    }
}

/// Outputs `first..first + out.len()` (flat indices into the `[rows, n]` output),
/// on the SIMD level of the quantized matmul's path (so a forced `kernels.cpu_path`
/// selects both).
fn dispatch(gu: &[f32], n: usize, first: usize, out: &mut [f32]) {
    match KernelPath::best() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `best` only returns a path this CPU supports (avx512f among its features).
        KernelPath::Avx512Vnni => unsafe { span_avx512(gu, n, first, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (avx2 and fma).
        KernelPath::Avx2 => unsafe { span_avx2(gu, n, first, out) },
        _ => span_body(gu, n, first, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn span_avx512(gu: &[f32], n: usize, first: usize, out: &mut [f32]) {
    span_body(gu, n, first, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn span_avx2(gu: &[f32], n: usize, first: usize, out: &mut [f32]) {
    span_body(gu, n, first, out)
}

#[inline(always)]
fn span_body(gu: &[f32], n: usize, first: usize, out: &mut [f32]) {
    let mut i = first;
    let end = first + out.len();
    while i < end {
        let (r, c0) = (i / n, i % n);
        let c1 = n.min(c0 + (end - i));
        let row = &gu[r * 2 * n..(r + 1) * 2 * n];
        let (g, u) = row.split_at(n);
        let o = &mut out[i - first..i - first + (c1 - c0)];
        for ((o, &g), &u) in o.iter_mut().zip(&g[c0..c1]).zip(&u[c0..c1]) {
            *o = silu(g) * u;
        }
        i += c1 - c0;
    }
}

/// `g · σ(g)`, with `e^(-|g|)` so the exponential never overflows.
#[inline(always)]
pub fn silu(g: f32) -> f32 {
    let e = exp_nonpositive(-g.abs());
    let sig = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    g * sig
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path and split (serial, pooled, odd widths that make tasks start
    /// mid-row) equals the plain per-element loop bit for bit.
    #[test]
    fn silu_mul_matches_the_plain_loop_on_every_split() {
        let mut rng = crate::test_rng::XorShift32(0x2545_F491);
        for (rows, n) in [(1usize, 7usize), (3, 1536), (8, 1536), (5, 1000), (16, 4864)] {
            let mut gu: Vec<f32> = (0..rows * 2 * n).map(|_| rng.centered(24.0)).collect();
            gu[0] = f32::NAN;
            gu[1] = -0.0;
            if gu.len() > 3 {
                gu[2] = 200.0;
                gu[3] = -200.0;
            }
            let want: Vec<u32> = (0..rows * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    (silu(gu[r * 2 * n + c]) * gu[r * 2 * n + n + c]).to_bits()
                })
                .collect();
            let mut out = vec![0f32; rows * n];
            silu_mul(&gu, n, &mut out);
            assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "rows {rows} n {n}");
            let mut portable = vec![0f32; rows * n];
            span_body(&gu, n, 0, &mut portable);
            assert_eq!(portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
        }
        // Known values: silu(0) = 0, silu(x) → x for large x, → 0 for very negative x.
        let mut out = [0f32; 3];
        silu_mul(&[0.0, 30.0, -100.0, 1.0, 2.0, 3.0], 3, &mut out);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 60.0).abs() < 1e-4);
        assert!(out[2].abs() < 1e-30);
    }
}

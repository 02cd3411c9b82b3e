//! AVX-512 VNNI tile kernel: `vpdpbusd` (u8 weights × i8 activations → i32),
//! 16 weight rows per 512-bit vector, up to 6 activation rows per register tile.

use super::formats::Storage;
use super::pack::{TileArgs, TILE_ROWS};
use core::arch::x86_64::*;

const NIB4: u8 = 0;
const U8: u8 = 1;
const I8: u8 = 2;
/// Activation rows per register tile (one integer and one float accumulator
/// each, plus the weight vectors: fits the 32 vector registers).
const MR: usize = 8;

/// Computes tile `t` for all activation rows.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL and VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn tile(a: &TileArgs<'_>, tile: &[u8], t: usize) {
    let l = a.layout;
    assert!(tile.len() >= l.ngroups * l.group_bytes);
    assert!(a.acts.q.len() >= a.m * a.acts.cols && a.acts.d.len() >= a.m * a.acts.ngroups);
    assert!(a.acts.s.len() >= a.m * a.acts.ngroups && a.acts.qsum.len() >= a.m * a.acts.ngroups);
    let mut i0 = 0;
    while i0 < a.m {
        let n = (a.m - i0).min(MR);
        macro_rules! go {
            ($kind:expr, $g:expr, $f16:expr) => {
                match n {
                    1 => rows::<1, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
                    2 => rows::<2, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
                    3 => rows::<3, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
                    4 => rows::<4, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
                    5 => rows::<5, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
                    6 => rows::<6, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
                    7 => rows::<7, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
                    _ => rows::<8, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
                }
            };
        }
        // SAFETY (all arms): the asserts above bound every pointer the row
        // kernel forms: groups `< ngroups` of the tile, activation rows `< m`.
        match (l.storage, l.group, l.f16_scales) {
            (Storage::Nib4, _, true) => go!(NIB4, 32, true),
            (Storage::Nib4, _, false) => go!(NIB4, 32, false),
            (Storage::I8, _, true) => go!(I8, 32, true),
            (Storage::I8, _, false) => go!(I8, 32, false),
            (Storage::U8, 16, true) => go!(U8, 16, true),
            (Storage::U8, 16, false) => go!(U8, 16, false),
            (Storage::U8, _, true) => go!(U8, 32, true),
            (Storage::U8, _, false) => go!(U8, 32, false),
        }
        i0 += n;
    }
}

#[inline(always)]
unsafe fn load_scales<const F16: bool>(p: *const u8) -> __m512 {
    if F16 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    } else {
        _mm512_loadu_ps(p as *const f32)
    }
}

#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m512i {
    _mm512_set1_epi32((p as *const i32).read_unaligned())
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<const N: usize, const KIND: u8, const G: usize, const F16: bool>(
    a: &TileArgs<'_>,
    tile: &[u8],
    t: usize,
    i0: usize,
) {
    let l = a.layout;
    let ng = a.acts.ngroups;
    let cols = a.acts.cols;
    let ss = if F16 { 2 } else { 4 };
    let wp = tile.as_ptr();
    let xq: [*const i8; N] = core::array::from_fn(|r| a.acts.q.as_ptr().add((i0 + r) * cols));
    let xd = a.acts.d.as_ptr().add(i0 * ng);
    let xs = a.acts.s.as_ptr().add(i0 * ng);
    let xqs = a.acts.qsum.as_ptr().add(i0 * ng);
    let m4 = _mm512_set1_epi8(0x0F);
    let flip = _mm512_set1_epi8(0x80u8 as i8);
    let mut facc = [_mm512_setzero_ps(); N];
    for g in 0..ng {
        let gp = wp.add(g * l.group_bytes);
        if i0 == 0 {
            super::prefetch_weights(gp.wrapping_add(super::WEIGHT_PREFETCH_AHEAD), l.group_bytes);
        }
        // One integer accumulator per row: fewer registers (so eight rows fit)
        // and no per-group add of two partial sums.
        let mut ia = [_mm512_setzero_si512(); N];
        if KIND == NIB4 {
            for s in 0..4 {
                let v = _mm512_loadu_si512(gp.add(64 * s) as *const _);
                let lo = _mm512_and_si512(v, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                for r in 0..N {
                    let xp = xq[r].add(g * 32 + 8 * s);
                    ia[r] = _mm512_dpbusd_epi32(ia[r], lo, bcast4(xp));
                    ia[r] = _mm512_dpbusd_epi32(ia[r], hi, bcast4(xp.add(4)));
                }
            }
        } else {
            for s in 0..G / 4 {
                let mut v = _mm512_loadu_si512(gp.add(64 * s) as *const _);
                if KIND == I8 {
                    // i8 -> u8 by +128; corrected below with 128·Σx.
                    v = _mm512_xor_si512(v, flip);
                }
                for r in 0..N {
                    let x = bcast4(xq[r].add(g * G + 4 * s));
                    ia[r] = _mm512_dpbusd_epi32(ia[r], v, x);
                }
            }
        }
        let sp = gp.add(l.wbytes);
        let dw = load_scales::<F16>(sp);
        let mw = if KIND == I8 { _mm512_setzero_ps() } else { load_scales::<F16>(sp.add(TILE_ROWS * ss)) };
        for r in 0..N {
            let ai = r * ng + g;
            let mut isum = ia[r];
            if KIND == I8 {
                isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * *xqs.add(ai)));
            }
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(ai)));
            facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dd, facc[r]);
            if KIND != I8 {
                facc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xs.add(ai)), facc[r]);
            }
        }
    }
    for (r, f) in facc.iter().enumerate() {
        let mut lanes = [0f32; TILE_ROWS];
        _mm512_storeu_ps(lanes.as_mut_ptr(), *f);
        a.store(i0 + r, t, &lanes);
    }
}

/// Activation quantization for groups of 32 (see `super::quantize_groups`):
/// the same integers and scales, bit for bit, two vectors per group.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL; `x.len()` must be a multiple of 32 and
/// `q`, `d`, `s`, `qsum` must hold `x.len()` / `x.len() / 32` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn quantize_g32(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], qsum: &mut [i32]) {
    let ng = x.len() / 32;
    assert!(x.len() == ng * 32 && q.len() >= ng * 32 && d.len() >= ng && s.len() >= ng && qsum.len() >= ng);
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let lo = _mm512_set1_ps(-127.0);
    let hi = _mm512_set1_ps(127.0);
    for g in 0..ng {
        let xp = x.as_ptr().add(g * 32);
        let x0 = _mm512_loadu_ps(xp);
        let x1 = _mm512_loadu_ps(xp.add(16));
        // |x| with NaN as 0: the scalar max ignores NaN (`f32::max`).
        let a0 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x0), abs_mask));
        let a1 = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x1), abs_mask));
        let a0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(a0, a0), a0);
        let a1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(a1, a1), a1);
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let idv = _mm512_set1_ps(id);
        let quant = |v: __m512| {
            let t = _mm512_mul_ps(v, idv);
            let t = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t), t);
            let t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
            // Round half to even, as the scalar 1.5·2^23 trick.
            _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t)
        };
        let i0 = quant(x0);
        let i1 = quant(x1);
        let qp = q.as_mut_ptr().add(g * 32);
        _mm_storeu_si128(qp as *mut __m128i, _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128(qp.add(16) as *mut __m128i, _mm512_cvtsepi32_epi8(i1));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        d[g] = dd;
        qsum[g] = sum;
        s[g] = dd * sum as f32;
    }
}

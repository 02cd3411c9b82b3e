//! AVX2 (+FMA, F16C) tile kernel over the same 16-row layout: each 64-byte
//! vector is processed as two 8-row halves with `vpmaddubsw` + `vpmaddwd`.
//! i16 saturation cannot happen: weights are ≤ 63 (or |w| ≤ 128 with the sign
//! trick for Q8_0) and activations |x| ≤ 127, so pair sums stay ≤ 32512.

use super::formats::Storage;
use super::pack::{TileArgs, TILE_ROWS};
use core::arch::x86_64::*;

const NIB4: u8 = 0;
const U8: u8 = 1;
const I8: u8 = 2;
/// Activation rows per register tile.
const MR: usize = 4;

/// Computes tile `t` for all activation rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
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
                    _ => rows::<4, { $kind }, { $g }, { $f16 }>(a, tile, t, i0),
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
unsafe fn load_scales<const F16: bool>(p: *const u8) -> __m256 {
    if F16 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    } else {
        _mm256_loadu_ps(p as *const f32)
    }
}

#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m256i {
    _mm256_set1_epi32((p as *const i32).read_unaligned())
}

#[target_feature(enable = "avx2,fma,f16c")]
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
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut out = [[0f32; TILE_ROWS]; N];
    for h in 0..2 {
        let mut facc = [_mm256_setzero_ps(); N];
        for g in 0..ng {
            let gp = wp.add(g * l.group_bytes);
            if i0 == 0 && h == 0 {
                super::prefetch_weights(gp.wrapping_add(super::WEIGHT_PREFETCH_AHEAD), l.group_bytes);
            }
            let mut ia = [_mm256_setzero_si256(); N];
            if KIND == NIB4 {
                for s in 0..4 {
                    let v = _mm256_loadu_si256(gp.add(64 * s + 32 * h) as *const __m256i);
                    let lo = _mm256_and_si256(v, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                    for r in 0..N {
                        let xp = xq[r].add(g * 32 + 8 * s);
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, bcast4(xp)),
                            _mm256_maddubs_epi16(hi, bcast4(xp.add(4))),
                        );
                        ia[r] = _mm256_add_epi32(ia[r], _mm256_madd_epi16(p, ones));
                    }
                }
            } else if KIND == U8 {
                for s in 0..G / 4 {
                    let v = _mm256_loadu_si256(gp.add(64 * s + 32 * h) as *const __m256i);
                    for r in 0..N {
                        let p = _mm256_maddubs_epi16(v, bcast4(xq[r].add(g * G + 4 * s)));
                        ia[r] = _mm256_add_epi32(ia[r], _mm256_madd_epi16(p, ones));
                    }
                }
            } else {
                for s in 0..G / 4 {
                    let v = _mm256_loadu_si256(gp.add(64 * s + 32 * h) as *const __m256i);
                    let av = _mm256_sign_epi8(v, v);
                    for r in 0..N {
                        let x = _mm256_sign_epi8(bcast4(xq[r].add(g * G + 4 * s)), v);
                        let p = _mm256_maddubs_epi16(av, x);
                        ia[r] = _mm256_add_epi32(ia[r], _mm256_madd_epi16(p, ones));
                    }
                }
            }
            let sp = gp.add(l.wbytes + 8 * h * ss);
            let dw = load_scales::<F16>(sp);
            let mw = if KIND == I8 { _mm256_setzero_ps() } else { load_scales::<F16>(sp.add(TILE_ROWS * ss)) };
            for r in 0..N {
                let ai = r * ng + g;
                let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.add(ai)));
                facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r]), dd, facc[r]);
                if KIND != I8 {
                    facc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs.add(ai)), facc[r]);
                }
            }
        }
        for r in 0..N {
            _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * h), facc[r]);
        }
    }
    for (r, lanes) in out.iter().enumerate() {
        a.store(i0 + r, t, lanes);
    }
}

//! AVX-512 work item for one decode token (one query position, every query
//! head of a GQA group), block size 16, head dimension 64 or 128.
//!
//! Why a separate path: in the generic item each score is a chain of
//! `head_dim` dependent multiply-adds and each query's `P·V` is four chains,
//! so a decode item waits on FMA latency most of the time, and it converts
//! every f16/bf16 block into a scratch buffer first. Here the keys of four
//! blocks are scored against up to four queries at once (sixteen independent
//! chains), `P·V` runs for all queries of the group on each value row, and
//! f16/bf16 values are widened in registers as they are loaded.
//!
//! The arithmetic of every output element is exactly the generic path's: a
//! score is `Σ_d q_d·k_d` with one fused multiply-add per `d` in order from
//! zero, the softmax of each block is the shared [`softmax_block`], and each
//! accumulator lane is `acc·corr` followed by one fused multiply-add per visible
//! slot in order. So a token gets the same bits here and in a prefill chunk
//! (which takes the generic path); tests check both. Cache-resident, 8
//! sequences × 300 tokens, one layer: 35 µs bf16 / 41 µs f32 against 60 / 55 µs
//! for the generic item (`cargo bench --bench kernels -- none`).

use core::arch::x86_64::*;

use super::{load_scaled_queries, prefetch, softmax_block, write_outputs, Ctx, KvDtype, KvElement, Scratch, WorkItem};

/// Blocks scored together.
const NB: usize = 4;
/// Queries scored (and accumulated) together.
const QB: usize = 4;
/// Slots per block (the only block size of this path).
const BS: usize = 16;

/// Whether this path handles an item: one query token, blocks of 16, a head
/// dimension of 64 or 128.
pub(super) fn handles(block_size: usize, head_dim: usize, tokens: usize) -> bool {
    tokens == 1 && block_size == BS && (head_dim == 64 || head_dim == 128)
}

/// 16 stored values at `p` as f32 (exact widening for f16 and bf16).
#[inline(always)]
unsafe fn load16<E: KvElement>(p: *const E) -> __m512 {
    match E::DTYPE {
        KvDtype::F32 => _mm512_loadu_ps(p as *const f32),
        KvDtype::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        KvDtype::BF16 => {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
        }
    }
}

/// Runs one decode item.
///
/// # Safety
/// The CPU must support AVX-512 F. `ctx` must have passed `paged_attention`'s
/// validation, `it` must cover one token, and [`handles`] must hold for
/// `ctx.geom` with `HD` equal to its head dimension.
#[target_feature(enable = "avx512f,fma")]
pub(super) unsafe fn item<E: KvElement, const HD: usize>(ctx: &Ctx<'_, E>, it: &WorkItem, sc: &mut Scratch) {
    let geom = &ctx.geom;
    let group = ctx.params.num_heads / geom.num_kv_heads;
    let s = &ctx.seqs[it.seq];
    let pos = s.start_pos + it.t0;
    let run = BS * HD;

    // Scaled queries of the group, [h_in_group][d] (one token).
    load_scaled_queries(ctx, it, HD, &mut sc.q);
    super::resize(&mut sc.acc, group * HD, 0.0);
    super::resize(&mut sc.m, group, f32::NEG_INFINITY);
    super::resize(&mut sc.l, group, 0.0);
    super::resize(&mut sc.s, group * NB * BS, 0.0);
    super::resize(&mut sc.p, group * BS, 0.0);
    super::resize(&mut sc.corr, group, 1.0);

    let window = ctx.params.sliding_window.unwrap_or(usize::MAX);
    let first_block = (pos + 1).saturating_sub(window) / BS;
    let last_block = pos / BS;
    let j_first = (pos + 1).saturating_sub(window);
    // Offsets of blocks' K/V runs for this KV head; bounds were validated.
    let base_of = |b: usize| (s.block_table[b] as usize * geom.num_kv_heads + it.kv_head) * run;
    let kp = ctx.k_cache.as_ptr();
    let vp = ctx.v_cache.as_ptr();

    let mut b0 = first_block;
    while b0 <= last_block {
        let nb = (last_block + 1 - b0).min(NB);
        // Block bases; a short chunk repeats its last block (scores unused).
        let bases: [usize; NB] = core::array::from_fn(|i| base_of(b0 + i.min(nb - 1)));
        for &base in &bases {
            assert!(base + run <= ctx.k_cache.len());
        }
        // Ask for the next chunk's keys and values while this one computes.
        for b in b0 + NB..(b0 + 2 * NB).min(last_block + 1) {
            let base = base_of(b);
            prefetch(&ctx.k_cache[base..base + run]);
            prefetch(&ctx.v_cache[base..base + run]);
        }

        // Scores: [query][block][slot].
        let mut h0 = 0;
        while h0 < group {
            match group - h0 {
                1 => scores::<E, HD, 1>(sc, kp, &bases, h0),
                2 => scores::<E, HD, 2>(sc, kp, &bases, h0),
                3 => scores::<E, HD, 3>(sc, kp, &bases, h0),
                _ => scores::<E, HD, 4>(sc, kp, &bases, h0),
            }
            h0 += QB;
        }

        for (i, &base) in bases.iter().enumerate().take(nb) {
            let block_start = (b0 + i) * BS;
            let lo = j_first.max(block_start) - block_start;
            let hi = (pos + 1).min(block_start + BS) - block_start;
            for hg in 0..group {
                let at = (hg * NB + i) * BS;
                let (m, l, p) = (&mut sc.m[hg], &mut sc.l[hg], &mut sc.p[hg * BS..(hg + 1) * BS]);
                sc.corr[hg] = softmax_block(&sc.s[at..at + BS], lo, hi, m, l, p);
            }
            let mut h0 = 0;
            while h0 < group {
                match group - h0 {
                    1 => pv::<E, HD, 1>(sc, vp.add(base), h0, lo, hi),
                    2 => pv::<E, HD, 2>(sc, vp.add(base), h0, lo, hi),
                    3 => pv::<E, HD, 3>(sc, vp.add(base), h0, lo, hi),
                    _ => pv::<E, HD, 4>(sc, vp.add(base), h0, lo, hi),
                }
                h0 += QB;
            }
        }
        b0 += NB;
    }

    write_outputs(ctx, it, HD, &sc.acc, &sc.l);
}

/// Scores of queries `h0..h0 + Q` against the four blocks at `bases`.
#[inline(always)]
unsafe fn scores<E: KvElement, const HD: usize, const Q: usize>(
    sc: &mut Scratch,
    kp: *const E,
    bases: &[usize; NB],
    h0: usize,
) {
    let q = sc.q.as_ptr().add(h0 * HD);
    let mut acc = [[_mm512_setzero_ps(); NB]; Q];
    for d in 0..HD {
        // Keys are [d][slot] within a block: 16 slots of dimension d.
        let k: [__m512; NB] = core::array::from_fn(|i| load16(kp.add(bases[i] + d * BS)));
        for (h, a) in acc.iter_mut().enumerate() {
            let qd = _mm512_set1_ps(*q.add(h * HD + d));
            for i in 0..NB {
                a[i] = _mm512_fmadd_ps(qd, k[i], a[i]);
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (i, v) in a.iter().enumerate() {
            _mm512_storeu_ps(sc.s.as_mut_ptr().add(((h0 + h) * NB + i) * BS), *v);
        }
    }
}

/// `acc[h] = acc[h]·corr[h] + Σ_{j in lo..hi} p[h][j]·v[j]` for queries
/// `h0..h0 + Q` of one block (`vb`: its `[slot][d]` values), 64 lanes of the
/// head dimension at a time held in registers.
#[inline(always)]
unsafe fn pv<E: KvElement, const HD: usize, const Q: usize>(
    sc: &mut Scratch,
    vb: *const E,
    h0: usize,
    lo: usize,
    hi: usize,
) {
    let accp = sc.acc.as_mut_ptr();
    let pp = sc.p.as_ptr();
    let mut c0 = 0;
    while c0 < HD {
        let mut a = [[_mm512_setzero_ps(); 4]; Q];
        for (h, ah) in a.iter_mut().enumerate() {
            let cr = _mm512_set1_ps(sc.corr[h0 + h]);
            for (c, v) in ah.iter_mut().enumerate() {
                *v = _mm512_mul_ps(_mm512_loadu_ps(accp.add((h0 + h) * HD + c0 + 16 * c)), cr);
            }
        }
        for j in lo..hi {
            let row = vb.add(j * HD + c0);
            let v: [__m512; 4] = core::array::from_fn(|c| load16(row.add(16 * c)));
            for (h, ah) in a.iter_mut().enumerate() {
                let p = _mm512_set1_ps(*pp.add((h0 + h) * BS + j));
                for c in 0..4 {
                    ah[c] = _mm512_fmadd_ps(p, v[c], ah[c]);
                }
            }
        }
        for (h, ah) in a.iter().enumerate() {
            for (c, v) in ah.iter().enumerate() {
                _mm512_storeu_ps(accp.add((h0 + h) * HD + c0 + 16 * c), *v);
            }
        }
        c0 += 64;
    }
}

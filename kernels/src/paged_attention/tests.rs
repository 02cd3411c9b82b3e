//! Tests of the CPU paged-attention kernel (a child module of `paged_attention`).

use super::*;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Naive f32 attention over a contiguous history `[ctx, n_kv, hd]`.
#[allow(clippy::too_many_arguments)] // the geometry, spelled out as in the kernel
fn reference(
    q: &[f32],      // [len, nh, hd]
    k_hist: &[f32], // [ctx, nkv, hd]
    v_hist: &[f32],
    start_pos: usize,
    len: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    scale: f32,
    window: Option<usize>,
) -> Vec<f32> {
    let group = nh / nkv;
    let mut out = vec![0f32; len * nh * hd];
    for t in 0..len {
        let p = start_pos + t;
        let lo = window.map(|w| (p + 1).saturating_sub(w)).unwrap_or(0);
        for h in 0..nh {
            let g = h / group;
            let qv = &q[(t * nh + h) * hd..][..hd];
            let scores: Vec<f64> = (lo..=p)
                .map(|j| {
                    let kv = &k_hist[(j * nkv + g) * hd..][..hd];
                    qv.iter().zip(kv).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() * scale as f64
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
            let z: f64 = w.iter().sum();
            for d in 0..hd {
                let mut acc = 0f64;
                for (i, j) in (lo..=p).enumerate() {
                    acc += w[i] * v_hist[(j * nkv + g) * hd + d] as f64;
                }
                out[(t * nh + h) * hd + d] = (acc / z) as f32;
            }
        }
    }
    out
}

fn rand_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Rounds through the storage type, as the cache does.
fn round_trip<E: KvElement>(x: &[f32]) -> Vec<f32> {
    let mut e = vec![E::default(); x.len()];
    E::store(x, &mut e);
    let mut out = vec![0f32; x.len()];
    E::load(&e, &mut out);
    out
}

struct Case {
    block_size: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    window: Option<usize>,
}

/// Fills several sequences' histories in random chunks, then runs one packed
/// call mixing decode tokens and prefill chunks at offsets; compares with the
/// naive reference.
fn check_case<E: KvElement>(case: &Case, seed: u64, tol: f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (bs, nh, nkv, hd) = (case.block_size, case.nh, case.nkv, case.hd);
    let nseq = 4;
    let totals: Vec<usize> = (0..nseq).map(|_| rng.random_range(1..80)).collect();
    let blocks_needed: usize = totals.iter().map(|t| t.div_ceil(bs)).sum();
    let geom = PagedGeometry { num_blocks: blocks_needed + 3, block_size: bs, num_kv_heads: nkv, head_dim: hd };
    // Scatter the sequences over shuffled physical blocks.
    let mut ids: Vec<u32> = (0..geom.num_blocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut tables = Vec::new();
    let mut next = 0;
    for t in &totals {
        let n = t.div_ceil(bs);
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }
    let mut k_cache = vec![E::default(); geom.cache_elems()];
    let mut v_cache = vec![E::default(); geom.cache_elems()];
    let row_kv = nkv * hd;
    let k_all: Vec<Vec<f32>> = totals.iter().map(|t| rand_vec(&mut rng, t * row_kv)).collect();
    let v_all: Vec<Vec<f32>> = totals.iter().map(|t| rand_vec(&mut rng, t * row_kv)).collect();
    // The last `len` tokens of each sequence are the final call's new tokens.
    let lens: Vec<usize> =
        totals.iter().map(|&t| if rng.random_bool(0.5) { 1 } else { rng.random_range(1..=t) }).collect();
    // Write each history prefix in random chunks, one sequence per call.
    for s in 0..nseq {
        let prefix = totals[s] - lens[s];
        let mut pos = 0;
        while pos < prefix {
            let n = rng.random_range(1..=prefix - pos);
            let chunk = [SeqChunk { block_table: &tables[s], row: 0, len: n, start_pos: pos }];
            write_kv(
                &geom,
                &mut k_cache,
                &mut v_cache,
                &k_all[s][pos * row_kv..(pos + n) * row_kv],
                &v_all[s][pos * row_kv..(pos + n) * row_kv],
                &chunk,
            )
            .unwrap();
            pos += n;
        }
    }
    // The packed call.
    let mut chunks = Vec::new();
    let mut k_new = Vec::new();
    let mut v_new = Vec::new();
    let mut row = 0;
    for s in 0..nseq {
        let start = totals[s] - lens[s];
        chunks.push(SeqChunk { block_table: &tables[s], row, len: lens[s], start_pos: start });
        k_new.extend_from_slice(&k_all[s][start * row_kv..]);
        v_new.extend_from_slice(&v_all[s][start * row_kv..]);
        row += lens[s];
    }
    let q = rand_vec(&mut rng, row * nh * hd);
    write_kv(&geom, &mut k_cache, &mut v_cache, &k_new, &v_new, &chunks).unwrap();
    let params = AttentionParams { num_heads: nh, scale: 1.0 / (hd as f32).sqrt(), sliding_window: case.window };
    let mut out = vec![f32::NAN; row * nh * hd];
    paged_attention(&geom, &params, &q, &k_cache, &v_cache, &chunks, &mut out).unwrap();
    for (s, c) in chunks.iter().enumerate() {
        let kr = round_trip::<E>(&k_all[s]);
        let vr = round_trip::<E>(&v_all[s]);
        let qs = &q[c.row * nh * hd..(c.row + c.len) * nh * hd];
        let want = reference(qs, &kr, &vr, c.start_pos, c.len, nh, nkv, hd, params.scale, case.window);
        let got = &out[c.row * nh * hd..(c.row + c.len) * nh * hd];
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= tol, "dtype {:?} bs {bs} seq {s} elem {i}: got {g}, want {w}", E::DTYPE);
        }
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case { block_size: 16, nh: 9, nkv: 3, hd: 64, window: None },
        Case { block_size: 1, nh: 4, nkv: 4, hd: 32, window: None },
        Case { block_size: 8, nh: 8, nkv: 2, hd: 40, window: None },
        Case { block_size: 32, nh: 6, nkv: 1, hd: 128, window: None },
        Case { block_size: 16, nh: 4, nkv: 2, hd: 64, window: Some(7) },
        Case { block_size: 5, nh: 2, nkv: 1, hd: 16, window: Some(20) },
    ]
}

#[test]
fn paged_attention_matches_reference_f32() {
    for (i, c) in cases().iter().enumerate() {
        for seed in 0..3 {
            check_case::<f32>(c, 100 * i as u64 + seed, 2e-5);
        }
    }
}

#[test]
fn paged_attention_matches_reference_f16() {
    for (i, c) in cases().iter().enumerate() {
        check_case::<f16>(c, 7 + i as u64, 2e-5);
    }
}

#[test]
fn paged_attention_matches_reference_bf16() {
    for (i, c) in cases().iter().enumerate() {
        check_case::<bf16>(c, 13 + i as u64, 2e-5);
    }
}

/// A token's output must not depend on how the sequence was chunked or what
/// else shares the call: prefill in one chunk == token-by-token decode, bitwise,
/// for every cache storage type.
/// With blocks of 16 and head dimensions 64/128 the decode tokens take the
/// AVX-512 decode item (where the CPU has it), the prefill the generic one.
#[test]
fn paged_attention_is_independent_of_chunking() {
    for (nh, nkv, hd, bs, n, window) in
        [(6, 2, 64, 4, 37, Some(9)), (9, 3, 64, 16, 83, None), (8, 2, 128, 16, 70, Some(33)), (5, 1, 64, 16, 40, None)]
    {
        chunking_case::<f32>(nh, nkv, hd, bs, n, window);
        chunking_case::<bf16>(nh, nkv, hd, bs, n, window);
        chunking_case::<f16>(nh, nkv, hd, bs, n, window);
    }
}

fn chunking_case<E: KvElement>(nh: usize, nkv: usize, hd: usize, bs: usize, n: usize, window: Option<usize>) {
    let mut rng = StdRng::seed_from_u64(5);
    let nblocks = n.div_ceil(bs);
    let geom = PagedGeometry { num_blocks: nblocks + 2, block_size: bs, num_kv_heads: nkv, head_dim: hd };
    let table: Vec<u32> = (0..nblocks as u32).rev().collect();
    let k = rand_vec(&mut rng, n * nkv * hd);
    let v = rand_vec(&mut rng, n * nkv * hd);
    let q = rand_vec(&mut rng, n * nh * hd);
    let params = AttentionParams { num_heads: nh, scale: 1.0 / (hd as f32).sqrt(), sliding_window: window };
    let mut kc = vec![E::default(); geom.cache_elems()];
    let mut vc = vec![E::default(); geom.cache_elems()];
    let whole = [SeqChunk { block_table: &table, row: 0, len: n, start_pos: 0 }];
    write_kv(&geom, &mut kc, &mut vc, &k, &v, &whole).unwrap();
    let mut out_whole = vec![0f32; n * nh * hd];
    paged_attention(&geom, &params, &q, &kc, &vc, &whole, &mut out_whole).unwrap();
    let mut kc2 = vec![E::default(); geom.cache_elems()];
    let mut vc2 = vec![E::default(); geom.cache_elems()];
    let (rk, rq) = (nkv * hd, nh * hd);
    for t in 0..n {
        let one = [SeqChunk { block_table: &table, row: 0, len: 1, start_pos: t }];
        write_kv(&geom, &mut kc2, &mut vc2, &k[t * rk..(t + 1) * rk], &v[t * rk..(t + 1) * rk], &one).unwrap();
        let mut o = vec![0f32; rq];
        paged_attention(&geom, &params, &q[t * rq..(t + 1) * rq], &kc2, &vc2, &one, &mut o).unwrap();
        assert_eq!(&o[..], &out_whole[t * rq..(t + 1) * rq], "{:?} nh {nh} hd {hd} bs {bs} token {t}", E::DTYPE);
    }
}

/// Regression guard for the AVX-512 decode item: a packed call of decode
/// tokens (many sequences, GQA groups of 1 to 7, windows, lengths around the
/// block and four-block boundaries) gives bitwise the generic item's output.
#[test]
fn decode_fast_path_equals_the_generic_item_bitwise() {
    for (nh, nkv, hd, window) in [
        (9, 3, 64, None),
        (9, 3, 64, Some(20)),
        (4, 1, 64, None),
        (8, 8, 64, Some(1)),
        (14, 2, 64, None),
        (8, 2, 128, None),
        (12, 2, 128, Some(50)),
    ] {
        fast_vs_generic::<f32>(nh, nkv, hd, window);
        fast_vs_generic::<bf16>(nh, nkv, hd, window);
        fast_vs_generic::<f16>(nh, nkv, hd, window);
    }
}

fn fast_vs_generic<E: KvElement>(nh: usize, nkv: usize, hd: usize, window: Option<usize>) {
    let mut rng = StdRng::seed_from_u64(nh as u64 * 1000 + hd as u64);
    let lens = [1usize, 15, 16, 17, 63, 64, 65, 100, 129, 200];
    let bs = 16;
    let nblocks: usize = lens.iter().map(|l| l.div_ceil(bs)).sum();
    let geom = PagedGeometry { num_blocks: nblocks, block_size: bs, num_kv_heads: nkv, head_dim: hd };
    let mut ids: Vec<u32> = (0..nblocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut tables = Vec::new();
    let mut next = 0;
    for l in lens {
        tables.push(ids[next..next + l.div_ceil(bs)].to_vec());
        next += l.div_ceil(bs);
    }
    let mut kc = vec![E::default(); geom.cache_elems()];
    let mut vc = vec![E::default(); geom.cache_elems()];
    // Stale, large data in unused slots must not leak into any result.
    for (i, (a, b)) in kc.iter_mut().zip(vc.iter_mut()).enumerate() {
        *a = E::from_f32(1000.0 + i as f32);
        *b = E::from_f32(-3000.0);
    }
    let row_kv = nkv * hd;
    for (s, &l) in lens.iter().enumerate() {
        let (k, v) = (rand_vec(&mut rng, l * row_kv), rand_vec(&mut rng, l * row_kv));
        let whole = [SeqChunk { block_table: &tables[s], row: 0, len: l, start_pos: 0 }];
        write_kv(&geom, &mut kc, &mut vc, &k, &v, &whole).unwrap();
    }
    let chunks: Vec<SeqChunk> = lens
        .iter()
        .enumerate()
        .map(|(s, &l)| SeqChunk { block_table: &tables[s], row: s, len: 1, start_pos: l - 1 })
        .collect();
    let q: Vec<f32> = rand_vec(&mut rng, lens.len() * nh * hd).iter().map(|x| x * 4.0).collect();
    let params = AttentionParams { num_heads: nh, scale: 1.0 / (hd as f32).sqrt(), sliding_window: window };
    let mut fast = vec![f32::NAN; q.len()];
    let mut generic = vec![f32::NAN; q.len()];
    paged_attention_impl(&geom, &params, &q, &kc, &vc, &chunks, &mut fast, true).unwrap();
    paged_attention_impl(&geom, &params, &q, &kc, &vc, &chunks, &mut generic, false).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&fast), bits(&generic), "{:?} nh {nh} nkv {nkv} hd {hd} window {window:?}", E::DTYPE);
    assert!(fast.iter().all(|x| x.is_finite() && x.abs() <= 1.0));
}

#[test]
fn paged_attention_rejects_bad_tables_and_overlaps() {
    let geom = PagedGeometry { num_blocks: 2, block_size: 4, num_kv_heads: 1, head_dim: 8 };
    let kc = vec![0f32; geom.cache_elems()];
    let params = AttentionParams { num_heads: 1, scale: 1.0, sliding_window: None };
    let q = vec![0f32; 16];
    let mut out = vec![0f32; 16];
    let short = [SeqChunk { block_table: &[0], row: 0, len: 2, start_pos: 3 }];
    assert!(matches!(
        paged_attention(&geom, &params, &q, &kc, &kc, &short, &mut out),
        Err(PagedAttentionError::BlockTableTooShort { needed: 2, have: 1 })
    ));
    let bad = [SeqChunk { block_table: &[5], row: 0, len: 1, start_pos: 0 }];
    assert!(matches!(
        paged_attention(&geom, &params, &q, &kc, &kc, &bad, &mut out),
        Err(PagedAttentionError::BlockOutOfRange { id: 5, .. })
    ));
    let overlap = [
        SeqChunk { block_table: &[0], row: 0, len: 2, start_pos: 0 },
        SeqChunk { block_table: &[1], row: 1, len: 1, start_pos: 0 },
    ];
    assert!(paged_attention(&geom, &params, &q, &kc, &kc, &overlap, &mut out).is_err());
    let gqa = AttentionParams { num_heads: 3, scale: 1.0, sliding_window: None };
    let geom2 = PagedGeometry { num_kv_heads: 2, ..geom };
    let kc2 = vec![0f32; geom2.cache_elems()];
    let (q3, mut out3) = (vec![0f32; 24], vec![0f32; 24]);
    assert!(paged_attention(&geom2, &gqa, &q3, &kc2, &kc2, &[], &mut out3).is_err());
}

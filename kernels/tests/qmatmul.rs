//! Correctness of the quantized matmul: every SIMD path against the scalar
//! reference (tight float bound), and the scalar reference against candle's
//! own dequantize-then-matmul (bound from 8-bit activation quantization).

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use salus_kernels::qmatmul::dequantize_row;
use salus_kernels::{GgmlType, KernelError, KernelPath, QuantMatrix};

/// Offsets of the f16 scale fields in a block, and whether each may be negative.
fn f16_fields(ty: GgmlType) -> &'static [(usize, bool)] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[(0, true)],
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[(0, false), (2, true)],
        GgmlType::Q4_K | GgmlType::Q5_K => &[(0, false), (2, false)],
        GgmlType::Q6_K => &[(208, true)],
    }
}

/// Random but valid GGML bytes for a `rows x cols` matrix.
fn random_ggml(ty: GgmlType, rows: usize, cols: usize, scale: f32, rng: &mut StdRng) -> Vec<u8> {
    let nblocks = rows * cols / ty.block_size();
    let mut bytes: Vec<u8> = (0..nblocks * ty.type_size()).map(|_| rng.random::<u8>()).collect();
    for blk in bytes.chunks_exact_mut(ty.type_size()) {
        for &(at, signed) in f16_fields(ty) {
            let mut v = rng.random_range(0.1f32..1.0) * scale;
            if signed && rng.random::<bool>() {
                v = -v;
            }
            blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    bytes
}

fn random_x(m: usize, cols: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..m * cols).map(|_| rng.random_range(-1.0f32..1.0) * if rng.random::<u8>() < 8 { 8.0 } else { 1.0 }).collect()
}

fn candle_dtype(ty: GgmlType) -> GgmlDType {
    match ty {
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
    }
}

/// Candle's dequantized weights, `[rows][cols]`.
fn candle_weights(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Vec<Vec<f32>> {
    let qt = qtensor_from_ggml(candle_dtype(ty), bytes, vec![rows, cols], &Device::Cpu).unwrap();
    qt.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap()
}

/// Shapes `(rows, cols, m)`: odd row counts, widths 32…4096, 1…300 activation rows.
fn shapes(ty: GgmlType) -> Vec<(usize, usize, usize)> {
    let bs = ty.block_size();
    let fix = |c: usize| c.div_ceil(bs) * bs;
    vec![
        (1, fix(32), 1),
        (17, fix(64), 3),
        (33, fix(4096), 2),
        (19, fix(256), 300),
        (50, fix(576), 16),
        (7, fix(1536), 5),
        (31, fix(96), 9),
    ]
}

fn simd_paths() -> Vec<KernelPath> {
    [KernelPath::Avx2, KernelPath::Avx512Vnni].into_iter().filter(|p| p.is_available()).collect()
}

#[test]
fn simd_paths_match_scalar_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    let paths = simd_paths();
    eprintln!("SIMD paths under test: {paths:?}");
    for ty in GgmlType::ALL {
        for (rows, cols, m) in shapes(ty) {
            let bytes = random_ggml(ty, rows, cols, 0.02, &mut rng);
            let w = QuantMatrix::from_ggml_bytes(ty, rows, cols, &bytes).unwrap();
            let x = random_x(m, cols, &mut rng);
            let mut want = vec![0f32; m * rows];
            w.matmul_with(KernelPath::Scalar, &x, m, &mut want).unwrap();
            // Per-output magnitude Σ|w||x| bounds the float reordering error.
            let mut wrow = vec![0f32; cols];
            let row_bytes = bytes.len() / rows;
            let mut mag = vec![0f32; m * rows];
            for r in 0..rows {
                dequantize_row(ty, &bytes[r * row_bytes..(r + 1) * row_bytes], &mut wrow);
                for i in 0..m {
                    mag[i * rows + r] = wrow.iter().zip(&x[i * cols..(i + 1) * cols]).map(|(a, b)| (a * b).abs()).sum();
                }
            }
            for &path in &paths {
                let mut got = vec![f32::NAN; m * rows];
                w.matmul_with(path, &x, m, &mut got).unwrap();
                for k in 0..m * rows {
                    let tol = 2e-5 * mag[k] + 1e-6;
                    assert!(
                        (got[k] - want[k]).abs() <= tol,
                        "{ty} {path:?} rows={rows} cols={cols} m={m} at {k}: got {} want {} tol {tol}",
                        got[k],
                        want[k]
                    );
                }
            }
        }
    }
}

#[test]
fn dequantize_matches_candle() {
    let mut rng = StdRng::seed_from_u64(11);
    for ty in GgmlType::ALL {
        let (rows, cols) = (5, 2 * ty.block_size());
        let bytes = random_ggml(ty, rows, cols, 0.05, &mut rng);
        let cw = candle_weights(ty, rows, cols, &bytes);
        let row_bytes = bytes.len() / rows;
        let mut ours = vec![0f32; cols];
        for r in 0..rows {
            dequantize_row(ty, &bytes[r * row_bytes..(r + 1) * row_bytes], &mut ours);
            let scale = cw[r].iter().fold(0f32, |a, v| a.max(v.abs()));
            for c in 0..cols {
                assert!((ours[c] - cw[r][c]).abs() <= 1e-6 * scale, "{ty} r={r} c={c}: {} vs {}", ours[c], cw[r][c]);
            }
        }
    }
}

/// Tolerance: activations are rounded to the nearest multiple of
/// `d = amax_group / 127`, so each is off by at most `amax_group / 254`, and the
/// result by at most `Σ_k |w_k| · amax_group(k) / 254`; plus 1e-5 relative for
/// f32 accumulation. Q6_K uses 16-element groups, the others 32.
#[test]
fn scalar_reference_matches_candle_dequantized_matmul() {
    let mut rng = StdRng::seed_from_u64(13);
    for ty in GgmlType::ALL {
        let group = if ty == GgmlType::Q6_K { 16 } else { 32 };
        for (rows, cols, m) in [(9, ty.block_size().max(64), 4), (21, 768, 3), (3, 4096, 2)] {
            let bytes = random_ggml(ty, rows, cols, 0.02, &mut rng);
            let cw = candle_weights(ty, rows, cols, &bytes);
            let w = QuantMatrix::from_ggml_bytes(ty, rows, cols, &bytes).unwrap();
            let x = random_x(m, cols, &mut rng);
            let mut got = vec![0f32; m * rows];
            w.matmul_with(KernelPath::Scalar, &x, m, &mut got).unwrap();
            let mut max_rel = 0f64;
            for i in 0..m {
                let xr = &x[i * cols..(i + 1) * cols];
                for r in 0..rows {
                    let mut exact = 0f64;
                    let mut bound = 0f64;
                    let mut mag = 0f64;
                    for c in 0..cols {
                        let g0 = c / group * group;
                        let amax = xr[g0..g0 + group].iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                        let wv = cw[r][c] as f64;
                        exact += wv * xr[c] as f64;
                        bound += wv.abs() * amax / 254.0;
                        mag += (wv * xr[c] as f64).abs();
                    }
                    let tol = bound * 1.001 + 1e-5 * mag + 1e-6;
                    let err = (got[i * rows + r] as f64 - exact).abs();
                    assert!(err <= tol, "{ty} rows={rows} cols={cols} i={i} r={r}: err {err} > tol {tol}");
                    max_rel = max_rel.max(err / mag.max(1e-12));
                }
            }
            // The bound is not vacuous: typical error is well below it but not zero.
            assert!(max_rel < 0.05, "{ty}: max relative error {max_rel}");
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let mut rng = StdRng::seed_from_u64(17);
    let (rows, cols, m) = (200, 576, 7);
    let bytes = random_ggml(GgmlType::Q4_1, rows, cols, 0.02, &mut rng);
    let w = QuantMatrix::from_ggml_bytes(GgmlType::Q4_1, rows, cols, &bytes).unwrap();
    let x = random_x(m, cols, &mut rng);
    let mut one = vec![0f32; m * rows];
    let mut two = vec![0f32; m * rows];
    salus_kernels::set_num_threads(1);
    w.matmul(&x, m, &mut one).unwrap();
    salus_kernels::set_num_threads(3);
    w.matmul(&x, m, &mut two).unwrap();
    salus_kernels::set_num_threads(2);
    assert_eq!(one, two);
}

#[test]
fn offsets_beyond_f16_fall_back_to_f32_scales() {
    // Q4_0 with d = 30000: the derived offset -8d overflows f16, so the pack
    // must switch to f32 scales and still agree with candle.
    let mut rng = StdRng::seed_from_u64(19);
    let (rows, cols) = (17, 64);
    let mut bytes = random_ggml(GgmlType::Q4_0, rows, cols, 0.02, &mut rng);
    bytes[0..2].copy_from_slice(&f16::from_f32(30000.0).to_le_bytes());
    let w = QuantMatrix::from_ggml_bytes(GgmlType::Q4_0, rows, cols, &bytes).unwrap();
    let cw = candle_weights(GgmlType::Q4_0, rows, cols, &bytes);
    let x: Vec<f32> = (0..cols).map(|c| if c == 0 { 1.0 } else { 0.0 }).collect();
    for path in KernelPath::ALL.into_iter().filter(|p| p.is_available()) {
        let mut out = vec![0f32; rows];
        w.matmul_with(path, &x, 1, &mut out).unwrap();
        assert!((out[0] - cw[0][0]).abs() <= 1e-3 * cw[0][0].abs(), "{path:?}: {} vs {}", out[0], cw[0][0]);
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let bytes = vec![0u8; 18 * 2];
    assert!(matches!(QuantMatrix::from_ggml_bytes(GgmlType::Q4_0, 1, 48, &bytes), Err(KernelError::BadWidth { .. })));
    assert!(matches!(
        QuantMatrix::from_ggml_bytes(GgmlType::Q4_0, 2, 64, &bytes),
        Err(KernelError::BadWeightBytes { .. })
    ));
    assert!(matches!(QuantMatrix::from_ggml_bytes(GgmlType::Q4_0, 0, 64, &[]), Err(KernelError::NoRows)));
    let w = QuantMatrix::from_ggml_bytes(GgmlType::Q4_0, 1, 64, &bytes).unwrap();
    let mut out = vec![0f32; 2];
    assert!(matches!(w.matmul(&[0.0; 63], 1, &mut out[..1]), Err(KernelError::BadLength { what: "activations", .. })));
    assert!(matches!(w.matmul(&[0.0; 64], 1, &mut out), Err(KernelError::BadLength { what: "output", .. })));
    assert!(w.matmul(&[], 0, &mut []).is_ok());
}

/// A stacked matrix computes exactly what its parts compute, row for row, on
/// every path (the fused Q/K/V and gate/up projections rely on it).
#[test]
fn stacked_matrix_equals_its_parts() {
    let mut rng = StdRng::seed_from_u64(23);
    let cols = 64;
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0] {
        let sizes = [32usize, 16, 21];
        let parts: Vec<QuantMatrix> = sizes
            .iter()
            .map(|&rows| {
                let b = random_ggml(ty, rows, cols, 0.02, &mut rng);
                QuantMatrix::from_ggml_bytes(ty, rows, cols, &b).unwrap()
            })
            .collect();
        let refs: Vec<&QuantMatrix> = parts.iter().collect();
        let stacked = QuantMatrix::concat_rows(&refs).unwrap();
        let total: usize = sizes.iter().sum();
        assert_eq!(stacked.rows(), total);
        for m in [1usize, 3, 7] {
            let x = random_x(m, cols, &mut rng);
            for path in KernelPath::ALL.into_iter().filter(|p| p.is_available()) {
                let mut out = vec![0f32; m * total];
                stacked.matmul_with(path, &x, m, &mut out).unwrap();
                let mut at = 0;
                for (p, &rows) in parts.iter().zip(&sizes) {
                    let mut part = vec![0f32; m * rows];
                    p.matmul_with(path, &x, m, &mut part).unwrap();
                    for i in 0..m {
                        assert_eq!(
                            &out[i * total + at..i * total + at + rows],
                            &part[i * rows..(i + 1) * rows],
                            "{ty} {path:?} m={m}"
                        );
                    }
                    at += rows;
                }
            }
        }
    }
    // A partial tile may only come last; types and widths must agree.
    let mut rng = StdRng::seed_from_u64(29);
    let odd =
        QuantMatrix::from_ggml_bytes(GgmlType::Q4_1, 17, 64, &random_ggml(GgmlType::Q4_1, 17, 64, 0.02, &mut rng))
            .unwrap();
    let full =
        QuantMatrix::from_ggml_bytes(GgmlType::Q4_1, 16, 64, &random_ggml(GgmlType::Q4_1, 16, 64, 0.02, &mut rng))
            .unwrap();
    let wide =
        QuantMatrix::from_ggml_bytes(GgmlType::Q4_1, 16, 96, &random_ggml(GgmlType::Q4_1, 16, 96, 0.02, &mut rng))
            .unwrap();
    let q8 = QuantMatrix::from_ggml_bytes(GgmlType::Q8_0, 16, 64, &random_ggml(GgmlType::Q8_0, 16, 64, 0.02, &mut rng))
        .unwrap();
    assert!(QuantMatrix::concat_rows(&[&full, &odd]).is_ok());
    assert!(matches!(QuantMatrix::concat_rows(&[&odd, &full]), Err(KernelError::Concat(_))));
    assert!(matches!(QuantMatrix::concat_rows(&[&full, &wide]), Err(KernelError::Concat(_))));
    assert!(matches!(QuantMatrix::concat_rows(&[&full, &q8]), Err(KernelError::Concat(_))));
    assert!(matches!(QuantMatrix::concat_rows(&[]), Err(KernelError::NoRows)));
}

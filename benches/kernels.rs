//! Quantized-matmul micro-benchmarks: Salus' kernels (each available path)
//! against candle 0.11's `QMatMul` on the same matrices.
//!
//! `cargo bench --bench kernels [-- TYPE...]` (e.g. `-- Q4_1 Q8_0`).
//! Prints, per block type, shape and activation rows `m`:
//! - GEMV (m = 1, 4, 8, 16): GB/s of weight bytes streamed per call (our packed
//!   bytes; candle's GGML bytes) and the speed-up over candle;
//! - GEMM (m = 256): GFLOP/s-equivalent (2·m·rows·cols / time).
//!
//! Shapes are the default model's (SmolLM2-135M: hidden 576, FFN 1536, vocab
//! 49152); K-quants need widths that are multiples of 256, so they use 576x1536.
//! Threads: `SALUS_BENCH_THREADS` (default: physical cores) for ours; candle uses rayon.
//!
//! Then paged attention for decode (one query token per sequence, the default
//! model's 9 query / 3 KV heads of 64, blocks of 16 scattered over the pool):
//! µs per layer call for 1 and 8 sequences of 300 cached tokens, f32 and bf16
//! KV, and the KV bytes read per second.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use salus_kernels::paged_attention::{paged_attention, AttentionParams, KvElement, PagedGeometry, SeqChunk};
use salus_kernels::{GgmlType, KernelPath, QuantMatrix};
use std::time::{Duration, Instant};

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

/// Mean seconds per call of `f`, after a warm-up, over at least `budget`.
fn time_it(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget || n < 3 {
        f();
        n += 1;
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn main() {
    if let Some(n) = std::env::var("SALUS_BENCH_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        salus_kernels::set_num_threads(n);
    }
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let types: Vec<GgmlType> = GgmlType::ALL
        .into_iter()
        .filter(|t| args.is_empty() || args.iter().any(|a| a.eq_ignore_ascii_case(t.name())))
        .collect();
    let budget = Duration::from_millis(200);
    let dev = Device::Cpu;
    let paths: Vec<KernelPath> =
        [KernelPath::Avx2, KernelPath::Avx512Vnni].into_iter().filter(|p| p.is_available()).collect();
    println!(
        "salus-kernels quantized matmul, {} threads, best path {}",
        salus_kernels::num_threads(),
        KernelPath::best().name()
    );
    println!(
        "{:<5} {:>11} {:>4} {:<11} {:>10} {:>9} {:>9} {:>8}",
        "type", "rows x cols", "m", "impl", "time", "GB/s", "GFLOP/s", "vs candle"
    );
    for (nseq, ctx) in [(1usize, 300usize), (8, 300)] {
        paged_decode::<f32>("f32", nseq, ctx);
        paged_decode::<half::bf16>("bf16", nseq, ctx);
    }
    for ty in types {
        let shapes: &[(usize, usize)] = match ty {
            GgmlType::Q4_1 | GgmlType::Q8_0 => &[(576, 576), (1536, 576), (576, 1536), (49152, 576)],
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q5_1 => &[(1536, 576), (576, 1536)],
            _ => &[(576, 1536)],
        };
        for &(rows, cols) in shapes {
            let w = Tensor::randn(0f32, 0.05, (rows, cols), &dev).unwrap();
            let qt = QTensor::quantize(&w, candle_dtype(ty)).unwrap();
            let ggml = qt.data().unwrap().into_owned();
            let ours = QuantMatrix::from_ggml_bytes(ty, rows, cols, &ggml).unwrap();
            let theirs = QMatMul::from_qtensor(qt).unwrap();
            for m in [1usize, 4, 8, 16, 256] {
                if rows > 10_000 && m > 16 {
                    continue; // the output projection only runs on last positions
                }
                let x = Tensor::randn(0f32, 1.0, (m, cols), &dev).unwrap();
                let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut out = vec![0f32; m * rows];
                let flops = 2.0 * (m * rows * cols) as f64;
                let tc = time_it(budget, || {
                    std::hint::black_box(theirs.forward(&x).unwrap());
                });
                let row = |name: &str, t: f64, bytes: usize, speedup: Option<f64>| {
                    println!(
                        "{:<5} {:>11} {:>4} {:<11} {:>8.1}us {:>9.2} {:>9.2} {:>8}",
                        ty.name(),
                        format!("{rows}x{cols}"),
                        m,
                        name,
                        t * 1e6,
                        bytes as f64 / t / 1e9,
                        flops / t / 1e9,
                        speedup.map(|s| format!("{s:.2}x")).unwrap_or_default()
                    );
                };
                row("candle", tc, ggml.len(), None);
                for &p in &paths {
                    let t = time_it(budget, || {
                        ours.matmul_with(p, &xv, m, &mut out).unwrap();
                        std::hint::black_box(&out);
                    });
                    row(p.name(), t, ours.packed_bytes(), Some(tc / t));
                }
                if m == 1 && rows <= 1536 {
                    let t = time_it(budget, || {
                        ours.matmul_with(KernelPath::Scalar, &xv, m, &mut out).unwrap();
                    });
                    row("scalar", t, ours.packed_bytes(), Some(tc / t));
                }
            }
        }
    }
}

/// Decode attention over `nseq` sequences of `ctx` cached tokens each, whose
/// blocks are spread over the pool in a shuffled order (as after many
/// admissions and frees): best of 5 timings of `reps` calls.
fn paged_decode<E: KvElement>(name: &str, nseq: usize, ctx: usize) {
    let (bs, nkv, hd, nh) = (16usize, 3usize, 64usize, 9usize);
    let per_seq = ctx.div_ceil(bs) + 1;
    let num_blocks = per_seq * nseq * 4;
    let geom = PagedGeometry { num_blocks, block_size: bs, num_kv_heads: nkv, head_dim: hd };
    let kc: Vec<E> = (0..geom.cache_elems()).map(|i| E::from_f32(((i * 7919) % 1000) as f32 * 1e-3)).collect();
    let vc: Vec<E> = (0..geom.cache_elems()).map(|i| E::from_f32(((i * 104_729) % 1000) as f32 * 1e-3)).collect();
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    let mut state = 12_345u64;
    for i in (1..ids.len()).rev() {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        ids.swap(i, (state >> 33) as usize % (i + 1));
    }
    let tables: Vec<Vec<u32>> = (0..nseq).map(|i| ids[i * per_seq..(i + 1) * per_seq].to_vec()).collect();
    let seqs: Vec<SeqChunk> =
        (0..nseq).map(|i| SeqChunk { block_table: &tables[i], row: i, len: 1, start_pos: ctx - 1 }).collect();
    let q: Vec<f32> = (0..nseq * nh * hd).map(|i| ((i * 31) % 17) as f32 * 0.05).collect();
    let mut out = vec![0f32; nseq * nh * hd];
    let params = AttentionParams { num_heads: nh, scale: 1.0 / (hd as f32).sqrt(), sliding_window: None };
    let mut call = || paged_attention(&geom, &params, &q, &kc, &vc, &seqs, &mut out).expect("paged attention");
    let t = (0..5).map(|_| time_it(Duration::from_millis(200), &mut call)).fold(f64::INFINITY, f64::min);
    let bytes = nseq * ctx * nkv * hd * 2 * std::mem::size_of::<E>();
    println!(
        "paged attention decode {name:>4}: {nseq} seqs x {ctx} tokens: {:8.1} us/layer  {:6.2} GB/s of KV",
        t * 1e6,
        bytes as f64 / t / 1e9
    );
}

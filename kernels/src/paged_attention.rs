//! CPU paged attention: attention that reads keys and values through per-sequence
//! block tables, so continuous batching never copies a sequence's history into a
//! contiguous buffer.
//!
//! # Cache layout
//! A layer's K (and, separately, V) cache is one flat slice of `num_blocks` blocks.
//! Block `b` holds `block_size` token slots for every KV head. Values are laid out
//! `[block][kv_head][slot][head_dim]`; keys are transposed within a block,
//! `[block][kv_head][head_dim][slot]`, so the scores of a query against all keys
//! of a block are `head_dim` vector multiply-adds across slots (no horizontal
//! reduction per key). Either way, what one KV head needs from one block is a
//! single contiguous run of `block_size * head_dim` elements. Token position `p`
//! of a sequence lives in block `block_table[p / block_size]`, slot `p % block_size`.
//!
//! # Algorithm
//! Work is split into items of (sequence, KV head, chunk of up to [`QUERY_CHUNK`]
//! query tokens) and spread over the kernels' persistent pool ([`crate::pool`];
//! nothing is spawned per call). An item walks the sequence's blocks once, converts a block of
//! f16/bf16 keys and values to f32 into a small per-thread scratch buffer (shared by
//! every query head of the GQA group and every query token of the chunk), and keeps an
//! online (streaming) softmax per query: running max, running sum, f32 accumulator.
//! Prefill chunks over a cached prefix are causally masked per query token; a sliding
//! window restricts a query at position `p` to keys at positions `p - window + 1 ..= p`
//! (the Hugging Face convention: `window` keys including itself).
//!
//! The result for one query token depends only on that token's position and the
//! cache contents, never on which other tokens or sequences share the call: blocks
//! that hold no visible key for a query are skipped for that query, so a token
//! computed inside a prefill chunk, a decode step or a batch of many sequences gets
//! bit-identical output. Continuous batching relies on that for reproducibility.
//!
//! # SIMD
//! The inner loops (scores across a block's slots, scaled accumulation over
//! `chunks_exact(16)`) are plain element-wise multiply-adds compiled three times: for
//! AVX-512, for AVX2+FMA and portable. The best version is picked at runtime
//! (`is_x86_feature_detected!`) once per call. Decode tokens (one query per
//! sequence, the batched steady state) with blocks of 16 and head dimension
//! 64/128 take an explicit AVX-512 item (`decode_avx512`) that keeps many
//! independent FMA chains in flight and widens f16/bf16 in registers; it
//! computes every element with the same operations in the same order, so its
//! output is bitwise the generic item's (tested).

use crate::math::exp_nonpositive;

#[cfg(target_arch = "x86_64")]
mod decode_avx512;
mod element;

pub use element::{KvDtype, KvElement};

/// Query tokens of one sequence handled by one work item.
pub const QUERY_CHUNK: usize = 16;

/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 512;

/// Shape of a paged KV cache (one layer's K or V slice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedGeometry {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl PagedGeometry {
    /// Elements of one block (all KV heads).
    pub fn block_elems(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }
    /// Elements of a whole layer's K (or V) cache.
    pub fn cache_elems(&self) -> usize {
        self.num_blocks * self.block_elems()
    }
    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
}

/// One sequence's part of a call: its new tokens (rows of q/k/v/out) and where
/// its history lives.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// Physical block ids, in position order.
    pub block_table: &'a [u32],
    /// Row of this sequence's first new token in `q`, `k`, `v` and `out`.
    pub row: usize,
    /// Number of new tokens (>= 1).
    pub len: usize,
    /// Position of the first new token = tokens already cached before this call.
    pub start_pos: usize,
}

/// Attention parameters.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams {
    /// Query heads (a multiple of the geometry's KV heads).
    pub num_heads: usize,
    /// Score scale, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// Keys visible to a query: at most this many most recent positions (itself included).
    pub sliding_window: Option<usize>,
}

/// Inconsistent arguments. The messages carry sizes only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PagedAttentionError {
    #[error("paged attention: {0}")]
    Shape(String),
    #[error("paged attention: block table needs {needed} blocks but has {have}")]
    BlockTableTooShort { needed: usize, have: usize },
    #[error("paged attention: block id {id} out of range (cache has {num_blocks} blocks)")]
    BlockOutOfRange { id: u32, num_blocks: usize },
}

fn shape_err(msg: impl Into<String>) -> PagedAttentionError {
    PagedAttentionError::Shape(msg.into())
}

fn validate(
    geom: &PagedGeometry,
    rows: usize,
    seqs: &[SeqChunk<'_>],
    cache_len: usize,
) -> Result<(), PagedAttentionError> {
    if geom.block_size == 0 || geom.num_kv_heads == 0 || geom.head_dim == 0 {
        return Err(shape_err("block_size, num_kv_heads and head_dim must be > 0"));
    }
    if geom.head_dim > MAX_HEAD_DIM {
        return Err(shape_err(format!("head_dim {} exceeds {MAX_HEAD_DIM}", geom.head_dim)));
    }
    if cache_len != geom.cache_elems() {
        return Err(shape_err(format!("cache has {cache_len} elements, geometry needs {}", geom.cache_elems())));
    }
    let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(seqs.len());
    for s in seqs {
        if s.len == 0 {
            return Err(shape_err("a sequence contributes no tokens"));
        }
        if s.row + s.len > rows {
            return Err(shape_err(format!("rows {}..{} exceed the {rows} input rows", s.row, s.row + s.len)));
        }
        let needed = geom.blocks_for(s.start_pos + s.len);
        if s.block_table.len() < needed {
            return Err(PagedAttentionError::BlockTableTooShort { needed, have: s.block_table.len() });
        }
        if let Some(&id) = s.block_table[..needed].iter().find(|&&id| id as usize >= geom.num_blocks) {
            return Err(PagedAttentionError::BlockOutOfRange { id, num_blocks: geom.num_blocks });
        }
        ranges.push((s.row, s.row + s.len));
    }
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(shape_err("sequences overlap in the input rows"));
    }
    Ok(())
}

/// Writes the new keys and values (`k`, `v`: `[rows, num_kv_heads, head_dim]`, f32)
/// of every sequence into their cache slots (positions `start_pos..start_pos+len`).
pub fn write_kv<E: KvElement>(
    geom: &PagedGeometry,
    k_cache: &mut [E],
    v_cache: &mut [E],
    k: &[f32],
    v: &[f32],
    seqs: &[SeqChunk<'_>],
) -> Result<(), PagedAttentionError> {
    let row_elems = geom.num_kv_heads * geom.head_dim;
    if k.len() != v.len() || !k.len().is_multiple_of(row_elems) {
        return Err(shape_err("k and v must both be [rows, num_kv_heads, head_dim]"));
    }
    if v_cache.len() != k_cache.len() {
        return Err(shape_err("k and v caches differ in size"));
    }
    let rows = k.len() / row_elems;
    validate(geom, rows, seqs, k_cache.len())?;
    let hd = geom.head_dim;
    let bs = geom.block_size;
    for s in seqs {
        for t in 0..s.len {
            let pos = s.start_pos + t;
            let block = s.block_table[pos / bs] as usize;
            let slot = pos % bs;
            let src_row = (s.row + t) * row_elems;
            for h in 0..geom.num_kv_heads {
                let base = (block * geom.num_kv_heads + h) * bs * hd;
                let src = src_row + h * hd;
                // Keys transposed within the block: [head_dim][slot].
                for (d, x) in k[src..src + hd].iter().enumerate() {
                    k_cache[base + d * bs + slot] = E::from_f32(*x);
                }
                let dst = base + slot * hd;
                E::store(&v[src..src + hd], &mut v_cache[dst..dst + hd]);
            }
        }
    }
    Ok(())
}

/// Attention of every sequence's new tokens over its cached keys and values
/// (which must already include the new tokens: call [`write_kv`] first).
///
/// `q`: `[rows, num_heads, head_dim]`; `out`: `[rows, num_heads * head_dim]`.
/// Rows not covered by any sequence are left untouched.
pub fn paged_attention<E: KvElement>(
    geom: &PagedGeometry,
    params: &AttentionParams,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    seqs: &[SeqChunk<'_>],
    out: &mut [f32],
) -> Result<(), PagedAttentionError> {
    paged_attention_impl(geom, params, q, k_cache, v_cache, seqs, out, true)
}

/// [`paged_attention`]; `fast_decode: false` keeps decode tokens on the
/// generic item too (tests compare the two).
#[allow(clippy::too_many_arguments)]
fn paged_attention_impl<E: KvElement>(
    geom: &PagedGeometry,
    params: &AttentionParams,
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    seqs: &[SeqChunk<'_>],
    out: &mut [f32],
    fast_decode: bool,
) -> Result<(), PagedAttentionError> {
    let hd = geom.head_dim;
    if params.num_heads == 0 || !params.num_heads.is_multiple_of(geom.num_kv_heads) {
        return Err(shape_err(format!(
            "{} query heads is not a multiple of {} KV heads",
            params.num_heads, geom.num_kv_heads
        )));
    }
    if params.sliding_window == Some(0) {
        return Err(shape_err("sliding window must be > 0"));
    }
    let row_elems = params.num_heads * hd;
    if !q.len().is_multiple_of(row_elems) || out.len() != q.len() {
        return Err(shape_err("q and out must both be [rows, num_heads * head_dim]"));
    }
    if v_cache.len() != k_cache.len() {
        return Err(shape_err("k and v caches differ in size"));
    }
    validate(geom, q.len() / row_elems, seqs, k_cache.len())?;

    let mut items = Vec::new();
    let mut work = 0usize;
    for (si, s) in seqs.iter().enumerate() {
        let ctx = s.start_pos + s.len;
        for g in 0..geom.num_kv_heads {
            let mut t0 = 0;
            while t0 < s.len {
                let t1 = (t0 + QUERY_CHUNK).min(s.len);
                items.push(WorkItem { seq: si, kv_head: g, t0, t1 });
                work += (t1 - t0) * ctx.min(params.sliding_window.unwrap_or(usize::MAX));
                t0 = t1;
            }
        }
    }
    let ctx =
        Ctx { geom: *geom, params: *params, q, k_cache, v_cache, seqs, out: SendPtr(out.as_mut_ptr()), fast_decode };
    let path = SimdPath::detect();
    // Small calls (a handful of short decodes) are cheaper than a fork-join.
    if items.len() == 1 || work * hd * params.num_heads / geom.num_kv_heads < 32 * 1024 {
        for it in &items {
            run_dispatch(path, &ctx, it);
        }
    } else {
        crate::pool::parallel_for(items.len(), &|i| run_dispatch(path, &ctx, &items[i]));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct WorkItem {
    seq: usize,
    kv_head: usize,
    t0: usize,
    t1: usize,
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only used to write disjoint regions of `out` (each work item
// owns rows t0..t1 of one sequence and the columns of one KV head's query group;
// `validate` rejects overlapping sequences), and `out` outlives the parallel loop.
unsafe impl Send for SendPtr {}
// SAFETY: as above; shared references to the wrapper only hand out the pointer value.
unsafe impl Sync for SendPtr {}

struct Ctx<'a, E> {
    geom: PagedGeometry,
    params: AttentionParams,
    q: &'a [f32],
    k_cache: &'a [E],
    v_cache: &'a [E],
    seqs: &'a [SeqChunk<'a>],
    out: SendPtr,
    /// Decode tokens may take [`decode_avx512`] where it applies.
    fast_decode: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimdPath {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl SimdPath {
    fn detect() -> SimdPath {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return SimdPath::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return SimdPath::Avx2;
            }
        }
        SimdPath::Portable
    }
}

fn run_dispatch<E: KvElement>(path: SimdPath, ctx: &Ctx<'_, E>, it: &WorkItem) {
    // The scratch is taken here, outside the `target_feature` functions: the body
    // must be inlined into them (a closure would not inherit the features and
    // `mul_add` would become a libm call).
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let sc = &mut *guard;
        // The common shapes get instances with the block size and head dimension
        // as constants: the per-block loops then compile to straight vector
        // code (same operations in the same order, so the same results).
        let shape = match (ctx.geom.block_size, ctx.geom.head_dim) {
            (16, 64) => Shape::Bs16Hd64,
            (16, 128) => Shape::Bs16Hd128,
            _ => Shape::Any,
        };
        #[cfg(target_arch = "x86_64")]
        if path == SimdPath::Avx512
            && ctx.fast_decode
            && decode_avx512::handles(ctx.geom.block_size, ctx.geom.head_dim, it.t1 - it.t0)
        {
            // SAFETY: `detect` verified avx512f and fma; the call was validated
            // and `handles` checked the item's shape, head dimension included.
            match ctx.geom.head_dim {
                64 => unsafe { decode_avx512::item::<E, 64>(ctx, it, sc) },
                _ => unsafe { decode_avx512::item::<E, 128>(ctx, it, sc) },
            }
            return;
        }
        match (path, shape) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` verified at runtime that the CPU supports avx512f and fma.
            (SimdPath::Avx512, Shape::Bs16Hd64) => unsafe { run_avx512::<E, 16, 64>(ctx, it, sc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (avx512f and fma verified by `detect`).
            (SimdPath::Avx512, Shape::Bs16Hd128) => unsafe { run_avx512::<E, 16, 128>(ctx, it, sc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (avx512f and fma verified by `detect`).
            (SimdPath::Avx512, Shape::Any) => unsafe { run_avx512::<E, 0, 0>(ctx, it, sc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` verified at runtime that the CPU supports avx2 and fma.
            (SimdPath::Avx2, Shape::Bs16Hd64) => unsafe { run_avx2::<E, 16, 64>(ctx, it, sc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (avx2 and fma verified by `detect`).
            (SimdPath::Avx2, Shape::Bs16Hd128) => unsafe { run_avx2::<E, 16, 128>(ctx, it, sc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above (avx2 and fma verified by `detect`).
            (SimdPath::Avx2, Shape::Any) => unsafe { run_avx2::<E, 0, 0>(ctx, it, sc) },
            (SimdPath::Portable, _) => run_item_inner::<E, false, 0, 0>(ctx, it, sc),
        }
    })
}

/// Block size and head dimension pairs with their own compiled instance.
#[derive(Clone, Copy)]
enum Shape {
    Bs16Hd64,
    Bs16Hd128,
    Any,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<E: KvElement, const BS: usize, const HD: usize>(
    ctx: &Ctx<'_, E>,
    it: &WorkItem,
    sc: &mut Scratch,
) {
    run_item_inner::<E, true, BS, HD>(ctx, it, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<E: KvElement, const BS: usize, const HD: usize>(ctx: &Ctx<'_, E>, it: &WorkItem, sc: &mut Scratch) {
    run_item_inner::<E, true, BS, HD>(ctx, it, sc)
}

/// `a * b + c`, fused when the caller was compiled with FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Largest of `s[lo..hi]` (NaN never wins), over all of `s` with the other
/// slots masked out: fixed-width lanes, so it vectorizes.
#[inline(always)]
fn masked_max(s: &[f32], lo: usize, hi: usize) -> f32 {
    // `a > b ? a : b` rather than `f32::max`: the same result here (NaN never
    // wins, the lanes never hold NaN) but one vector instruction.
    let mut lanes = [f32::NEG_INFINITY; 16];
    for (j, x) in s.iter().enumerate() {
        let v = if j >= lo && j < hi { *x } else { f32::NEG_INFINITY };
        let l = &mut lanes[j % 16];
        *l = if v > *l { v } else { *l };
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            let (a, b) = (lanes[i], lanes[i + w]);
            lanes[i] = if b > a { b } else { a };
        }
    }
    lanes[0]
}

/// One block of the online softmax of one query: from the block's `scores`
/// (visible slots `lo..hi`) updates the running max `m` and sum `l`, writes
/// `e^(s_j - m)` into `p` (0 outside `lo..hi`) and returns the factor
/// `e^(m_old - m_new)` that rescales what was accumulated so far. Every path
/// calls this one function, so they agree bit for bit.
#[inline(always)]
fn softmax_block(scores: &[f32], lo: usize, hi: usize, m: &mut f32, l: &mut f32, p: &mut [f32]) -> f32 {
    let mx = masked_max(scores, lo, hi);
    let m_old = *m;
    let m_new = m_old.max(mx);
    // The exponentials are computed for the whole block (a loop that
    // vectorizes; slots outside the visible range get 0).
    let corr = if m_old == m_new { 1.0 } else { exp_nonpositive(m_old - m_new) };
    let mut psum = [0f32; 16];
    for (j, (pj, sj)) in p.iter_mut().zip(scores).enumerate() {
        let e = exp_nonpositive(*sj - m_new);
        *pj = if j >= lo && j < hi { e } else { 0.0 };
        psum[j % 16] += *pj;
    }
    *l = *l * corr + tree_sum(psum);
    *m = m_new;
    corr
}

/// Sum of 16 lanes by halving (a fixed order, so results are reproducible).
#[inline(always)]
fn tree_sum(mut lanes: [f32; 16]) -> f32 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            lanes[i] += lanes[i + w];
        }
    }
    lanes[0]
}

/// `acc = acc · corr + Σ_j p[j] · v[j]` (`v`: one row of `acc.len()` values per
/// `p[j]`), 64 lanes of the head dimension at a time held in registers, so the
/// four 16-lane chains run side by side; each lane sums over `j` in order.
#[inline(always)]
fn accumulate_pv<const FMA: bool>(acc: &mut [f32], corr: f32, p: &[f32], v: &[f32]) {
    let hd = acc.len();
    let mut c0 = 0;
    while c0 + 64 <= hd {
        pv_lanes::<FMA, 64>(acc, c0, corr, p, v);
        c0 += 64;
    }
    while c0 + 16 <= hd {
        pv_lanes::<FMA, 16>(acc, c0, corr, p, v);
        c0 += 16;
    }
    for c in c0..hd {
        let mut a = acc[c] * corr;
        for (j, pj) in p.iter().enumerate() {
            a = madd::<FMA>(*pj, v[j * hd + c], a);
        }
        acc[c] = a;
    }
}

/// Lanes `c0..c0 + W` of [`accumulate_pv`], kept in registers across all keys.
#[inline(always)]
fn pv_lanes<const FMA: bool, const W: usize>(acc: &mut [f32], c0: usize, corr: f32, p: &[f32], v: &[f32]) {
    let hd = acc.len();
    let mut a = [0f32; W];
    for i in 0..W {
        a[i] = acc[c0 + i] * corr;
    }
    for (j, pj) in p.iter().enumerate() {
        let vr = &v[j * hd + c0..j * hd + c0 + W];
        for i in 0..W {
            a[i] = madd::<FMA>(*pj, vr[i], a[i]);
        }
    }
    acc[c0..c0 + W].copy_from_slice(&a);
}

/// Hints the CPU to bring `data` into cache (no effect on results).
#[inline(always)]
fn prefetch<E>(data: &[E]) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = data.as_ptr() as *const i8;
        let bytes = std::mem::size_of_val(data);
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch never faults and has no architectural effect;
            // the address is inside `data` anyway.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Per-thread scratch, reused across calls so the hot path does not allocate.
#[derive(Default)]
struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    /// Scores of up to four queries against one block, `[4][block_size]`.
    s: Vec<f32>,
    p: Vec<f32>,
    /// Each quad of visible queries interleaved, `[quad][head_dim][4]`.
    qt: Vec<f32>,
    /// Per-query rescale factors of the current block (decode path).
    corr: Vec<f32>,
    /// (query, first slot, end slot) of the queries that see the current block.
    vis: Vec<(usize, usize, usize)>,
    /// The queries `qt` holds, in order: it is rebuilt only when the set of
    /// visible queries changes (for a decode token, never within an item).
    qt_for: Vec<usize>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

fn resize(v: &mut Vec<f32>, n: usize, val: f32) {
    v.clear();
    v.resize(n, val);
}

#[inline(always)]
/// One work item. `BS` / `HD`: the block size / head dimension when known at
/// compile time (the caller checked they equal the geometry's), else 0.
fn run_item_inner<E: KvElement, const FMA: bool, const BS: usize, const HD: usize>(
    ctx: &Ctx<'_, E>,
    it: &WorkItem,
    sc: &mut Scratch,
) {
    let geom = &ctx.geom;
    let hd = if HD > 0 { HD } else { geom.head_dim };
    let bs = if BS > 0 { BS } else { geom.block_size };
    let group = ctx.params.num_heads / geom.num_kv_heads;
    let s = &ctx.seqs[it.seq];
    let nt = it.t1 - it.t0;
    let nq = nt * group;

    load_scaled_queries(ctx, it, hd, &mut sc.q);
    resize(&mut sc.acc, nq * hd, 0.0);
    resize(&mut sc.m, nq, f32::NEG_INFINITY);
    resize(&mut sc.l, nq, 0.0);
    resize(&mut sc.s, 4 * bs, 0.0);
    resize(&mut sc.p, bs, 0.0);
    sc.qt_for.clear();
    let window = ctx.params.sliding_window.unwrap_or(usize::MAX);
    // Visible keys of the query at position p: p + 1 - window ..= p.
    let first_pos = s.start_pos + it.t0;
    let last_pos = s.start_pos + it.t1 - 1;
    let run = bs * hd;
    for b in (first_pos + 1).saturating_sub(window) / bs..=last_pos / bs {
        let phys = s.block_table[b] as usize;
        let base = (phys * geom.num_kv_heads + it.kv_head) * run;
        let kb_src = &ctx.k_cache[base..base + run];
        let vb_src = &ctx.v_cache[base..base + run];
        if b < last_pos / bs {
            // The next block is elsewhere in memory (paged): ask for its K and V
            // now, so the loads overlap this block's arithmetic instead of
            // stalling at its start.
            let next = (s.block_table[b + 1] as usize * geom.num_kv_heads + it.kv_head) * run;
            prefetch(&ctx.k_cache[next..next + run]);
            prefetch(&ctx.v_cache[next..next + run]);
        }
        let block_start = b * bs;
        // Slots of this block that exist for the latest query.
        let valid = (last_pos + 1 - block_start).min(bs);
        let (kb, vb): (&[f32], &[f32]) = match (E::as_f32(kb_src), E::as_f32(vb_src)) {
            (Some(k), Some(v)) => (k, v),
            _ => {
                // Grow only: every slot read below is written first (K whole,
                // V up to `valid`), so the buffers need no clearing per block.
                if sc.k.len() < run {
                    sc.k.resize(run, 0.0);
                    sc.v.resize(run, 0.0);
                }
                E::load(kb_src, &mut sc.k[..run]);
                E::load(&vb_src[..valid * hd], &mut sc.v[..valid * hd]);
                (&sc.k, &sc.v)
            }
        };
        // The queries that see at least one key of this block, with their ranges.
        sc.vis.clear();
        for t in 0..nt {
            let p = s.start_pos + it.t0 + t;
            let j0 = (p + 1).saturating_sub(window).max(block_start);
            let j1 = (p + 1).min(block_start + valid); // exclusive
            if j0 < j1 {
                for hg in 0..group {
                    sc.vis.push((t * group + hg, j0 - block_start, j1 - block_start));
                }
            }
        }
        // Four queries at a time: each key row is loaded once for all four, and
        // the four dot products are independent chains (one chain alone would
        // wait on the multiply-add latency). Each query's score still sums over
        // d in order with the same multiply-add as the scalar tail, so a key's
        // score does not depend on the path, the lanes, or the other queries.
        // Slots past `valid` hold finite stale or zero data and are never used.
        // Each quad's queries interleaved, `[d][4]`: one load per d feeds all four.
        if sc.vis.len() != sc.qt_for.len() || sc.vis.iter().zip(&sc.qt_for).any(|(v, q)| v.0 != *q) {
            sc.qt_for.clear();
            sc.qt_for.extend(sc.vis.iter().map(|v| v.0));
            resize(&mut sc.qt, sc.vis.len().div_ceil(4) * 4 * hd, 0.0);
            for (qn, quad) in sc.vis.chunks(4).enumerate() {
                let pick = |k: usize| quad[k.min(quad.len() - 1)].0;
                let qt = &mut sc.qt[qn * 4 * hd..(qn + 1) * 4 * hd];
                for k in 0..4 {
                    let q = &sc.q[pick(k) * hd..(pick(k) + 1) * hd];
                    for (d, x) in q.iter().enumerate() {
                        qt[d * 4 + k] = *x;
                    }
                }
            }
        }
        for (qn, quad) in sc.vis.chunks(4).enumerate() {
            let qt = &sc.qt[qn * 4 * hd..(qn + 1) * 4 * hd];
            let kb = &kb[..hd * bs];
            let mut c0 = 0;
            while c0 + 16 <= bs {
                let mut acc = [[0f32; 16]; 4];
                for (qd, krow) in qt.chunks_exact(4).zip(kb.chunks_exact(bs)) {
                    let r: &[f32; 16] = krow[c0..c0 + 16].try_into().expect("16 slots");
                    for k in 0..4 {
                        for i in 0..16 {
                            acc[k][i] = madd::<FMA>(qd[k], r[i], acc[k][i]);
                        }
                    }
                }
                for (k, a) in acc.iter().enumerate() {
                    sc.s[k * bs + c0..k * bs + c0 + 16].copy_from_slice(a);
                }
                c0 += 16;
            }
            for j in c0..valid {
                for k in 0..4 {
                    let mut a = 0f32;
                    for (qd, krow) in qt.chunks_exact(4).zip(kb.chunks_exact(bs)) {
                        a = madd::<FMA>(qd[k], krow[j], a);
                    }
                    sc.s[k * bs + j] = a;
                }
            }
            for (k, &(qi, lo, hi)) in quad.iter().enumerate() {
                let scores = &sc.s[k * bs..(k + 1) * bs];
                let corr = softmax_block(scores, lo, hi, &mut sc.m[qi], &mut sc.l[qi], &mut sc.p[..bs]);
                let probs = &sc.p[lo..hi];
                accumulate_pv::<FMA>(&mut sc.acc[qi * hd..(qi + 1) * hd], corr, probs, &vb[lo * hd..hi * hd]);
            }
        }
    }
    write_outputs(ctx, it, hd, &sc.acc, &sc.l);
}

/// The item's queries scaled by `params.scale`, `[t][h_in_group][d]`, into `q`.
#[inline(always)]
fn load_scaled_queries<E: KvElement>(ctx: &Ctx<'_, E>, it: &WorkItem, hd: usize, q: &mut Vec<f32>) {
    let group = ctx.params.num_heads / ctx.geom.num_kv_heads;
    let s = &ctx.seqs[it.seq];
    let q_row = ctx.params.num_heads * hd;
    let nt = it.t1 - it.t0;
    resize(q, nt * group * hd, 0.0);
    for t in 0..nt {
        for hg in 0..group {
            let h = it.kv_head * group + hg;
            let src = (s.row + it.t0 + t) * q_row + h * hd;
            let dst = (t * group + hg) * hd;
            for (d, x) in q[dst..dst + hd].iter_mut().zip(&ctx.q[src..src + hd]) {
                *d = *x * ctx.params.scale;
            }
        }
    }
}

/// Writes the item's normalized outputs `acc / l` (same `[t][h_in_group]`
/// order as the queries) into `out`.
#[inline(always)]
fn write_outputs<E: KvElement>(ctx: &Ctx<'_, E>, it: &WorkItem, hd: usize, acc: &[f32], l: &[f32]) {
    let group = ctx.params.num_heads / ctx.geom.num_kv_heads;
    let s = &ctx.seqs[it.seq];
    for t in 0..it.t1 - it.t0 {
        let row = s.row + it.t0 + t;
        for hg in 0..group {
            let qi = t * group + hg;
            let h = it.kv_head * group + hg;
            let inv = 1.0 / l[qi];
            // SAFETY: `out` has `rows * num_heads * head_dim` elements (checked by
            // `paged_attention`), `row < rows` and `h < num_heads` (validated), and no
            // other work item writes this (row, head): items partition rows by
            // sequence and query chunk and heads by KV-head group.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(ctx.out.0.add((row * ctx.params.num_heads + h) * hd), hd) };
            for (d, a) in dst.iter_mut().zip(&acc[qi * hd..(qi + 1) * hd]) {
                *d = *a * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests;

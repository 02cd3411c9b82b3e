//! The paged KV cache: fixed-size blocks from one pool, per-sequence block
//! tables, attention through the `salus-kernels` paged-attention kernel.
//!
//! Why paged: a contiguous per-sequence cache must reserve (or repeatedly grow
//! and copy) room for the longest possible sequence, so memory, not compute,
//! caps the number of concurrent sequences. Here a sequence holds only
//! `ceil(len / block_size)` blocks, taken from and returned to a shared free
//! list in O(1), and the scheduler admits work by counting free blocks.
//!
//! Ownership: a sequence's blocks are a [`SeqBlocks`] allocation that returns
//! them to the [`BlockPool`] when dropped, so a cancelled, failed or panicked
//! request can never leak cache memory. [`PagedKvCache`] owns the allocations of
//! the sequences it holds and implements [`BlockManager`], the interface the
//! scheduler uses to reserve and release blocks.
//!
//! Prefix caching (optional, see [`crate::block_pool`]): fully computed blocks
//! are registered under their exact token prefix and later sequences of the
//! same [`PrefixScope`] attach them instead of recomputing them.
//!
//! K/V are PHI (derived from prompts and completions): every operation that
//! can release blocks — `release`, `reserve` (which may evict a cached block
//! for reuse), `expire_cached`, `remove` — zeroes the released blocks' K/V in
//! every layer before it returns, so nothing of a finished request stays in
//! the cache's memory except blocks the prefix cache keeps for its scope.

use std::collections::HashMap;

use candle_core::{DType, Device, Storage, Tensor};
use half::{bf16, f16};
use salus_kernels::paged_attention::{self, AttentionParams, KvElement, PagedGeometry, SeqChunk};

pub use salus_kernels::paged_attention::KvDtype;

pub use crate::block_pool::{BlockPool, PrefixScope, SeqBlocks};

use crate::batch::{check_spans, SeqId, SeqSpan};
use crate::kv_cache::KvCache;
use crate::{ModelError, Result};

/// Default tokens per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// What the scheduler needs from a block-based KV cache: admission by free
/// blocks, reservation ahead of a step, release on finish or preemption.
pub trait BlockManager {
    fn block_size(&self) -> usize;
    fn total_blocks(&self) -> usize;
    fn free_blocks(&self) -> usize;
    /// Makes `seq`'s block table cover `tokens` tokens (allocating as needed,
    /// all or nothing). Returns false when there are not enough free blocks.
    fn reserve(&mut self, seq: SeqId, tokens: usize) -> bool;
    /// Frees all of `seq`'s blocks and forgets its cached tokens.
    fn release(&mut self, seq: SeqId);
    /// `seq`'s block table (empty if unknown).
    fn block_table(&self, seq: SeqId) -> &[u32];
    /// Blocks registered in the prefix cache (0 without one).
    fn cached_blocks(&self) -> usize {
        0
    }
    /// Starts `seq`, which holds no blocks, from the longest run of whole
    /// blocks of `tokens` cached in `scope`: their K/V count as computed.
    /// Returns the number of tokens covered (0 without a prefix cache).
    fn attach_cached_prefix(&mut self, seq: SeqId, scope: &PrefixScope, tokens: &[u32]) -> usize {
        let _ = (seq, scope, tokens);
        0
    }
    /// Offers `seq`'s whole blocks among `computed` (tokens whose K/V are
    /// cached for every layer) to the prefix cache.
    fn register_computed(&mut self, seq: SeqId, computed: &[u32]) {
        let _ = (seq, computed);
    }
    /// Drops cached blocks nobody has held since before `cutoff`; returns how many.
    fn expire_cached(&mut self, cutoff: std::time::Instant) -> usize {
        let _ = cutoff;
        0
    }
}

/// A [`BlockManager`] over a bare pool, with no storage: for policy tests and
/// capacity planning.
#[derive(Debug)]
pub struct PoolBlockManager {
    pool: BlockPool,
    block_size: usize,
    seqs: HashMap<SeqId, SeqBlocks>,
}

impl PoolBlockManager {
    pub fn new(total_blocks: usize, block_size: usize) -> Self {
        PoolBlockManager { pool: BlockPool::new(total_blocks), block_size, seqs: HashMap::new() }
    }
    /// A manager whose pool has a prefix cache.
    pub fn with_prefix_cache(total_blocks: usize, block_size: usize) -> Self {
        PoolBlockManager { pool: BlockPool::with_prefix_cache(total_blocks), block_size, seqs: HashMap::new() }
    }
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }
}

impl BlockManager for PoolBlockManager {
    fn block_size(&self) -> usize {
        self.block_size
    }
    fn total_blocks(&self) -> usize {
        self.pool.total_blocks()
    }
    fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }
    fn reserve(&mut self, seq: SeqId, tokens: usize) -> bool {
        let bs = self.block_size;
        let pool = &self.pool;
        self.seqs.entry(seq).or_insert_with(|| pool.empty_allocation()).ensure_tokens(tokens, bs)
    }
    fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }
    fn block_table(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |b| b.blocks())
    }
    fn cached_blocks(&self) -> usize {
        self.pool.cached_blocks()
    }
    fn expire_cached(&mut self, cutoff: std::time::Instant) -> usize {
        self.pool.expire_idle_before(cutoff)
    }
    fn attach_cached_prefix(&mut self, seq: SeqId, scope: &PrefixScope, tokens: &[u32]) -> usize {
        let (pool, bs) = (&self.pool, self.block_size);
        self.seqs.entry(seq).or_insert_with(|| pool.empty_allocation()).attach_cached_prefix(scope, tokens, bs)
    }
    fn register_computed(&mut self, seq: SeqId, computed: &[u32]) {
        let bs = self.block_size;
        if let Some(b) = self.seqs.get_mut(&seq) {
            b.register_computed(computed, bs);
        }
    }
}

/// How much memory the KV cache may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCapacity {
    /// A fixed number of bytes (K and V of all layers together).
    Bytes(u64),
    /// A fraction (0, 1] of the memory available when the cache is created.
    FractionOfFree(f64),
}

/// Memory available to new allocations (`MemAvailable` in /proc/meminfo).
pub fn available_memory_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Shape of a paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedCacheConfig {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub dtype: KvDtype,
}

impl PagedCacheConfig {
    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> u64 {
        2 * (num_layers * num_kv_heads * head_dim * block_size * dtype.size_in_bytes()) as u64
    }

    /// Sizes the pool from a capacity budget for a cache on `device` (a
    /// fraction of free memory means free host memory on CPU and free device
    /// memory on CUDA). Fails when not even one block fits.
    pub fn from_capacity_on(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        dtype: KvDtype,
        capacity: KvCapacity,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 {
            return Err(ModelError::InvalidConfig("KV cache block_size must be > 0".into()));
        }
        let bytes = match capacity {
            KvCapacity::Bytes(b) => b,
            KvCapacity::FractionOfFree(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(ModelError::InvalidConfig("KV cache fraction must be in (0, 1]".into()));
                }
                let avail = match device {
                    #[cfg(feature = "cuda")]
                    Device::Cuda(d) => crate::paged_cache_cuda::cuda_memory_info(d)?.0,
                    _ => available_memory_bytes().ok_or_else(|| {
                        ModelError::InvalidConfig("cannot read available memory from /proc/meminfo".into())
                    })?,
                };
                (avail as f64 * f) as u64
            }
        };
        let per_block = Self::bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype);
        let num_blocks = (bytes / per_block.max(1)).min(u32::MAX as u64) as usize;
        if num_blocks == 0 {
            return Err(ModelError::InvalidConfig(format!(
                "KV cache capacity of {bytes} bytes holds no block ({per_block} bytes each)"
            )));
        }
        Ok(PagedCacheConfig { num_layers, num_kv_heads, head_dim, block_size, num_blocks, dtype })
    }

    /// Tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }

    fn geometry(&self) -> PagedGeometry {
        PagedGeometry {
            num_blocks: self.num_blocks,
            block_size: self.block_size,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// A pool that lists released blocks for [`PagedKvCache::scrub_released`].
fn tracked(pool: BlockPool) -> BlockPool {
    pool.track_released();
    pool
}

/// One layer's K and V storage.
enum LayerStore {
    F32(Vec<f32>, Vec<f32>),
    F16(Vec<f16>, Vec<f16>),
    BF16(Vec<bf16>, Vec<bf16>),
}

/// Evaluates `$body` with `$k` and `$v` bound to a [`LayerStore`]'s K and V,
/// whatever their element type (one generic body instead of three arms).
macro_rules! with_kv {
    ($layer:expr, |$k:ident, $v:ident| $body:expr) => {
        match $layer {
            LayerStore::F32($k, $v) => $body,
            LayerStore::F16($k, $v) => $body,
            LayerStore::BF16($k, $v) => $body,
        }
    };
}

struct SeqEntry {
    blocks: SeqBlocks,
    /// Cached tokens per layer.
    lens: Vec<usize>,
}

/// A KV cache of fixed-size blocks with attention through the paged kernel (CPU).
pub struct PagedKvCache {
    cfg: PagedCacheConfig,
    pool: BlockPool,
    layers: Vec<LayerStore>,
    seqs: HashMap<SeqId, SeqEntry>,
    /// Device storage when the cache lives on a CUDA device (then `layers` is empty).
    #[cfg(feature = "cuda")]
    cuda: Option<crate::paged_cache_cuda::CudaPagedStore>,
}

impl std::fmt::Debug for PagedKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKvCache").field("cfg", &self.cfg).field("seqs", &self.seqs.len()).finish()
    }
}

impl PagedKvCache {
    /// Allocates the whole cache up front (zeroed pages are mapped lazily by the OS).
    pub fn new(cfg: PagedCacheConfig) -> Result<Self> {
        if cfg.block_size == 0 || cfg.num_kv_heads == 0 || cfg.head_dim == 0 || cfg.num_layers == 0 {
            return Err(ModelError::InvalidConfig("paged KV cache dimensions must be > 0".into()));
        }
        let n = cfg.geometry().cache_elems();
        // Zeroed, lazily mapped and huge-page advised (see `salus_kernels::memory`).
        fn zeroed<E: KvElement>(n: usize) -> Result<Vec<E>> {
            salus_kernels::memory::zeroed_kv(n)
                .ok_or_else(|| ModelError::InvalidConfig("paged KV cache exceeds the address space".into()))
        }
        let layers = (0..cfg.num_layers)
            .map(|_| {
                Ok(match cfg.dtype {
                    KvDtype::F32 => LayerStore::F32(zeroed(n)?, zeroed(n)?),
                    KvDtype::F16 => LayerStore::F16(zeroed(n)?, zeroed(n)?),
                    KvDtype::BF16 => LayerStore::BF16(zeroed(n)?, zeroed(n)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PagedKvCache {
            pool: tracked(BlockPool::new(cfg.num_blocks)),
            cfg,
            layers,
            seqs: HashMap::new(),
            #[cfg(feature = "cuda")]
            cuda: None,
        })
    }

    /// Allocates the cache on `device`: host memory for the CPU, device memory
    /// (and Salus' CUDA kernels) for a CUDA device.
    pub fn new_on(cfg: PagedCacheConfig, device: &Device) -> Result<Self> {
        match device {
            Device::Cpu => Self::new(cfg),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                if cfg.block_size == 0 || cfg.num_kv_heads == 0 || cfg.head_dim == 0 || cfg.num_layers == 0 {
                    return Err(ModelError::InvalidConfig("paged KV cache dimensions must be > 0".into()));
                }
                let store =
                    crate::paged_cache_cuda::CudaPagedStore::new(&cfg.geometry(), cfg.num_layers, cfg.dtype, d)?;
                Ok(PagedKvCache {
                    pool: tracked(BlockPool::new(cfg.num_blocks)),
                    cfg,
                    layers: Vec::new(),
                    seqs: HashMap::new(),
                    cuda: Some(store),
                })
            }
            other => Err(ModelError::Device(format!(
                "the paged KV cache does not support {other:?} in this build (CUDA needs the `cuda` feature)"
            ))),
        }
    }

    /// Commits the whole cache's memory now instead of on first use (CPU; on
    /// a GPU device memory is committed when allocated): a host that cannot
    /// back the configured capacity fails at start rather than under load, and
    /// serving never pays for first-touch page faults. Writes one zero per
    /// 4 KiB page, which only an all-zero cache can take: a no-op while any
    /// sequence holds blocks or the prefix cache keeps any (every other block
    /// has been zeroed on release).
    pub fn prefault(&mut self) {
        if !self.seqs.is_empty() || self.pool.cached_blocks() > 0 {
            return;
        }
        fn touch<E: KvElement>(buf: &mut [E]) {
            let per_page = (4096 / std::mem::size_of::<E>()).max(1);
            for page in buf.chunks_mut(per_page) {
                page[0] = E::default();
            }
        }
        for layer in &mut self.layers {
            with_kv!(layer, |k, v| (touch(k), touch(v)));
        }
    }

    /// Turns the prefix cache on (see [`crate::block_pool`]). Call before any
    /// sequence holds blocks; a no-op afterwards.
    pub fn with_prefix_cache(mut self, on: bool) -> Self {
        if self.seqs.is_empty() && on != self.pool.has_prefix_cache() {
            let n = self.cfg.num_blocks;
            self.pool = tracked(if on { BlockPool::with_prefix_cache(n) } else { BlockPool::new(n) });
        }
        self
    }

    /// Whether the cache's storage is on a CUDA device.
    pub fn is_cuda(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.cuda.is_some()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }

    pub fn config(&self) -> &PagedCacheConfig {
        &self.cfg
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Number of sequences holding blocks.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Zeroes the K/V of the blocks the pool reports released (see the module
    /// documentation). Called right after every operation that can release
    /// blocks, so a block taken again has not been written by its new holder.
    fn scrub_released(&mut self) {
        let blocks = self.pool.take_released();
        if blocks.is_empty() {
            return;
        }
        let per_block = self.cfg.geometry().block_elems();
        #[cfg(feature = "cuda")]
        if let Some(store) = self.cuda.as_mut() {
            store.zero_blocks(&blocks, per_block);
            return;
        }
        fn zero<E: KvElement>(k: &mut [E], v: &mut [E], blocks: &[u32], per_block: usize) {
            for &b in blocks {
                let r = b as usize * per_block..(b as usize + 1) * per_block;
                k[r.clone()].fill(E::default());
                v[r].fill(E::default());
            }
        }
        for layer in &mut self.layers {
            with_kv!(layer, |k, v| zero(k, v, &blocks, per_block));
        }
    }

    /// Whether `block`'s K and V are all zero in every layer: what a released
    /// block must hold once the releasing call has returned. For checks (the
    /// unit tests and `salus-gpu-check`); on a GPU it copies the block to the host.
    pub fn block_is_zeroed(&self, block: u32) -> Result<bool> {
        if block as usize >= self.cfg.num_blocks {
            return Err(ModelError::InvalidBatch(format!("block {block} out of range")));
        }
        let per_block = self.cfg.geometry().block_elems();
        #[cfg(feature = "cuda")]
        if let Some(store) = self.cuda.as_ref() {
            return store.block_is_zeroed(block, per_block);
        }
        let r = block as usize * per_block..(block as usize + 1) * per_block;
        fn zero<E: KvElement>(k: &[E], v: &[E]) -> bool {
            let mut f = vec![0f32; k.len()];
            [k, v].iter().all(|part| {
                E::load(part, &mut f);
                f.iter().all(|x| x.to_bits() == 0)
            })
        }
        Ok(self.layers.iter().all(|l| with_kv!(l, |k, v| zero(&k[r.clone()], &v[r.clone()]))))
    }

    fn entry(&mut self, seq: SeqId) -> &mut SeqEntry {
        let (pool, layers) = (&self.pool, self.cfg.num_layers);
        self.seqs.entry(seq).or_insert_with(|| SeqEntry { blocks: pool.empty_allocation(), lens: vec![0; layers] })
    }
}

impl BlockManager for PagedKvCache {
    fn block_size(&self) -> usize {
        self.cfg.block_size
    }
    fn total_blocks(&self) -> usize {
        self.pool.total_blocks()
    }
    fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }
    fn reserve(&mut self, seq: SeqId, tokens: usize) -> bool {
        let bs = self.cfg.block_size;
        let blocks = &mut self.entry(seq).blocks;
        let held = blocks.len();
        let ok = blocks.ensure_tokens(tokens, bs);
        // A block taken may have been another prompt's, evicted from the
        // prefix cache. (Attention calls this per layer; most calls take none.)
        if blocks.len() > held {
            self.scrub_released();
        }
        ok
    }
    fn release(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
        self.scrub_released();
    }
    fn block_table(&self, seq: SeqId) -> &[u32] {
        self.seqs.get(&seq).map_or(&[], |e| e.blocks.blocks())
    }
    fn cached_blocks(&self) -> usize {
        self.pool.cached_blocks()
    }
    fn expire_cached(&mut self, cutoff: std::time::Instant) -> usize {
        let dropped = self.pool.expire_idle_before(cutoff);
        self.scrub_released();
        dropped
    }
    fn attach_cached_prefix(&mut self, seq: SeqId, scope: &PrefixScope, tokens: &[u32]) -> usize {
        let bs = self.cfg.block_size;
        let e = self.entry(seq);
        // Attaches only to a sequence without blocks, so none of its K/V is cached yet.
        let covered = e.blocks.attach_cached_prefix(scope, tokens, bs);
        if covered > 0 {
            e.lens.fill(covered);
        }
        covered
    }
    fn register_computed(&mut self, seq: SeqId, computed: &[u32]) {
        let bs = self.cfg.block_size;
        if let Some(e) = self.seqs.get_mut(&seq) {
            // Only what every layer has written may be shared.
            let done = e.lens.iter().copied().min().unwrap_or(0).min(computed.len());
            e.blocks.register_computed(&computed[..done], bs);
        }
    }
}

/// Runs `f` over the tensor's f32 data without copying when it is a contiguous
/// f32 CPU tensor, else over a converted copy.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            let s = cpu.as_slice::<f32>()?;
            return f(&s[a..b]);
        }
    }
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    f(&v)
}

fn kernel_err(e: paged_attention::PagedAttentionError) -> ModelError {
    ModelError::InvalidBatch(e.to_string())
}

#[allow(clippy::too_many_arguments)]
fn write_and_attend<E: KvElement>(
    geom: &PagedGeometry,
    params: &AttentionParams,
    kc: &mut [E],
    vc: &mut [E],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    chunks: &[SeqChunk<'_>],
    out: &mut [f32],
) -> Result<()> {
    paged_attention::write_kv(geom, kc, vc, k, v, chunks).map_err(kernel_err)?;
    paged_attention::paged_attention(geom, params, q, kc, vc, chunks, out).map_err(kernel_err)
}

impl KvCache for PagedKvCache {
    fn attend(
        &mut self,
        layer: usize,
        spans: &[SeqSpan],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sliding_window: Option<usize>,
    ) -> Result<Tensor> {
        if q.device().is_cpu() == self.is_cuda() {
            return Err(ModelError::InvalidBatch("q/k/v are not on the KV cache's device".into()));
        }
        if layer >= self.cfg.num_layers {
            return Err(ModelError::InvalidBatch(format!("layer {layer} out of range")));
        }
        let (total, n_heads, hd) = q.dims3()?;
        let (kt, n_kv, khd) = k.dims3()?;
        if kt != total || n_kv != self.cfg.num_kv_heads || khd != self.cfg.head_dim || hd != khd || v.dims() != k.dims()
        {
            return Err(ModelError::InvalidBatch("q/k/v shapes do not match the cache".into()));
        }
        // Check every span before touching anything.
        check_spans(spans, total, None, |seq| self.seqs.get(&seq).map_or(0, |e| e.lens[layer]))?;
        // Blocks are normally reserved by the scheduler; standalone callers get
        // them allocated here.
        for s in spans {
            if !self.reserve(s.seq, s.start_pos + s.len) {
                return Err(ModelError::CacheExhausted(format!(
                    "no free block for sequence {} ({} of {} blocks used)",
                    s.seq.0,
                    self.pool.used_blocks(),
                    self.pool.total_blocks()
                )));
            }
        }
        let geom = self.cfg.geometry();
        let params = AttentionParams { num_heads: n_heads, scale: 1.0 / (hd as f32).sqrt(), sliding_window };
        let chunks: Vec<SeqChunk<'_>> = spans
            .iter()
            .map(|s| SeqChunk {
                block_table: self.seqs[&s.seq].blocks.blocks(),
                row: s.offset,
                len: s.len,
                start_pos: s.start_pos,
            })
            .collect();
        #[cfg(feature = "cuda")]
        if let Some(store) = self.cuda.as_mut() {
            let out = store.attend(layer, &geom, &params, &chunks, q, k, v)?;
            drop(chunks);
            for s in spans {
                if let Some(e) = self.seqs.get_mut(&s.seq) {
                    e.lens[layer] = s.start_pos + s.len;
                }
            }
            return Ok(out);
        }
        let mut out = vec![0f32; total * n_heads * hd];
        let store = &mut self.layers[layer];
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_kv!(store, |kc, vc| write_and_attend(&geom, &params, kc, vc, q, k, v, &chunks, &mut out))
                })
            })
        })?;
        drop(chunks);
        for s in spans {
            if let Some(e) = self.seqs.get_mut(&s.seq) {
                e.lens[layer] = s.start_pos + s.len;
            }
        }
        let out = Tensor::from_vec(out, (total, n_heads * hd), q.device())?;
        if q.dtype() == DType::F32 {
            Ok(out)
        } else {
            Ok(out.to_dtype(q.dtype())?)
        }
    }

    fn remove(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
        self.scrub_released();
    }

    fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |e| e.lens[0])
    }
}

#[cfg(test)]
mod tests;

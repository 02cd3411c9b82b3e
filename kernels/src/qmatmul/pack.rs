//! The repacked weight matrix and the matmul driver.

use super::formats::{decode_block, GgmlType, Storage};
use super::{quantize_acts, KernelPath, QActs, SendPtr};
use crate::KernelError;
use half::f16;
use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroize;

/// Weight rows per packed tile (one 512-bit vector of i32 lanes).
pub(crate) const TILE_ROWS: usize = 16;

/// Geometry of the packed layout of one matrix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub storage: Storage,
    /// Elements per scale group (16 or 32).
    pub group: usize,
    /// Scales stored as f16 (else f32).
    pub f16_scales: bool,
    pub ngroups: usize,
    /// Weight bytes per group per tile.
    pub wbytes: usize,
    /// Bytes per group per tile (weights, then 16 `d`, then 16 `m` unless I8).
    pub group_bytes: usize,
    pub tile_bytes: usize,
}

impl Layout {
    fn new(ty: GgmlType, cols: usize, f16_scales: bool) -> Layout {
        let storage = ty.storage();
        let group = ty.group();
        let ngroups = cols / group;
        let wbytes = match storage {
            Storage::Nib4 => group * TILE_ROWS / 2,
            Storage::U8 | Storage::I8 => group * TILE_ROWS,
        };
        let nscales = if storage == Storage::I8 { 1 } else { 2 };
        let ssize = if f16_scales { 2 } else { 4 };
        let group_bytes = wbytes + nscales * TILE_ROWS * ssize;
        Layout { storage, group, f16_scales, ngroups, wbytes, group_bytes, tile_bytes: ngroups * group_bytes }
    }

    #[inline]
    pub fn scale_size(&self) -> usize {
        if self.f16_scales {
            2
        } else {
            4
        }
    }
}

/// A 64-byte aligned byte buffer, zeroized on drop (weights are PHI-grade secrets).
struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + 64];
        // Weights stream every step: fewer TLB misses (see `crate::memory`).
        crate::memory::advise_huge_pages(&raw);
        // Weights are PHI-grade: locked, and kept out of core dumps.
        crate::memory::protect_sensitive(&raw);
        let off = raw.as_ptr().align_offset(64).min(64);
        AlignedBuf { raw, off, len }
    }
    fn as_slice(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.raw[self.off..].as_mut_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.raw.zeroize();
    }
}

/// A quantized weight matrix `[rows, cols]`, repacked for the kernels.
/// The packed bytes are zeroized when it is dropped.
pub struct QuantMatrix {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    tiles: usize,
    layout: Layout,
    buf: AlignedBuf,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("f16_scales", &self.layout.f16_scales)
            .finish_non_exhaustive()
    }
}

impl QuantMatrix {
    /// Repacks a row-major GGML matrix (`rows` rows of `cols` elements, as
    /// stored in a GGUF file) for the kernels. Runs on the kernel pool.
    pub fn from_ggml_bytes(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<QuantMatrix, KernelError> {
        let bs = dtype.block_size();
        if cols == 0 || !cols.is_multiple_of(bs) {
            return Err(KernelError::BadWidth { dtype: dtype.name(), cols, block: bs });
        }
        if rows == 0 {
            return Err(KernelError::NoRows);
        }
        let row_bytes = cols / bs * dtype.type_size();
        let expected = rows.saturating_mul(row_bytes);
        if bytes.len() != expected {
            return Err(KernelError::BadWeightBytes { dtype: dtype.name(), rows, cols, got: bytes.len(), expected });
        }
        // The 32-block types have f16 scales natively; keep them f16 unless a
        // derived offset (-8d, -16d) is not exactly representable.
        let try_f16 = dtype.block_size() == 32;
        if try_f16 {
            if let Some(m) = Self::pack(dtype, rows, cols, bytes, true) {
                return Ok(m);
            }
        }
        Ok(Self::pack(dtype, rows, cols, bytes, false).expect("f32 scales always represent the values"))
    }

    fn pack(dtype: GgmlType, rows: usize, cols: usize, bytes: &[u8], f16_scales: bool) -> Option<QuantMatrix> {
        let layout = Layout::new(dtype, cols, f16_scales);
        let tiles = rows.div_ceil(TILE_ROWS);
        let mut buf = AlignedBuf::zeroed(tiles * layout.tile_bytes);
        let base = SendPtr(buf.as_mut_ptr());
        let inexact = AtomicBool::new(false);
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let tiles_per_task = 4;
        crate::pool::parallel_for(tiles.div_ceil(tiles_per_task), &|task| {
            let t0 = task * tiles_per_task;
            let t1 = (t0 + tiles_per_task).min(tiles);
            for t in t0..t1 {
                // SAFETY: each tile owns the disjoint range
                // `t*tile_bytes..(t+1)*tile_bytes` of the buffer, which outlives
                // `parallel_for`.
                let tile =
                    unsafe { std::slice::from_raw_parts_mut(base.get().add(t * layout.tile_bytes), layout.tile_bytes) };
                for lane in 0..TILE_ROWS {
                    let r = t * TILE_ROWS + lane;
                    if r >= rows {
                        break;
                    }
                    let src = &bytes[r * row_bytes..(r + 1) * row_bytes];
                    if !pack_row(dtype, &layout, src, tile, lane) {
                        inexact.store(true, Ordering::Relaxed);
                    }
                }
            }
        });
        if inexact.load(Ordering::Relaxed) {
            return None;
        }
        Some(QuantMatrix { dtype, rows, cols, tiles, layout, buf })
    }

    /// Stacks matrices of the same type and width into one `[Σ rows, cols]`
    /// matrix, so projections that read the same input (Q, K and V; gate and
    /// up) run as one kernel call: one activation quantization, one hand-off
    /// to the pool, and the weights of all parts streamed in a single pass.
    /// Every part but the last must have a multiple of 16 rows (whole tiles).
    pub fn concat_rows(parts: &[&QuantMatrix]) -> Result<QuantMatrix, KernelError> {
        let first = parts.first().ok_or(KernelError::NoRows)?;
        for (i, p) in parts.iter().enumerate() {
            if p.dtype != first.dtype || p.cols != first.cols {
                return Err(KernelError::Concat("parts differ in block type or width"));
            }
            if p.layout.f16_scales != first.layout.f16_scales {
                return Err(KernelError::Concat("parts differ in scale format"));
            }
            if i + 1 < parts.len() && p.rows % TILE_ROWS != 0 {
                return Err(KernelError::Concat("a part before the last has a partial tile"));
            }
        }
        let tiles: usize = parts.iter().map(|p| p.tiles).sum();
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let layout = first.layout;
        let mut buf = AlignedBuf::zeroed(tiles * layout.tile_bytes);
        let mut at = 0;
        for p in parts {
            let src = p.buf.as_slice();
            // SAFETY: `buf` holds `tiles * tile_bytes` bytes and the parts'
            // buffers sum to exactly that; `at + src.len()` never exceeds it.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf.as_mut_ptr().add(at), src.len()) };
            at += src.len();
        }
        Ok(QuantMatrix { dtype: first.dtype, rows, cols: first.cols, tiles, layout, buf })
    }

    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of packed weights (what a GEMV streams).
    pub fn packed_bytes(&self) -> usize {
        self.tiles * self.layout.tile_bytes
    }

    /// `out[m, rows] = x[m, cols] · W^T` on the fastest path of this CPU.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(KernelPath::best(), x, m, out)
    }

    /// Like [`QuantMatrix::matmul`] on a chosen path (tests and benchmarks).
    pub fn matmul_with(&self, path: KernelPath, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if !path.is_available() {
            return Err(KernelError::PathUnavailable(path.name()));
        }
        let xe = m.saturating_mul(self.cols);
        if x.len() != xe {
            return Err(KernelError::BadLength { what: "activations", got: x.len(), expected: xe });
        }
        let oe = m.saturating_mul(self.rows);
        if out.len() != oe {
            return Err(KernelError::BadLength { what: "output", got: out.len(), expected: oe });
        }
        if m == 0 {
            return Ok(());
        }
        let acts = quantize_acts(path, x, m, self.cols, self.layout.group);
        self.run(path, &acts, m, out);
        Ok(())
    }

    fn run(&self, path: KernelPath, acts: &QActs, m: usize, out: &mut [f32]) {
        let threads = crate::pool::num_threads().max(1);
        // A few tasks per thread for balance, but whole tiles each.
        let tiles_per_task = self.tiles.div_ceil(threads * 4).max(1);
        let ntasks = self.tiles.div_ceil(tiles_per_task);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let out_len = out.len();
        let w = self.buf.as_slice();
        let job = |task: usize| {
            let t0 = task * tiles_per_task;
            let t1 = (t0 + tiles_per_task).min(self.tiles);
            let args = TileArgs { layout: &self.layout, acts, m, rows: self.rows, out: out_ptr, out_len };
            for t in t0..t1 {
                let tile = &w[t * self.layout.tile_bytes..(t + 1) * self.layout.tile_bytes];
                match path {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `matmul_with` checked that this CPU supports the path.
                    KernelPath::Avx512Vnni => unsafe { super::x86_avx512::tile(&args, tile, t) },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    KernelPath::Avx2 => unsafe { super::x86_avx2::tile(&args, tile, t) },
                    _ => super::scalar::tile(&args, tile, t),
                }
            }
        };
        crate::pool::parallel_for(ntasks, &job);
    }
}

/// What a tile kernel needs besides the tile bytes.
pub(crate) struct TileArgs<'a> {
    pub layout: &'a Layout,
    pub acts: &'a QActs,
    pub m: usize,
    pub rows: usize,
    /// `[m, rows]` output; tile `t` writes columns `16t..16t+16` (clipped to
    /// `rows`) of every row, so concurrent tiles never overlap.
    pub out: SendPtr<f32>,
    pub out_len: usize,
}

impl TileArgs<'_> {
    /// Writes the 16 lanes of activation row `i` of tile `t`, clipped to `rows`.
    #[inline(always)]
    pub fn store(&self, i: usize, t: usize, lanes: &[f32; TILE_ROWS]) {
        let c0 = t * TILE_ROWS;
        let n = (self.rows - c0).min(TILE_ROWS);
        let at = i * self.rows + c0;
        assert!(at + n <= self.out_len);
        // SAFETY: bounds checked just above; tiles write disjoint column ranges
        // (see the field doc), so no other thread touches these elements.
        unsafe { std::ptr::copy_nonoverlapping(lanes.as_ptr(), self.out.get().add(at), n) }
    }
}

/// Decodes one GGML row and writes it into lane `lane` of a tile. Returns
/// false if f16 scales were requested and a value is not exact in f16.
fn pack_row(dtype: GgmlType, l: &Layout, src: &[u8], tile: &mut [u8], lane: usize) -> bool {
    let bs = dtype.block_size();
    let g = l.group;
    let gpb = bs / g;
    let ss = l.scale_size();
    let mut exact = true;
    let mut q = [0u8; 256];
    let mut d = [0f32; 16];
    let mut m = [0f32; 16];
    for (bi, blk) in src.chunks_exact(dtype.type_size()).enumerate() {
        decode_block(dtype, blk, &mut q[..bs], &mut d[..gpb], &mut m[..gpb]);
        for gl in 0..gpb {
            let gi = bi * gpb + gl;
            let gb = &mut tile[gi * l.group_bytes..(gi + 1) * l.group_bytes];
            let qs = &q[gl * g..(gl + 1) * g];
            match l.storage {
                Storage::Nib4 => {
                    for s in 0..g / 8 {
                        for i in 0..4 {
                            gb[s * 64 + lane * 4 + i] = qs[8 * s + i] | (qs[8 * s + 4 + i] << 4);
                        }
                    }
                }
                Storage::U8 | Storage::I8 => {
                    for s in 0..g / 4 {
                        gb[s * 64 + lane * 4..s * 64 + lane * 4 + 4].copy_from_slice(&qs[4 * s..4 * s + 4]);
                    }
                }
            }
            let nscales = if l.storage == Storage::I8 { 1 } else { 2 };
            for (k, v) in [d[gl], m[gl]].into_iter().take(nscales).enumerate() {
                let at = l.wbytes + k * TILE_ROWS * ss + lane * ss;
                if l.f16_scales {
                    let h = f16::from_f32(v);
                    if h.to_f32() != v {
                        exact = false;
                    }
                    gb[at..at + 2].copy_from_slice(&h.to_le_bytes());
                } else {
                    gb[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    exact
}

/// Reads scale `k` (0 = d, 1 = m) of `lane` from a group's bytes.
#[inline(always)]
pub(crate) fn read_scale(l: &Layout, gb: &[u8], k: usize, lane: usize) -> f32 {
    let ss = l.scale_size();
    let at = l.wbytes + k * TILE_ROWS * ss + lane * ss;
    if l.f16_scales {
        f16::from_le_bytes([gb[at], gb[at + 1]]).to_f32()
    } else {
        f32::from_le_bytes([gb[at], gb[at + 1], gb[at + 2], gb[at + 3]])
    }
}

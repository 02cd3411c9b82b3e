//! The paged KV cache on a CUDA device: block storage in device memory and
//! attention through Salus' NVRTC kernels (`salus_kernels::cuda`).
//!
//! [`crate::paged_cache::PagedKvCache`] keeps one attention path: it validates
//! the spans, reserves blocks and builds the per-sequence chunks, then hands
//! them to the CPU kernel or to [`CudaPagedStore::attend`] depending on where
//! the cache lives. Block bookkeeping (pool, tables, lengths) stays on the host.
//!
//! Per step, the block tables and slot mapping are uploaded once, as one small
//! int32 buffer (a [`PagedPlan`]); every layer of the step reuses it, because
//! the plan is rebuilt on the host (cheap) and only re-uploaded when it differs
//! from the previous layer's.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};
use salus_kernels::cuda::{CudaKernelError, DevicePlan, PagedKernels};
use salus_kernels::paged_attention::{AttentionParams, KvDtype, PagedGeometry, SeqChunk};
use salus_kernels::paged_plan::PagedPlan;

use crate::{ModelError, Result};

fn cuda_err(e: CudaKernelError) -> ModelError {
    match e {
        CudaKernelError::Shape(m) => ModelError::InvalidBatch(m),
        other => ModelError::Device(other.to_string()),
    }
}

/// One layer's K and V blocks in device memory.
enum CudaLayer {
    F32(CudaSlice<f32>, CudaSlice<f32>),
    F16(CudaSlice<f16>, CudaSlice<f16>),
    BF16(CudaSlice<bf16>, CudaSlice<bf16>),
}

/// Device storage and kernels of a paged cache on one CUDA device.
pub struct CudaPagedStore {
    device: CudaDevice,
    kernels: Arc<PagedKernels>,
    layers: Vec<CudaLayer>,
    /// The last uploaded plan (reused by the following layers of a step).
    plan: Option<(PagedPlan, DevicePlan)>,
    /// Why zeroing released blocks failed, if it did: every later `attend`
    /// fails with it (fail closed: blocks that may hold another request's K/V
    /// are never handed out unscrubbed).
    scrub_error: Option<String>,
}

/// Free and total memory of a CUDA device, in bytes.
pub fn cuda_memory_info(device: &CudaDevice) -> Result<(u64, u64)> {
    let stream = device.cuda_stream();
    let (free, total) = salus_kernels::cuda::mem_info(stream.context()).map_err(cuda_err)?;
    Ok((free as u64, total as u64))
}

impl CudaPagedStore {
    /// Allocates `num_layers` zeroed K and V caches of `geom` on `device` and
    /// compiles (or fetches) the kernels for its head dimension.
    pub(crate) fn new(geom: &PagedGeometry, num_layers: usize, dtype: KvDtype, device: &CudaDevice) -> Result<Self> {
        let stream = device.cuda_stream();
        let kernels = PagedKernels::get(&stream, geom.head_dim).map_err(cuda_err)?;
        let n = geom.cache_elems();
        let oom = |e| ModelError::Device(format!("allocating the KV cache ({n} elements per layer): {e}"));
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            layers.push(match dtype {
                KvDtype::F32 => {
                    CudaLayer::F32(stream.alloc_zeros(n).map_err(oom)?, stream.alloc_zeros(n).map_err(oom)?)
                }
                KvDtype::F16 => {
                    CudaLayer::F16(stream.alloc_zeros(n).map_err(oom)?, stream.alloc_zeros(n).map_err(oom)?)
                }
                KvDtype::BF16 => {
                    CudaLayer::BF16(stream.alloc_zeros(n).map_err(oom)?, stream.alloc_zeros(n).map_err(oom)?)
                }
            });
        }
        Ok(CudaPagedStore { device: device.clone(), kernels, layers, plan: None, scrub_error: None })
    }

    /// Zeroes `blocks` (sorted, of `per_block` elements each) in every layer's
    /// K and V, one memset per run of consecutive block ids.
    pub(crate) fn zero_blocks(&mut self, blocks: &[u32], per_block: usize) {
        let stream = self.device.cuda_stream();
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for &b in blocks {
            let (lo, hi) = (b as usize * per_block, (b as usize + 1) * per_block);
            match runs.last_mut() {
                Some(r) if r.end == lo => r.end = hi,
                _ => runs.push(lo..hi),
            }
        }
        use candle_core::cuda_backend::cudarc::driver::{CudaStream, DriverError, ValidAsZeroBits};
        fn zero_runs<T: DeviceRepr + ValidAsZeroBits>(
            stream: &Arc<CudaStream>,
            parts: [&mut CudaSlice<T>; 2],
            runs: &[std::ops::Range<usize>],
        ) -> std::result::Result<(), DriverError> {
            for part in parts {
                for r in runs {
                    stream.memset_zeros(&mut part.slice_mut(r.clone()))?;
                }
            }
            Ok(())
        }
        for layer in &mut self.layers {
            let res = match layer {
                CudaLayer::F32(k, v) => zero_runs(&stream, [k, v], &runs),
                CudaLayer::F16(k, v) => zero_runs(&stream, [k, v], &runs),
                CudaLayer::BF16(k, v) => zero_runs(&stream, [k, v], &runs),
            };
            if let Err(e) = res {
                self.scrub_error.get_or_insert_with(|| format!("zeroing released KV blocks: {e}"));
            }
        }
    }

    /// Whether `block` (of `per_block` elements) is all zero bits in every
    /// layer's K and V; copies the block to the host (for checks).
    pub(crate) fn block_is_zeroed(&self, block: u32, per_block: usize) -> Result<bool> {
        let stream = self.device.cuda_stream();
        let r = block as usize * per_block..(block as usize + 1) * per_block;
        fn zero<T: DeviceRepr>(
            stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
            parts: [&CudaSlice<T>; 2],
            r: &std::ops::Range<usize>,
            is_zero: impl Fn(&T) -> bool,
        ) -> Result<bool> {
            for part in parts {
                let host = stream
                    .clone_dtoh(&part.slice(r.clone()))
                    .map_err(|e| ModelError::Device(format!("reading a KV block: {e}")))?;
                if !host.iter().all(&is_zero) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        for layer in &self.layers {
            let zeroed = match layer {
                CudaLayer::F32(k, v) => zero(&stream, [k, v], &r, |x| x.to_bits() == 0)?,
                CudaLayer::F16(k, v) => zero(&stream, [k, v], &r, |x| x.to_bits() == 0)?,
                CudaLayer::BF16(k, v) => zero(&stream, [k, v], &r, |x| x.to_bits() == 0)?,
            };
            if !zeroed {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn device_plan(
        &mut self,
        geom: &PagedGeometry,
        rows: usize,
        chunks: &[SeqChunk<'_>],
        window: Option<usize>,
    ) -> Result<()> {
        let plan = PagedPlan::build(geom, rows, chunks, window).map_err(|e| ModelError::InvalidBatch(e.to_string()))?;
        if self.plan.as_ref().is_some_and(|(p, _)| *p == plan) {
            return Ok(());
        }
        let dev = DevicePlan::upload(&self.device.cuda_stream(), &plan).map_err(cuda_err)?;
        self.plan = Some((plan, dev));
        Ok(())
    }

    /// Writes the new K/V of `chunks` into `layer` and returns the attention
    /// output `[rows, num_heads * head_dim]` in `q`'s dtype. The chunks have
    /// been checked by the caller (positions, blocks reserved).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &mut self,
        layer: usize,
        geom: &PagedGeometry,
        params: &AttentionParams,
        chunks: &[SeqChunk<'_>],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        match q.device() {
            Device::Cuda(d) if d.id() == self.device.id() => {}
            _ => return Err(ModelError::InvalidBatch("q/k/v are not on the KV cache's CUDA device".into())),
        }
        if let Some(e) = &self.scrub_error {
            return Err(ModelError::Device(e.clone()));
        }
        let (rows, n_heads, hd) = q.dims3()?;
        self.device_plan(geom, rows, chunks, params.sliding_window)?;
        let Some((_, plan)) = self.plan.as_ref() else {
            return Err(ModelError::InvalidBatch("no plan".into()));
        };
        let stream = self.device.cuda_stream();
        let kernels = self.kernels.clone();
        let mut out = stream
            .alloc_zeros::<f32>(rows * n_heads * hd)
            .map_err(|e| ModelError::Device(format!("allocating the attention output: {e}")))?;
        let q32 = q.to_dtype(DType::F32)?.contiguous()?;
        let cache = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::InvalidBatch(format!("layer {layer} out of range")))?;
        macro_rules! run {
            ($kc:expr, $vc:expr, $ty:ty, $dt:expr) => {{
                let kt = k.to_dtype($dt)?.contiguous()?;
                let vt = v.to_dtype($dt)?.contiguous()?;
                with_view::<$ty, _>(&kt, |kv| {
                    with_view::<$ty, _>(&vt, |vv| {
                        kernels.write_kv(&stream, geom, plan, kv, vv, $kc, $vc).map_err(cuda_err)
                    })
                })?;
                with_view::<f32, _>(&q32, |qv| {
                    kernels.attention(&stream, geom, params, plan, qv, &*$kc, &*$vc, &mut out).map_err(cuda_err)
                })?;
            }};
        }
        match cache {
            CudaLayer::F32(kc, vc) => run!(kc, vc, f32, DType::F32),
            CudaLayer::F16(kc, vc) => run!(kc, vc, f16, DType::F16),
            CudaLayer::BF16(kc, vc) => run!(kc, vc, bf16, DType::BF16),
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
        let out = Tensor::from_storage(storage, (rows, n_heads * hd), BackpropOp::none(), false);
        if q.dtype() == DType::F32 {
            Ok(out)
        } else {
            Ok(out.to_dtype(q.dtype())?)
        }
    }
}

/// Runs `f` over the device memory of a contiguous CUDA tensor of element type `T`.
fn with_view<T: CudaDType + DeviceRepr, R>(t: &Tensor, f: impl FnOnce(&CudaView<'_, T>) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(ModelError::InvalidBatch("expected a CUDA tensor".into()));
    };
    let (a, b) =
        layout.contiguous_offsets().ok_or_else(|| ModelError::InvalidBatch("expected a contiguous tensor".into()))?;
    let slice = cs.as_cuda_slice::<T>()?;
    let view = slice.slice(a..b);
    f(&view)
}

//! Model weights held in candle tensors (the embedding table, norms, dense
//! layers) get the same protection as the buffers Salus allocates itself:
//! locked in RAM per the process's lock policy and excluded from core dumps
//! (see `salus_kernels::memory`). Weights are PHI-grade: a model fine-tuned
//! on clinical notes can reproduce them.

use candle_core::{CpuStorage, Storage, Tensor};
use salus_kernels::memory::protect_sensitive;

/// Protects `t`'s host buffer (device tensors live in GPU memory: nothing to do).
pub(crate) fn protect_tensor(t: &Tensor) {
    let (storage, _) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return };
    match cpu {
        CpuStorage::U8(v)
        | CpuStorage::F6E2M3(v)
        | CpuStorage::F6E3M2(v)
        | CpuStorage::F4(v)
        | CpuStorage::F8E8M0(v) => protect_sensitive(v),
        CpuStorage::U32(v) => protect_sensitive(v),
        CpuStorage::I16(v) => protect_sensitive(v),
        CpuStorage::I32(v) => protect_sensitive(v),
        CpuStorage::I64(v) => protect_sensitive(v),
        CpuStorage::BF16(v) => protect_sensitive(v),
        CpuStorage::F16(v) => protect_sensitive(v),
        CpuStorage::F32(v) => protect_sensitive(v),
        CpuStorage::F64(v) => protect_sensitive(v),
        CpuStorage::F8E4M3(v) => protect_sensitive(v),
    }
}

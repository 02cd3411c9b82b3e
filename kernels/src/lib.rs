//! Salus compute kernels. CPU kernels are pure Rust with runtime-detected SIMD
//! paths; CUDA kernels live behind the `cuda` feature.
//!
//! - [`qmatmul`]: quantized matrix multiplication over GGUF block formats
//!   (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) with weights repacked once at
//!   load time into a 16-row interleaved layout, activations quantized to 8 bits
//!   on the fly, and AVX-512 VNNI / AVX2 / scalar paths chosen at run time.
//! - [`memory`]: huge-page advice for the weights and the KV cache.
//! - [`pool`]: the persistent worker pool every CPU kernel splits its work over.
//!
//! `unsafe` is confined to this crate (SIMD intrinsics, the pool's scoped job
//! hand-off); every public API is safe and validates its inputs.

pub mod activation;
pub mod error;
pub mod math;
pub mod memory;
pub mod paged_attention;
pub mod paged_plan;
pub mod pool;
pub mod qmatmul;
#[cfg(test)]
mod test_rng;

/// CUDA paged-attention kernels (NVRTC), behind the `cuda` feature.
#[cfg(feature = "cuda")]
pub mod cuda;

pub use error::KernelError;
pub use pool::{num_threads, set_num_threads};
pub use qmatmul::{GgmlType, KernelPath, QuantMatrix};

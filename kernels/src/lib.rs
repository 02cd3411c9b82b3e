//! Salus compute kernels. CPU kernels are pure Rust with runtime-detected SIMD
//! paths; CUDA kernels live behind the `cuda` feature.

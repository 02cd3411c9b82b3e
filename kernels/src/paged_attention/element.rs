//! The types a KV cache can be stored in (f32, f16, bf16) and their
//! conversions to and from the f32 the kernels compute in.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Storage type of the KV cache. Arithmetic is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F32,
    F16,
    BF16,
}

impl KvDtype {
    /// Bytes per stored element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::BF16 => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::BF16 => "bf16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type the KV cache can be stored in (f32, f16, bf16).
pub trait KvElement: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    const DTYPE: KvDtype;
    /// Converts one value.
    fn from_f32(x: f32) -> Self;
    /// Converts `src` into `dst` (same length).
    fn store(src: &[f32], dst: &mut [Self]);
    /// Converts `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [f32]);
    /// The slice itself when the storage type already is f32 (no conversion).
    fn as_f32(src: &[Self]) -> Option<&[f32]>;
}

impl KvElement for f32 {
    const DTYPE: KvDtype = KvDtype::F32;
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
}

impl KvElement for f16 {
    const DTYPE: KvDtype = KvDtype::F16;
    #[inline(always)]
    fn from_f32(x: f32) -> f16 {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn store(src: &[f32], dst: &mut [f16]) {
        // `half` picks F16C at runtime when the CPU has it.
        dst.convert_from_f32_slice(src);
    }
    #[inline(always)]
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
}

impl KvElement for bf16 {
    const DTYPE: KvDtype = KvDtype::BF16;
    #[inline(always)]
    fn from_f32(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn store(src: &[f32], dst: &mut [bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(*s);
        }
    }
    #[inline(always)]
    fn load(src: &[bf16], dst: &mut [f32]) {
        // bf16 is the upper half of an f32: a shift, which vectorizes.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    #[inline(always)]
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
}

//! Quantized linear layers on Salus' own CPU kernels (`salus-kernels`).
//!
//! Why: candle 0.11's quantized matmul is scalar for Q4_1 and only vectorized
//! for row widths that are multiples of 256, so the default model ran at a
//! quarter of llama.cpp's speed. [`QLinear`] repacks a GGUF [`QTensor`] once at
//! load into the kernels' interleaved layout and multiplies f32 activations
//! with AVX-512 VNNI / AVX2 (scalar elsewhere). Types or devices the kernels
//! don't cover fall back to candle's [`QMatMul`].

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor};
use salus_kernels::{GgmlType, QuantMatrix};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{ModelError, Result};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Whether [`crate::linear::Linear`] uses Salus' kernels for quantized weights
/// loaded from now on. On by default; `kernels.backend = "candle"` (applied by
/// the loader) or [`set_salus_kernels_enabled`]`(false)` selects candle's
/// `QMatMul` instead, and candle's ops for normalization, rotary embedding and
/// SwiGLU (see [`crate::layers::fast_ops_enabled`]): the reference in the
/// parity tests.
pub fn salus_kernels_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Switches Salus' kernels on or off for models loaded afterwards.
pub fn set_salus_kernels_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The kernels' type for a candle GGML dtype, if they have one.
pub fn kernel_type(dtype: GgmlDType) -> Option<GgmlType> {
    Some(match dtype {
        GgmlDType::Q4_0 => GgmlType::Q4_0,
        GgmlDType::Q4_1 => GgmlType::Q4_1,
        GgmlDType::Q5_0 => GgmlType::Q5_0,
        GgmlDType::Q5_1 => GgmlType::Q5_1,
        GgmlDType::Q8_0 => GgmlType::Q8_0,
        GgmlDType::Q4K => GgmlType::Q4_K,
        GgmlDType::Q5K => GgmlType::Q5_K,
        GgmlDType::Q6K => GgmlType::Q6_K,
        _ => return None,
    })
}

/// `y = x W^T` for a quantized `W` `[out, in]`.
#[derive(Clone)]
pub enum QLinear {
    /// Repacked for Salus' kernels (CPU, supported block type).
    Salus(Arc<QuantMatrix>),
    /// candle's quantized matmul (other types or devices).
    Candle(QMatMul),
}

impl std::fmt::Debug for QLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QLinear::Salus(m) => f.debug_tuple("QLinear::Salus").field(m).finish(),
            QLinear::Candle(_) => f.write_str("QLinear::Candle"),
        }
    }
}

impl QLinear {
    /// Builds from a GGUF tensor `[out, in]`: our kernels on CPU for the types
    /// they cover, candle's `QMatMul` otherwise.
    pub fn from_qtensor(weight: Arc<QTensor>) -> Result<Self> {
        if weight.device().is_cpu() {
            if let Some(ty) = kernel_type(weight.dtype()) {
                let (rows, cols) = weight.shape().dims2()?;
                let data = weight.data()?;
                if let Ok(m) = QuantMatrix::from_ggml_bytes(ty, rows, cols, &data) {
                    return Ok(QLinear::Salus(Arc::new(m)));
                }
            }
        }
        Ok(QLinear::Candle(QMatMul::from_arc(weight)?))
    }

    /// Always candle's `QMatMul` (the reference in tests and benchmarks).
    pub fn candle(weight: Arc<QTensor>) -> Result<Self> {
        Ok(QLinear::Candle(QMatMul::from_arc(weight)?))
    }

    pub fn is_salus(&self) -> bool {
        matches!(self, QLinear::Salus(_))
    }

    /// `x`: `[.., in]` → `[.., out]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            QLinear::Candle(q) => {
                if x.dtype() == DType::F32 {
                    Ok(q.forward(x)?)
                } else {
                    Ok(q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?)
                }
            }
            QLinear::Salus(w) => {
                if !x.device().is_cpu() {
                    return Err(ModelError::Tensor {
                        name: "qlinear input".into(),
                        reason: "CPU quantized weights need a CPU input".into(),
                    });
                }
                let in_dtype = x.dtype();
                let x32 =
                    if in_dtype == DType::F32 { x.contiguous()? } else { x.to_dtype(DType::F32)?.contiguous()? };
                let dims = x32.dims().to_vec();
                let cols = *dims.last().ok_or_else(|| ModelError::Tensor {
                    name: "qlinear input".into(),
                    reason: "scalar input".into(),
                })?;
                if cols != w.cols() {
                    return Err(ModelError::Tensor {
                        name: "qlinear input".into(),
                        reason: format!("last dimension {cols}, the weight expects {}", w.cols()),
                    });
                }
                let m = x32.elem_count() / cols.max(1);
                let mut out = vec![0f32; m * w.rows()];
                {
                    let (storage, layout) = x32.storage_and_layout();
                    let (start, end) = layout.contiguous_offsets().ok_or_else(|| ModelError::Tensor {
                        name: "qlinear input".into(),
                        reason: "not contiguous".into(),
                    })?;
                    let slice = match &*storage {
                        Storage::Cpu(cpu) => &cpu.as_slice::<f32>()?[start..end],
                        _ => {
                            return Err(ModelError::Tensor {
                                name: "qlinear input".into(),
                                reason: "not on the CPU".into(),
                            })
                        }
                    };
                    w.matmul(slice, m, &mut out)
                        .map_err(|e| ModelError::Tensor { name: "qlinear".into(), reason: e.to_string() })?;
                }
                let mut out_dims = dims;
                *out_dims.last_mut().expect("non-empty dims") = w.rows();
                let y = Tensor::from_vec(out, out_dims, &Device::Cpu)?;
                if in_dtype == DType::F32 {
                    Ok(y)
                } else {
                    Ok(y.to_dtype(in_dtype)?)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;

    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / s
    }

    #[test]
    fn salus_kernels_agree_with_candle_qmatmul() {
        let dev = Device::Cpu;
        // 576 is not a multiple of 256: exactly the width candle's fast paths miss.
        let w = Tensor::randn(0f32, 0.05, (100, 576), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 576), &dev).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q5_1] {
            let qt = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let ours = QLinear::from_qtensor(qt.clone()).unwrap();
            assert!(ours.is_salus(), "{dtype:?}");
            let theirs = QLinear::candle(qt).unwrap();
            let a = ours.forward(&x).unwrap();
            let b = theirs.forward(&x).unwrap();
            assert_eq!(a.dims(), &[2, 3, 100]);
            // Both quantize activations to 8 bits (candle per 32 too, Q8_0/Q8_1),
            // so they agree to well under 1% of the output range.
            let e = rel_err(&a, &b);
            assert!(e < 1e-2, "{dtype:?}: relative error {e}");
        }
    }

    #[test]
    fn unsupported_types_fall_back_to_candle() {
        let w = Tensor::randn(0f32, 0.05, (8, 256), &Device::Cpu).unwrap();
        let qt = Arc::new(QTensor::quantize(&w, GgmlDType::Q2K).unwrap());
        assert!(!QLinear::from_qtensor(qt).unwrap().is_salus());
    }

    #[test]
    fn wrong_input_width_is_an_error() {
        let w = Tensor::randn(0f32, 0.05, (8, 64), &Device::Cpu).unwrap();
        let ql = QLinear::from_qtensor(Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap())).unwrap();
        let x = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(ql.forward(&x).is_err());
    }
}

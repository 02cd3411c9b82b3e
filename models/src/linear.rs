//! Linear (fully connected) layers over packed tokens `[T, in] -> [T, out]`.
//!
//! One enum rather than a trait object: the decoder calls `forward` hundreds of
//! times per step and the set of implementations is small and closed. A faster
//! quantized kernel (from `salus-kernels`) is added as another variant here
//! without touching the architectures.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

use crate::Result;

/// How a linear layer stores and applies its weight.
#[derive(Debug, Clone)]
pub enum LinearKind {
    /// A dense weight `[out, in]` in the compute dtype (safetensors, or GGUF f32/f16).
    Dense(Tensor),
    /// A GGUF quantized weight, multiplied by candle's quantized matmul.
    Quantized(QMatMul),
    /// A GGUF quantized weight repacked for Salus' own CPU kernels
    /// (`salus-kernels`); chosen on CPU for the block types they cover.
    Kernel(crate::qlinear::QLinear),
}

/// `y = x W^T (+ b)`.
#[derive(Debug, Clone)]
pub struct Linear {
    kind: LinearKind,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// A dense layer; `weight` is `[out, in]`.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Linear {
            kind: LinearKind::Dense(weight),
            bias,
            in_features,
            out_features,
        })
    }

    /// A layer over a (possibly quantized) GGUF tensor `[out, in]`.
    /// f32/f16/bf16 GGUF tensors are dequantized by candle into a dense matmul.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let kind = match QMatMul::from_arc(weight.clone())? {
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => LinearKind::Dense(t.to_dtype(dtype)?),
            q if crate::qlinear::salus_kernels_enabled() => {
                match crate::qlinear::QLinear::from_qtensor(weight)? {
                    k @ crate::qlinear::QLinear::Salus(_) => LinearKind::Kernel(k),
                    crate::qlinear::QLinear::Candle(_) => LinearKind::Quantized(q),
                }
            }
            q => LinearKind::Quantized(q),
        };
        Ok(Linear {
            kind,
            bias,
            in_features,
            out_features,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }
    pub fn out_features(&self) -> usize {
        self.out_features
    }
    pub fn kind(&self) -> &LinearKind {
        &self.kind
    }

    /// Number of weight parameters (bias included).
    pub fn num_params(&self) -> usize {
        self.in_features * self.out_features + self.bias.as_ref().map_or(0, |b| b.elem_count())
    }

    /// `x`: `[T, in]` → `[T, out]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.kind {
            LinearKind::Dense(w) => x.matmul(&w.t()?)?,
            LinearKind::Kernel(k) => k.forward(x)?,
            LinearKind::Quantized(q) => {
                // candle's quantized matmul takes and returns f32 on CPU.
                if x.dtype() == DType::F32 {
                    q.forward(x)?
                } else {
                    q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
                }
            }
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}

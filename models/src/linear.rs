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
        crate::host_memory::protect_tensor(&weight);
        Ok(Linear { kind: LinearKind::Dense(weight), bias, in_features, out_features })
    }

    /// A layer over a (possibly quantized) GGUF tensor `[out, in]`.
    /// f32/f16/bf16 GGUF tensors are dequantized by candle into a dense matmul.
    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>, dtype: DType) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let kind = match QMatMul::from_arc(weight.clone())? {
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                let dense = t.to_dtype(dtype)?;
                crate::host_memory::protect_tensor(&dense);
                LinearKind::Dense(dense)
            }
            q if crate::qlinear::salus_kernels_enabled() => match crate::qlinear::QLinear::from_qtensor(weight)? {
                k @ crate::qlinear::QLinear::Salus(_) => LinearKind::Kernel(k),
                crate::qlinear::QLinear::Candle(_) => LinearKind::Quantized(q),
            },
            q => LinearKind::Quantized(q),
        };
        Ok(Linear { kind, bias, in_features, out_features })
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

/// Several linear layers that read the same input (Q, K and V; gate and up),
/// run as **one** matmul over their stacked weights when the weights allow it:
/// the input is quantized once, the kernel pool is woken once, and the
/// weights of all parts stream in a single pass. Otherwise the parts run one
/// after the other; results are the same either way.
#[derive(Debug, Clone)]
pub struct StackedLinear {
    /// `out_features` of each part, in order.
    outs: Vec<usize>,
    inner: Stacking,
}

#[derive(Debug, Clone)]
enum Stacking {
    One(Linear),
    Many(Vec<Linear>),
}

impl StackedLinear {
    /// Stacks `parts` (same `in_features`). Kernel-quantized parts of one block
    /// type and dense parts of one dtype are merged; anything else stays apart.
    pub fn new(parts: Vec<Linear>) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| crate::ModelError::InvalidConfig("a stacked linear layer needs at least one part".into()))?;
        let in_features = first.in_features;
        if parts.iter().any(|p| p.in_features != in_features) {
            return Err(crate::ModelError::InvalidConfig("stacked linear layers must share their input width".into()));
        }
        let outs: Vec<usize> = parts.iter().map(|p| p.out_features).collect();
        let inner = match Self::merge(&parts)? {
            Some(one) => Stacking::One(one),
            None => Stacking::Many(parts),
        };
        Ok(StackedLinear { outs, inner })
    }

    fn merge(parts: &[Linear]) -> Result<Option<Linear>> {
        if parts.len() < 2 {
            return Ok(None);
        }
        let out_features: usize = parts.iter().map(|p| p.out_features).sum();
        let in_features = parts[0].in_features;
        let kind = if let Some(mats) = parts
            .iter()
            .map(|p| match &p.kind {
                LinearKind::Kernel(crate::qlinear::QLinear::Salus(m)) => Some(m.as_ref()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            match salus_kernels::QuantMatrix::concat_rows(&mats) {
                Ok(m) => LinearKind::Kernel(crate::qlinear::QLinear::Salus(Arc::new(m))),
                Err(_) => return Ok(None),
            }
        } else if let Some(ws) = parts
            .iter()
            .map(|p| match &p.kind {
                LinearKind::Dense(w) => Some(w),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        {
            if ws.iter().any(|w| w.dtype() != ws[0].dtype()) {
                return Ok(None);
            }
            LinearKind::Dense(Tensor::cat(&ws, 0)?)
        } else {
            return Ok(None);
        };
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            let mut bs = Vec::with_capacity(parts.len());
            for p in parts {
                bs.push(match &p.bias {
                    Some(b) => b.clone(),
                    None => {
                        let like = parts.iter().find_map(|q| q.bias.as_ref()).expect("some bias");
                        Tensor::zeros(p.out_features, like.dtype(), like.device())?
                    }
                });
            }
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Ok(Some(Linear { kind, bias, in_features, out_features }))
    }

    /// Whether the parts run as one matmul.
    pub fn is_merged(&self) -> bool {
        matches!(self.inner, Stacking::One(_))
    }

    /// Number of weight parameters of all parts.
    pub fn num_params(&self) -> usize {
        match &self.inner {
            Stacking::One(l) => l.num_params(),
            Stacking::Many(ls) => ls.iter().map(Linear::num_params).sum(),
        }
    }

    /// `x`: `[T, in]` → `[T, Σ out]`, the parts' outputs side by side.
    pub fn forward_joined(&self, x: &Tensor) -> Result<Tensor> {
        match &self.inner {
            Stacking::One(l) => l.forward(x),
            Stacking::Many(ls) => {
                let ys = ls.iter().map(|l| l.forward(x)).collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&ys, 1)?)
            }
        }
    }

    /// `x`: `[T, in]` → one contiguous `[T, out_i]` per part.
    pub fn forward_split(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match &self.inner {
            Stacking::One(l) => {
                let y = l.forward(x)?;
                let mut at = 0;
                let mut outs = Vec::with_capacity(self.outs.len());
                for &n in &self.outs {
                    outs.push(y.narrow(1, at, n)?.contiguous()?);
                    at += n;
                }
                Ok(outs)
            }
            Stacking::Many(ls) => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }
}

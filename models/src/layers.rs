//! Building blocks shared by the architectures: RMS normalization, rotary
//! position embeddings over *packed* tokens, the SwiGLU gate and the residual add.
//!
//! On CPU with f32 activations these run as plain loops (the SwiGLU gate in
//! `salus_kernels::activation`, vectorized and split over the kernels' pool)
//! rather than through candle's ops: at decode sizes (one row of 576 values)
//! candle hands each op to its rayon pool, and waking a rayon worker costs more
//! than the arithmetic — about 120 such hand-offs per token on a 30-layer
//! model, competing for the same cores as the matmul kernels. Other devices
//! and dtypes use candle's kernels; the tests hold both paths to each other.
//!
//! Packed tokens belong to different sequences at different positions, so the
//! rotary tables are gathered per token (`[T, head_dim/2]`) rather than sliced
//! as one contiguous range; candle's fused rope kernels accept exactly that
//! when the tokens are laid out as a batch of length-1 sequences.

use std::f32::consts::PI;

use candle_core::{DType, Device, Storage, Tensor};

use crate::config::{DecoderConfig, RopeScaling, RopeStyle};
use crate::Result;

/// Whether layers built now use the CPU loops of this module (on by default).
/// They follow the kernel selection of [`crate::qlinear`]: with
/// `kernels.backend = "candle"` (or `set_salus_kernels_enabled(false)`) the model is
/// built on candle's reference kernels and ops throughout, which the parity
/// tests compare against candle-transformers' own models bit for bit.
pub fn fast_ops_enabled() -> bool {
    crate::qlinear::salus_kernels_enabled()
}

/// Runs `f` on `t`'s elements when `t` is a contiguous f32 tensor on the CPU.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok().map(|s| f(&s[start..end])),
        _ => None,
    }
}

/// Root-mean-square layer normalization.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// The weight as f32 values when it lives on the CPU in f32 (fast path).
    cpu_weight: Option<Vec<f32>>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        let cpu_weight = if fast_ops_enabled() { with_cpu_f32(&weight, <[f32]>::to_vec) } else { None };
        RmsNorm { weight, cpu_weight, eps: eps as f32 }
    }

    /// `x`: `[.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(w) = &self.cpu_weight {
            let dims = x.dims().to_vec();
            if dims.last() == Some(&w.len()) {
                if let Some(y) = with_cpu_f32(x, |xs| rms_norm_rows(xs, w, self.eps)) {
                    return Ok(Tensor::from_vec(y, dims, &Device::Cpu)?);
                }
            }
        }
        let x = if x.is_contiguous() { x.clone() } else { x.contiguous()? };
        Ok(candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?)
    }
}

/// `y = x / sqrt(mean(x²) + eps) · w`, row by row (rows of `w.len()` values).
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(w.len()).zip(y.chunks_exact_mut(w.len())) {
        // Sixteen independent partial sums: vectorizes, and keeps rounding close
        // to a pairwise sum.
        let mut acc = [0f32; 16];
        let chunks = xr.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for j in 0..16 {
                acc[j] += c[j] * c[j];
            }
        }
        let sum2 = acc.iter().sum::<f32>() + tail;
        let scale = 1.0 / (sum2 / w.len() as f32 + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
    y
}

/// The residual connection `a + b` (same shape). `fast` selects a plain CPU
/// loop (see [`fast_ops_enabled`]); candle's add otherwise. Both give the same
/// bits: one f32 addition per element.
///
/// Why not candle's add: from 64 Ki elements (a prefill of 114+ tokens of the
/// default model) candle splits it over its own thread pool, whose worker then
/// spins for a while after each op, competing with the matmul kernels for
/// the same cores: a 192-token prefill took 76–78 ms instead of 56 ms.
pub fn residual_add(a: &Tensor, b: &Tensor, fast: bool) -> Result<Tensor> {
    if fast && a.dims() == b.dims() {
        if let Some(Some(y)) =
            with_cpu_f32(a, |xa| with_cpu_f32(b, |xb| xa.iter().zip(xb).map(|(p, q)| p + q).collect::<Vec<f32>>()))
        {
            return Ok(Tensor::from_vec(y, a.dims(), &Device::Cpu)?);
        }
    }
    Ok((a + b)?)
}

/// SwiGLU: `gu` is `[.., 2·n]` (gate, then up); returns `silu(gate) · up`, `[.., n]`.
/// `fast` selects the CPU loop (see [`fast_ops_enabled`]); candle's ops otherwise.
pub fn silu_mul(gu: &Tensor, fast: bool) -> Result<Tensor> {
    let mut dims = gu.dims().to_vec();
    let two_n = *dims.last().unwrap_or(&0);
    if two_n == 0 || !two_n.is_multiple_of(2) {
        return Err(crate::ModelError::InvalidBatch("the gate/up projection has an odd width".into()));
    }
    let n = two_n / 2;
    *dims.last_mut().expect("non-empty dims") = n;
    if !fast {
        return silu_mul_candle(gu, n);
    }
    if let Some(y) = with_cpu_f32(gu, |v| {
        // SIMD and split over the kernels' pool (see `salus_kernels::activation`).
        let mut y = vec![0f32; v.len() / 2];
        salus_kernels::activation::silu_mul(v, n, &mut y);
        y
    }) {
        return Ok(Tensor::from_vec(y, dims, &Device::Cpu)?);
    }
    silu_mul_candle(gu, n)
}

fn silu_mul_candle(gu: &Tensor, n: usize) -> Result<Tensor> {
    let last = gu.rank() - 1;
    let g = gu.narrow(last, 0, n)?;
    let u = gu.narrow(last, n, n)?;
    Ok((candle_nn::ops::silu(&g.contiguous()?)? * u)?)
}

/// Rotary position embedding with the model's frequencies, scaling and pairing style.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    style: RopeStyle,
    /// CPU loop instead of candle's kernels (see [`fast_ops_enabled`]).
    fast: bool,
}

impl RotaryEmbedding {
    pub fn new(cfg: &DecoderConfig) -> Self {
        let d = cfg.head_dim;
        let base: Vec<f32> = (0..d).step_by(2).map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / d as f32)).collect();
        let inv_freq = match cfg.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let orig = original_max_position_embeddings as f32;
                let low_freq_wavelen = orig / low_freq_factor;
                let high_freq_wavelen = orig / high_freq_factor;
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2. * PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1. - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        };
        RotaryEmbedding { inv_freq, style: cfg.rope_style, fast: fast_ops_enabled() }
    }

    /// The per-token tables for `positions`, computed once per forward step
    /// and shared by all layers.
    pub fn tables(&self, positions: &[u32], device: &Device, dtype: candle_core::DType) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        if self.fast && device.is_cpu() && dtype == DType::F32 {
            return Ok(RopeTables::Cpu { cos, sin });
        }
        let shape = (positions.len(), 1, half);
        let cos_t = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin_t = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok(RopeTables::Tensors { cos: cos_t, sin: sin_t })
    }

    /// Rotates `x`: `[T, heads, head_dim]` using tables from [`Self::tables`].
    pub fn apply(&self, x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        if let RopeTables::Cpu { cos, sin } = tables {
            let half = d / 2;
            if cos.len() == t * half {
                let style = self.style;
                if let Some(y) = with_cpu_f32(x, |xs| rope_rows(xs, cos, sin, h, d, style)) {
                    return Ok(Tensor::from_vec(y, (t, h, d), &Device::Cpu)?);
                }
            }
        }
        let (cos, sin) = match tables {
            RopeTables::Tensors { cos, sin } => (cos.clone(), sin.clone()),
            // CPU tables with an input the loop does not take (not f32 or not
            // contiguous on the CPU): candle's kernels on the same values.
            RopeTables::Cpu { cos, sin } => {
                let shape = (cos.len() / (d / 2).max(1), 1, d / 2);
                (
                    Tensor::from_vec(cos.clone(), shape, x.device())?.to_dtype(x.dtype())?,
                    Tensor::from_vec(sin.clone(), shape, x.device())?.to_dtype(x.dtype())?,
                )
            }
        };
        // Each token is a batch entry of one position: candle's kernels then pick
        // table row b for batch entry b.
        let x4 = x.contiguous()?.reshape((t, h, 1, d))?;
        let y = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, &cos, &sin)?,
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x4, &cos, &sin)?,
        };
        Ok(y.reshape((t, h, d))?)
    }
}

/// Per-token rotary tables (`[T, head_dim/2]` cosines and sines): plain vectors
/// on the CPU in f32, device tensors `[T, 1, head_dim/2]` otherwise.
pub enum RopeTables {
    Cpu { cos: Vec<f32>, sin: Vec<f32> },
    Tensors { cos: Tensor, sin: Tensor },
}

/// Rotates `[T, h, d]` rows; token `t` uses table row `t`.
fn rope_rows(x: &[f32], cos: &[f32], sin: &[f32], h: usize, d: usize, style: RopeStyle) -> Vec<f32> {
    let half = d / 2;
    let mut y = vec![0f32; x.len()];
    for (ti, (xt, yt)) in x.chunks_exact(h * d).zip(y.chunks_exact_mut(h * d)).enumerate() {
        let c = &cos[ti * half..(ti + 1) * half];
        let s = &sin[ti * half..(ti + 1) * half];
        for (xh, yh) in xt.chunks_exact(d).zip(yt.chunks_exact_mut(d)) {
            match style {
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (a, b) = (xh[2 * i], xh[2 * i + 1]);
                        yh[2 * i] = a * c[i] - b * s[i];
                        yh[2 * i + 1] = a * s[i] + b * c[i];
                    }
                }
                RopeStyle::HalfSplit => {
                    let (x1, x2) = xh.split_at(half);
                    let (y1, y2) = yh.split_at_mut(half);
                    for i in 0..half {
                        y1[i] = x1[i] * c[i] - x2[i] * s[i];
                        y2[i] = x1[i] * s[i] + x2[i] * c[i];
                    }
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, IndexOp};

    /// Rotating a packed batch equals rotating each token with candle's
    /// contiguous-range kernels (the layout the reference models use).
    #[test]
    fn packed_rope_matches_contiguous_rope() {
        let dev = Device::Cpu;
        for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
            let rope = RotaryEmbedding {
                inv_freq: (0..4).map(|i| 1.0 / 10000f32.powf(i as f32 / 4.0)).collect(),
                style,
                fast: true,
            };
            let x = Tensor::randn(0f32, 1.0, (3, 2, 8), &dev).unwrap();
            let positions = [5u32, 6, 7];
            let tables = rope.tables(&positions, &dev, DType::F32).unwrap();
            let RopeTables::Cpu { cos: c, sin: s } = &tables else { panic!("CPU f32 tables") };
            let (c, s) = (c.clone(), s.clone());
            let cos = Tensor::from_vec(c, (3, 1, 4), &dev).unwrap();
            let sin = Tensor::from_vec(s, (3, 1, 4), &dev).unwrap();
            // The loop path and candle's kernels (the other devices' path) agree.
            let y = rope.apply(&x, &tables).unwrap();
            let via_candle = RopeTables::Tensors { cos: cos.clone(), sin: sin.clone() };
            let y2 = rope.apply(&x, &via_candle).unwrap();
            let d2 = (&y - &y2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d2 < 1e-6, "{style:?}: loop vs candle {d2}");
            // Reference: [1, heads, seq, d] with a [seq, d/2] table.
            let xr = x.transpose(0, 1).unwrap().contiguous().unwrap().unsqueeze(0).unwrap();
            let (c, s) = (cos.squeeze(1).unwrap(), sin.squeeze(1).unwrap());
            let yr = match style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i_slow(&xr, &c, &s).unwrap(),
                RopeStyle::HalfSplit => candle_nn::rotary_emb::rope_slow(&xr, &c, &s).unwrap(),
            };
            let yr = yr.i(0).unwrap().transpose(0, 1).unwrap();
            let diff = (y - yr).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{style:?}: {diff}");
        }
    }

    #[test]
    fn rms_norm_and_swiglu_loops_match_candle() {
        let dev = Device::Cpu;
        let w = Tensor::randn(1f32, 0.1, 48, &dev).unwrap();
        let x = Tensor::randn(0f32, 2.0, (5, 48), &dev).unwrap();
        let norm = RmsNorm::new(w.clone(), 1e-5);
        assert!(norm.cpu_weight.is_some());
        let fast = norm.forward(&x).unwrap();
        let reference = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        let d = (&fast - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "rms norm {d}");

        // Gates far into both tails, where a naive e^(-g) overflows.
        let mut gv: Vec<f32> =
            Tensor::randn(0f32, 4.0, (3, 16), &dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        gv[0] = -120.0;
        gv[1] = 120.0;
        gv[2] = 0.0;
        let g = Tensor::from_vec(gv, (3, 16), &dev).unwrap();
        let u = Tensor::randn(0f32, 1.0, (3, 16), &dev).unwrap();
        let gu = Tensor::cat(&[&g, &u], 1).unwrap();
        let fast = silu_mul(&gu, true).unwrap();
        let reference = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        let slow = silu_mul(&gu, false).unwrap();
        let d = (&slow - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "reference path is candle's");
        let d = (&fast - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "swiglu {d}");
        assert!(fast.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
        assert!(silu_mul(&Tensor::zeros((2, 3), DType::F32, &dev).unwrap(), true).is_err());
    }

    /// The loop gives candle's bits, at a prefill size past candle's threshold
    /// for its own thread pool (64 Ki elements) and for a non-contiguous
    /// operand (which takes candle's path); mismatched shapes are an error.
    #[test]
    fn residual_add_loop_matches_candle_bitwise() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 3.0, (192, 576), &dev).unwrap();
        let b = Tensor::randn(0f32, 3.0, (192, 576), &dev).unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let reference = (&a + &b).unwrap();
        assert_eq!(bits(&residual_add(&a, &b, true).unwrap()), bits(&reference));
        assert_eq!(bits(&residual_add(&a, &b, false).unwrap()), bits(&reference));
        let bt = Tensor::randn(0f32, 1.0, (576, 192), &dev).unwrap().t().unwrap();
        assert!(!bt.is_contiguous());
        assert_eq!(bits(&residual_add(&a, &bt, true).unwrap()), bits(&(&a + &bt).unwrap()));
        let short = Tensor::zeros((191, 576), DType::F32, &dev).unwrap();
        assert!(residual_add(&a, &short, true).is_err());
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let cfg = crate::config::DecoderConfig {
            architecture: crate::config::Architecture::Llama,
            vocab_size: 10,
            hidden_size: 128,
            intermediate_size: 10,
            num_layers: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            rope_style: RopeStyle::HalfSplit,
            max_context: 131072,
            tie_embeddings: false,
            attention_bias: false,
            sliding_window: None,
            bos_token_id: None,
            eos_token_ids: vec![],
        };
        let scaled = RotaryEmbedding::new(&cfg);
        let plain = RotaryEmbedding::new(&DecoderConfig { rope_scaling: RopeScaling::None, ..cfg });
        assert_eq!(scaled.inv_freq[0], plain.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-12);
    }
}

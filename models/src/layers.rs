//! Building blocks shared by the architectures: RMS normalization and rotary
//! position embeddings over *packed* tokens.
//!
//! Packed tokens belong to different sequences at different positions, so the
//! rotary tables are gathered per token (`[T, head_dim/2]`) rather than sliced
//! as one contiguous range; candle's fused rope kernels accept exactly that
//! when the tokens are laid out as a batch of length-1 sequences.

use std::f32::consts::PI;

use candle_core::{Device, Tensor};

use crate::config::{DecoderConfig, RopeScaling, RopeStyle};
use crate::Result;

/// Root-mean-square layer normalization.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        RmsNorm {
            weight,
            eps: eps as f32,
        }
    }

    /// `x`: `[.., hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.is_contiguous() {
            Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
        } else {
            Ok(candle_nn::ops::rms_norm(
                &x.contiguous()?,
                &self.weight,
                self.eps,
            )?)
        }
    }
}

/// Rotary position embedding with the model's frequencies, scaling and pairing style.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    style: RopeStyle,
}

impl RotaryEmbedding {
    pub fn new(cfg: &DecoderConfig) -> Self {
        let d = cfg.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / d as f32))
            .collect();
        let inv_freq = match cfg.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
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
                            let smooth = (orig / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1. - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        };
        RotaryEmbedding {
            inv_freq,
            style: cfg.rope_style,
        }
    }

    /// The per-token tables `(cos, sin)`, each `[T, 1, head_dim/2]`, for `positions`.
    /// Computed once per forward step and shared by all layers.
    pub fn tables(
        &self,
        positions: &[u32],
        device: &Device,
        dtype: candle_core::DType,
    ) -> Result<(Tensor, Tensor)> {
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
        let shape = (positions.len(), 1, half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates `x`: `[T, heads, head_dim]` (contiguous) using tables from [`Self::tables`].
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        // Each token is a batch entry of one position: candle's kernels then pick
        // table row b for batch entry b.
        let x4 = x.reshape((t, h, 1, d))?;
        let y = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, cos, sin)?,
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x4, cos, sin)?,
        };
        Ok(y.reshape((t, h, d))?)
    }
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
                inv_freq: (0..4)
                    .map(|i| 1.0 / 10000f32.powf(i as f32 / 4.0))
                    .collect(),
                style,
            };
            let x = Tensor::randn(0f32, 1.0, (3, 2, 8), &dev).unwrap();
            let positions = [5u32, 6, 7];
            let (cos, sin) = rope.tables(&positions, &dev, DType::F32).unwrap();
            let y = rope.apply(&x, &cos, &sin).unwrap();
            // Reference: [1, heads, seq, d] with a [seq, d/2] table.
            let xr = x
                .transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let (c, s) = (cos.squeeze(1).unwrap(), sin.squeeze(1).unwrap());
            let yr = match style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i_slow(&xr, &c, &s).unwrap(),
                RopeStyle::HalfSplit => candle_nn::rotary_emb::rope_slow(&xr, &c, &s).unwrap(),
            };
            let yr = yr.i(0).unwrap().transpose(0, 1).unwrap();
            let diff = (y - yr)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{style:?}: {diff}");
        }
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
        let plain = RotaryEmbedding::new(&DecoderConfig {
            rope_scaling: RopeScaling::None,
            ..cfg
        });
        assert_eq!(scaled.inv_freq[0], plain.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-12);
    }
}

//! Key/value caches and the attention over them.
//!
//! Attention lives behind [`KvCache::attend`] because how K/V are stored decides
//! how attention must read them: the contiguous cache here uses candle matmuls
//! over one growing buffer per sequence and layer; the paged cache (a later
//! issue) brings its own CPU/CUDA kernel over blocks. The decoder does not care.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::batch::{check_spans, SeqId, SeqSpan};
use crate::{ModelError, Result};

/// Storage of past keys/values plus attention over them.
pub trait KvCache: Send {
    /// Appends the new keys/values of every span of `layer` and computes causal
    /// attention of the new queries over the sequence's whole cached context.
    ///
    /// * `q`: `[T, n_heads, head_dim]`, `k`/`v`: `[T, n_kv_heads, head_dim]`, rotated,
    ///   packed in span order (`spans[i].offset .. + len`).
    /// * `sliding_window`: a query at position `p` sees keys at positions `> p - window`.
    ///
    /// Returns `[T, n_heads * head_dim]`. Every span's `start_pos` must equal the
    /// cached length of its sequence at this layer, else `ModelError::InvalidBatch`
    /// and nothing is modified. After an error in a later layer, the sequences of
    /// that batch are inconsistent and must be [`KvCache::remove`]d.
    fn attend(
        &mut self,
        layer: usize,
        spans: &[SeqSpan],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sliding_window: Option<usize>,
    ) -> Result<Tensor>;

    /// Forgets a sequence and frees its memory.
    fn remove(&mut self, seq: SeqId);

    /// Number of tokens of `seq` already cached (0 for an unknown sequence).
    fn seq_len(&self, seq: SeqId) -> usize;
}

/// One layer of one sequence: token-major buffers `[capacity, n_kv, head_dim]`.
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// A per-sequence contiguous cache: each sequence owns, per layer, a K and a V
/// buffer that grows by doubling. Tokens are stored token-major, so appending a
/// span is one contiguous copy and attention reads the buffers in place
/// (strided matmuls, no `repeat_kv`, no concatenation per step).
pub struct ContiguousKvCache {
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    /// Upper bound on tokens per sequence (the model's context length).
    max_len: usize,
    seqs: HashMap<SeqId, Vec<LayerKv>>,
}

const MIN_CAPACITY: usize = 64;

impl ContiguousKvCache {
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        ContiguousKvCache {
            num_layers,
            num_kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            max_len,
            seqs: HashMap::new(),
        }
    }

    /// Number of sequences held.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// The layer exists and every span fits the cache (see [`check_spans`]).
    fn check_step(&self, layer: usize, spans: &[SeqSpan], total: usize) -> Result<()> {
        if layer >= self.num_layers {
            return Err(ModelError::InvalidBatch(format!("layer {layer} out of range")));
        }
        check_spans(spans, total, Some(self.max_len), |seq| self.seqs.get(&seq).map_or(0, |l| l[layer].len))
    }

    /// Makes room for `extra` more tokens in `kv`, doubling the capacity.
    fn reserve(&self, kv: &mut LayerKv, extra: usize) -> Result<()> {
        let cap = kv.k.dim(0)?;
        let needed = kv.len + extra;
        if needed <= cap {
            return Ok(());
        }
        let new_cap = needed.max(cap * 2).max(MIN_CAPACITY).min(self.max_len.max(needed));
        let shape = (new_cap, self.num_kv_heads, self.head_dim);
        let k = Tensor::zeros(shape, self.dtype, &self.device)?;
        let v = Tensor::zeros(shape, self.dtype, &self.device)?;
        if kv.len > 0 {
            k.slice_set(&kv.k.narrow(0, 0, kv.len)?, 0, 0)?;
            v.slice_set(&kv.v.narrow(0, 0, kv.len)?, 0, 0)?;
        }
        kv.k = k;
        kv.v = v;
        Ok(())
    }
}

impl KvCache for ContiguousKvCache {
    fn attend(
        &mut self,
        layer: usize,
        spans: &[SeqSpan],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sliding_window: Option<usize>,
    ) -> Result<Tensor> {
        let (total, n_heads, head_dim) = q.dims3()?;
        self.check_step(layer, spans, total)?;
        let k = k.to_dtype(self.dtype)?;
        let v = v.to_dtype(self.dtype)?;
        let mut outs = Vec::with_capacity(spans.len());
        for s in spans {
            if !self.seqs.contains_key(&s.seq) {
                let empty = || -> Result<LayerKv> {
                    let z = Tensor::zeros((0, self.num_kv_heads, self.head_dim), self.dtype, &self.device)?;
                    Ok(LayerKv { k: z.clone(), v: z, len: 0 })
                };
                let layers = (0..self.num_layers).map(|_| empty()).collect::<Result<Vec<_>>>()?;
                self.seqs.insert(s.seq, layers);
            }
            let mut kv = {
                let layers = self.seqs.get_mut(&s.seq).expect("inserted above");
                let placeholder =
                    LayerKv { k: layers[layer].k.clone(), v: layers[layer].v.clone(), len: layers[layer].len };
                std::mem::replace(&mut layers[layer], placeholder)
            };
            self.reserve(&mut kv, s.len)?;
            kv.k.slice_set(&k.narrow(0, s.offset, s.len)?.contiguous()?, 0, kv.len)?;
            kv.v.slice_set(&v.narrow(0, s.offset, s.len)?.contiguous()?, 0, kv.len)?;
            kv.len += s.len;
            let q_s = q.narrow(0, s.offset, s.len)?;
            let out = attention(&q_s, &kv.k, &kv.v, kv.len, s.start_pos, sliding_window, n_heads, head_dim)?;
            self.seqs.get_mut(&s.seq).expect("present")[layer] = kv;
            outs.push(out);
        }
        if outs.len() == 1 {
            Ok(outs.pop().expect("one output"))
        } else {
            Ok(Tensor::cat(&outs, 0)?)
        }
    }

    fn remove(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |l| l[0].len)
    }
}

/// Causal grouped-query attention of one sequence's new queries over its cache.
///
/// * `q`: `[len, n_heads, hd]`; `k_buf`/`v_buf`: `[cap, n_kv, hd]` holding `kv_len`
///   tokens, the last `len` of which belong to the queries (positions
///   `start_pos ..`).
///
/// Query heads are grouped by their KV head, giving one batched matmul per step
/// with the K/V buffers read in place. Decode (len 1) needs no mask; a sliding
/// window then just narrows the keys.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &Tensor,
    k_buf: &Tensor,
    v_buf: &Tensor,
    kv_len: usize,
    start_pos: usize,
    sliding_window: Option<usize>,
    n_heads: usize,
    hd: usize,
) -> Result<Tensor> {
    let len = q.dim(0)?;
    let n_kv = k_buf.dim(1)?;
    let groups = n_heads / n_kv;
    let scale = 1.0 / (hd as f64).sqrt();
    let in_dtype = q.dtype();

    // Keys visible to any query of this span.
    let first_key = match sliding_window {
        Some(w) => (start_pos + 1).saturating_sub(w),
        None => 0,
    };
    let n_keys = kv_len - first_key;
    let k = k_buf.narrow(0, first_key, n_keys)?.transpose(0, 1)?; // [n_kv, keys, hd]
    let v = v_buf.narrow(0, first_key, n_keys)?.transpose(0, 1)?;
    let (k, v) = if k.dtype() == DType::F32 { (k, v) } else { (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?) };

    // Rows of the score matrix: (token, group) pairs, token-major.
    let qg = if len == 1 {
        q.reshape((n_kv, groups, hd))?
    } else {
        q.reshape((len, n_kv, groups, hd))?.transpose(0, 1)?.contiguous()?.reshape((n_kv, len * groups, hd))?
    };
    let qg = if qg.dtype() == DType::F32 { qg } else { qg.to_dtype(DType::F32)? };

    let scores = (qg.matmul(&k.t()?)? * scale)?; // [n_kv, len*groups, keys]
    let scores = if len == 1 && sliding_window.is_none_or(|w| w >= n_keys) {
        scores
    } else {
        let mask = causal_mask(len, groups, start_pos, first_key, n_keys, sliding_window, q.device())?;
        scores.broadcast_add(&mask)?
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v)?; // [n_kv, len*groups, hd]
    let out = if len == 1 {
        out.reshape((1, n_heads * hd))?
    } else {
        out.reshape((n_kv, len, groups, hd))?.transpose(0, 1)?.contiguous()?.reshape((len, n_heads * hd))?
    };
    if out.dtype() == in_dtype {
        Ok(out)
    } else {
        Ok(out.to_dtype(in_dtype)?)
    }
}

/// Additive mask `[len*groups, keys]`: 0 where row (token t, any group) may attend
/// key `first_key + j`, `-inf` elsewhere.
fn causal_mask(
    len: usize,
    groups: usize,
    start_pos: usize,
    first_key: usize,
    n_keys: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(len * groups * n_keys);
    for t in 0..len {
        let pos = start_pos + t;
        let lo = sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for _ in 0..groups {
            for j in 0..n_keys {
                let key = first_key + j;
                data.push(if key <= pos && key >= lo { 0f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Ok(Tensor::from_vec(data, (len * groups, n_keys), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> ContiguousKvCache {
        ContiguousKvCache::new(2, 1, 4, 16, DType::F32, &Device::Cpu)
    }

    #[test]
    fn rejects_a_span_at_the_wrong_position_without_modifying_the_cache() {
        let mut c = cache();
        let q = Tensor::zeros((3, 2, 4), DType::F32, &Device::Cpu).unwrap();
        let kv = Tensor::zeros((3, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let spans = [
            SeqSpan { seq: SeqId(1), offset: 0, len: 2, start_pos: 0 },
            SeqSpan { seq: SeqId(2), offset: 2, len: 1, start_pos: 4 },
        ];
        let err = c.attend(0, &spans, &q, &kv, &kv, None).unwrap_err();
        assert!(matches!(err, ModelError::InvalidBatch(_)), "{err}");
        assert_eq!(c.seq_len(SeqId(1)), 0);
        let ok = [SeqSpan { seq: SeqId(1), offset: 0, len: 3, start_pos: 0 }];
        let out = c.attend(0, &ok, &q, &kv, &kv, None).unwrap();
        assert_eq!(out.dims(), &[3, 8]);
        assert_eq!(c.seq_len(SeqId(1)), 3);
        c.remove(SeqId(1));
        assert_eq!(c.seq_len(SeqId(1)), 0);
    }

    #[test]
    fn context_overflow_is_an_error() {
        let mut c = cache();
        let q = Tensor::zeros((17, 2, 4), DType::F32, &Device::Cpu).unwrap();
        let kv = Tensor::zeros((17, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let spans = [SeqSpan { seq: SeqId(1), offset: 0, len: 17, start_pos: 0 }];
        assert!(matches!(c.attend(0, &spans, &q, &kv, &kv, None), Err(ModelError::ContextOverflow { .. })));
    }

    /// Attention over the cache equals a naive per-head softmax(q k^T / sqrt d) v,
    /// for a prefill chunk followed by decode steps, with GQA and a sliding window.
    #[test]
    fn matches_naive_attention() {
        let dev = Device::Cpu;
        let (n_heads, n_kv, hd) = (4, 2, 8);
        for window in [None, Some(3)] {
            let mut c = ContiguousKvCache::new(1, n_kv, hd, 64, DType::F32, &dev);
            let total = 9;
            let q = Tensor::randn(0f32, 1.0, (total, n_heads, hd), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (total, n_kv, hd), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (total, n_kv, hd), &dev).unwrap();
            let mut got = Vec::new();
            // prefill 5, then 4 single steps
            let mut pos = 0;
            for len in [5, 1, 1, 1, 1] {
                let sp = [SeqSpan { seq: SeqId(0), offset: 0, len, start_pos: pos }];
                let o = c
                    .attend(
                        0,
                        &sp,
                        &q.narrow(0, pos, len).unwrap(),
                        &k.narrow(0, pos, len).unwrap(),
                        &v.narrow(0, pos, len).unwrap(),
                        window,
                    )
                    .unwrap();
                got.extend(o.to_vec2::<f32>().unwrap());
                pos += len;
            }
            let (qv, kv, vv) = (q.to_vec3::<f32>().unwrap(), k.to_vec3::<f32>().unwrap(), v.to_vec3::<f32>().unwrap());
            for t in 0..total {
                for h in 0..n_heads {
                    let kh = h / (n_heads / n_kv);
                    let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
                    let s: Vec<f32> = (lo..=t)
                        .map(|j| (0..hd).map(|d| qv[t][h][d] * kv[j][kh][d]).sum::<f32>() / (hd as f32).sqrt())
                        .collect();
                    let m = s.iter().cloned().fold(f32::MIN, f32::max);
                    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for d in 0..hd {
                        let want: f32 = (lo..=t).map(|j| e[j - lo] / z * vv[j][kh][d]).sum();
                        let g = got[t][h * hd + d];
                        assert!((g - want).abs() < 1e-5, "window {window:?} t {t} h {h} d {d}: {g} vs {want}");
                    }
                }
            }
        }
    }
}

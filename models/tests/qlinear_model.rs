//! The default model (SmolLM2-135M-Instruct Q4_1, tied Q8_0 output) with Salus'
//! quantized-matmul kernels against the same model on candle's reference
//! `QMatMul`: greedy decoding of 32 tokens for several prompts must agree.
//!
//! Tolerance: both implementations quantize activations to 8 bits per 32
//! elements (candle's Q8_0/Q8_1 vec-dot types, our per-group i8), but with
//! different rounding and summation order, so logits differ slightly. Until
//! the token sequences diverge, every step's logits must agree within
//! `LOGIT_TOL` (absolute; this model's logits span ~40 units). Measured: on
//! the first prompt candle's quantized logits differ from fully dequantized
//! f32 weights by up to 0.70, ours by up to 1.07, and ours from candle's by
//! 1.37 — activation quantization noise of both, amplified over 30 layers. A
//! greedy-token difference is accepted only at a near-tie, where the reference's
//! margin between its choice and ours is below `LOGIT_TOL`; ours is fed the
//! reference's tokens (teacher forcing), and at least 90% of the greedy
//! choices must be identical. Skipped, with a message, when the
//! model file is absent.

mod common;

use candle_core::quantized::gguf_file::Content;
use candle_core::IndexOp;
use salus_models::dev_model::default_model_if_present;
use salus_models::qlinear::set_salus_kernels_enabled;
use salus_models::sampling::argmax;
use salus_models::{KvCache, LoadOptions, Model, ModelSource, PackedBatch, SeqId, Tokenizer, WeightBytes};

const LOGIT_TOL: f32 = 2.5;
const STEPS: usize = 32;

fn load(bytes: &[u8], salus: bool) -> Model {
    set_salus_kernels_enabled(salus);
    let src = ModelSource::from_gguf_bytes("SmolLM2-135M-Instruct.Q4_1.gguf", WeightBytes::from_vec(bytes.to_vec()));
    let model = Model::load_weights(&src, &LoadOptions::default()).unwrap().0;
    set_salus_kernels_enabled(true);
    model
}

/// Each step's logits when decoding `prompt` followed by `forced` tokens
/// (greedy when `forced` is `None`: each step feeds its own argmax).
fn decode(model: &Model, prompt: &[u32], forced: Option<&[u32]>) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache();
    let seq = SeqId(1);
    let mut b = PackedBatch::new();
    b.push(seq, prompt, 0).unwrap();
    let mut logits = model.forward(&b, &mut cache).unwrap().i(0).unwrap().to_vec1::<f32>().unwrap();
    let mut toks = Vec::new();
    let mut all = Vec::new();
    for step in 0..STEPS {
        let t = forced.map_or_else(|| argmax(&logits), |f| f[step]);
        toks.push(t);
        all.push(logits);
        if step + 1 == STEPS {
            break;
        }
        let mut b = PackedBatch::new();
        b.push(seq, &[t], prompt.len() + step).unwrap();
        logits = model.forward(&b, &mut cache).unwrap().i(0).unwrap().to_vec1::<f32>().unwrap();
    }
    assert_eq!(cache.seq_len(seq), prompt.len() + STEPS - 1);
    (toks, all)
}

#[test]
fn greedy_output_matches_candle_reference_kernels() {
    let Some(path) = default_model_if_present() else {
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let md = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap().metadata;
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
    let reference = load(&bytes, false);
    let ours = load(&bytes, true);
    let prompts = [
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nList three symptoms of dehydration.<|im_end|>\n<|im_start|>assistant\n",
        "The patient was admitted with shortness of breath and",
    ];
    let mut total_equal = 0;
    for (pi, p) in prompts.iter().enumerate() {
        let ids = tok.encode(p, false).unwrap();
        // The reference's greedy continuation; ours is fed the same tokens
        // (teacher forcing) so one near-tie does not derail the comparison.
        let (want, want_logits) = decode(&reference, &ids, None);
        let (_, got_logits) = decode(&ours, &ids, Some(&want));
        let mut max_diff = 0f32;
        let mut equal = 0;
        for step in 0..STEPS {
            let d = want_logits[step].iter().zip(&got_logits[step]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            max_diff = max_diff.max(d);
            assert!(d <= LOGIT_TOL, "prompt {pi} step {step}: max |logit diff| {d} > {LOGIT_TOL}");
            let ours_tok = argmax(&got_logits[step]);
            if ours_tok == want[step] {
                equal += 1;
            } else {
                let margin = want_logits[step][want[step] as usize] - want_logits[step][ours_tok as usize];
                assert!(
                    margin < LOGIT_TOL,
                    "prompt {pi} step {step}: greedy tokens differ with reference margin {margin}"
                );
            }
        }
        eprintln!("prompt {pi}: {equal}/{STEPS} greedy tokens equal, max |logit diff| {max_diff}");
        total_equal += equal;
    }
    // Near-ties are rare: nearly all greedy choices must be identical.
    assert!(total_equal * 10 >= prompts.len() * STEPS * 9, "only {total_equal} greedy tokens equal");
}

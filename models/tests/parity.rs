//! Our decoder against candle-transformers' reference implementations on tiny
//! random-weight models: prefill logits and 20 decode steps must agree to 1e-4.

mod common;

use std::collections::HashMap;
use std::io::Cursor;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use common::*;
use salus_models::{KvCache, LoadOptions, Model, ModelSource, PackedBatch, SeqId, WeightBytes};

const TOL: f32 = 1e-4;
const DECODE_STEPS: usize = 20;

/// Our logits: after the prompt, then after each of `steps` fed one at a time.
fn ours(model: &Model, prompt: &[u32], steps: &[u32]) -> Vec<Tensor> {
    let mut cache = model.new_cache();
    let seq = SeqId(7);
    let mut out = Vec::new();
    let mut b = PackedBatch::new();
    b.push(seq, prompt, 0).unwrap();
    out.push(model.forward(&b, &mut cache).unwrap().i(0).unwrap());
    for (i, &t) in steps.iter().enumerate() {
        let mut b = PackedBatch::new();
        b.push(seq, &[t], prompt.len() + i).unwrap();
        out.push(model.forward(&b, &mut cache).unwrap().i(0).unwrap());
    }
    assert_eq!(cache.seq_len(seq), prompt.len() + steps.len());
    out
}

fn compare(name: &str, ours: &[Tensor], reference: &[Tensor]) {
    assert_eq!(ours.len(), reference.len());
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < TOL, "{name}: step {i}: max |diff| = {d}");
    }
    // The reference must not be trivially constant: logits vary across steps.
    assert!(max_abs_diff(&reference[0], &reference[1]) > 1e-3, "{name}: degenerate test model");
}

fn var_builder(tensors: &std::collections::BTreeMap<String, Tensor>) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
}

/// A reference implementation's logits, like [`ours`]: `forward(input, start_pos)`
/// runs the `[1, n]` token tensor through the reference and returns its logits.
fn reference_logits(prompt: &[u32], steps: &[u32], mut forward: impl FnMut(&Tensor, usize) -> Tensor) -> Vec<Tensor> {
    let input = |ids: &[u32]| Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut want = vec![forward(&input(prompt), 0)];
    for (i, &t) in steps.iter().enumerate() {
        want.push(forward(&input(&[t]), prompt.len() + i));
    }
    want
}

fn load(src: &ModelSource) -> Model {
    Model::load_weights(src, &LoadOptions::default()).unwrap().0
}

#[test]
fn llama_safetensors_matches_candle_llama() {
    use candle_transformers::models::llama as reference;
    // Llama 3.1 rope scaling, shipped in two shards.
    let json = llama_config_json(
        r#","rope_scaling":{"rope_type":"llama3","factor":4.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}"#,
    );
    let tensors = hf_tensors(1, false, false);
    let model = load(&hf_source(&json, &tensors, 2, DType::F32));
    let prompt = tokens(1, 13);
    let steps = tokens(2, DECODE_STEPS);

    let cfg: reference::LlamaConfig = serde_json::from_str(&json).unwrap();
    let cfg = cfg.into_config(false);
    let r = reference::Llama::load(var_builder(&tensors), &cfg).unwrap();
    let mut cache = reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let want = reference_logits(&prompt, &steps, |x, pos| r.forward(x, pos, &mut cache).unwrap().i(0).unwrap());
    compare("llama", &ours(&model, &prompt, &steps), &want);
}

#[test]
fn llama_tied_bf16_safetensors_loads_and_runs() {
    // bf16 on disk, computed in f32; tied output projection.
    let json = llama_config_json(r#","tie_word_embeddings":true"#);
    let tensors = hf_tensors(3, false, true);
    let src = hf_source(&json, &tensors, 1, DType::BF16);
    let (model, info) = Model::load_weights(&src, &LoadOptions::default()).unwrap();
    assert_eq!(info.quantization, "BF16");
    assert_eq!(info.vocab_size, VOCAB);
    assert_eq!(info.eos_token_ids, vec![2]);
    let logits = ours(&model, &tokens(1, 5), &tokens(2, 2));
    assert_eq!(logits[0].dims(), &[VOCAB]);
    // Same weights rounded through f16 instead: close but not identical logits.
    let src16 = hf_source(&json, &tensors, 1, DType::F16);
    let l16 = ours(&load(&src16), &tokens(1, 5), &tokens(2, 2));
    let d = max_abs_diff(&logits[2], &l16[2]);
    assert!(d > 0.0 && d < 0.2, "bf16 vs f16 weights: {d}");
}

#[test]
fn qwen2_safetensors_matches_candle_qwen2() {
    use candle_transformers::models::qwen2 as reference;
    let json = format!(
        r#"{{"model_type":"qwen2","vocab_size":{VOCAB},"hidden_size":{HIDDEN},"intermediate_size":{INTER},
        "num_hidden_layers":{LAYERS},"num_attention_heads":{HEADS},"num_key_value_heads":{KV_HEADS},
        "max_position_embeddings":256,"sliding_window":4096,"max_window_layers":{LAYERS},
        "tie_word_embeddings":true,"rope_theta":10000.0,"rms_norm_eps":1e-6,"use_sliding_window":false,
        "hidden_act":"silu","eos_token_id":2}}"#
    );
    let tensors = hf_tensors(5, true, true);
    let model = load(&hf_source(&json, &tensors, 1, DType::F32));
    let prompt = tokens(3, 11);
    let steps = tokens(4, DECODE_STEPS);

    let cfg: reference::Config = serde_json::from_str(&json).unwrap();
    let mut r = reference::ModelForCausalLM::new(&cfg, var_builder(&tensors)).unwrap();
    let want = reference_logits(&prompt, &steps, |x, pos| r.forward(x, pos).unwrap().flatten_all().unwrap());
    compare("qwen2", &ours(&model, &prompt, &steps), &want);
}

fn mistral_json(window: usize) -> String {
    format!(
        r#"{{"model_type":"mistral","vocab_size":{VOCAB},"hidden_size":{HIDDEN},"intermediate_size":{INTER},
        "num_hidden_layers":{LAYERS},"num_attention_heads":{HEADS},"num_key_value_heads":{KV_HEADS},
        "max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":10000.0,"sliding_window":{window},
        "hidden_act":"silu"}}"#
    )
}

#[test]
fn mistral_safetensors_matches_candle_mistral() {
    use candle_transformers::models::mistral as reference;
    let json = mistral_json(4096);
    let tensors = hf_tensors(7, false, false);
    let model = load(&hf_source(&json, &tensors, 3, DType::F32));
    let prompt = tokens(5, 9);
    let steps = tokens(6, DECODE_STEPS);

    let cfg: reference::Config = serde_json::from_str(&json).unwrap();
    let mut r = reference::Model::new(&cfg, var_builder(&tensors)).unwrap();
    let want = reference_logits(&prompt, &steps, |x, pos| r.forward(x, pos).unwrap().flatten_all().unwrap());
    compare("mistral", &ours(&model, &prompt, &steps), &want);
}

/// Sliding window: our prefill equals candle mistral's (whose window `w` lets a
/// query see `w + 1` keys, i.e. our window `w + 1`), and our decode path (which
/// narrows the keys) equals our prefill path (which masks) at every position.
#[test]
fn mistral_sliding_window() {
    use candle_transformers::models::mistral as reference;
    let window = 5;
    let tensors = hf_tensors(9, false, false);
    let model = load(&hf_source(&mistral_json(window), &tensors, 1, DType::F32));
    let all = tokens(8, 16);

    let cfg: reference::Config = serde_json::from_str(&mistral_json(window - 1)).unwrap();
    let mut r = reference::Model::new(&cfg, var_builder(&tensors)).unwrap();
    let want = r
        .forward(&Tensor::new(all.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap(), 0)
        .unwrap()
        .flatten_all()
        .unwrap();
    let full = ours(&model, &all, &[]);
    let d = max_abs_diff(&full[0], &want);
    assert!(d < TOL, "windowed prefill vs candle: {d}");

    // Without the window the logits differ (the window matters for this input).
    let unwindowed = load(&hf_source(&mistral_json(4096), &tensors, 1, DType::F32));
    assert!(max_abs_diff(&ours(&unwindowed, &all, &[])[0], &full[0]) > 1e-3);

    let incremental = ours(&model, &all[..6], &all[6..]);
    for (i, got) in incremental.iter().enumerate() {
        let prefix = &all[..6 + i];
        let want = &ours(&model, prefix, &[])[0];
        let d = max_abs_diff(got, want);
        assert!(d < TOL, "decode vs prefill at length {}: {d}", prefix.len());
    }
}

#[test]
fn gguf_matches_candle_quantized_llama() {
    use candle_transformers::models::quantized_llama as reference;
    // Same quantized matmul as the reference (Salus' kernels, the default, round
    // differently); the other tests in this binary use dense safetensors
    // weights, which this switch does not affect.
    salus_models::qlinear::set_salus_kernels_enabled(false);
    let bytes = gguf_bytes("llama", 11);
    let src = ModelSource::from_gguf_bytes("tiny.gguf", WeightBytes::from_vec(bytes.clone()));
    let (model, info) = Model::load_weights(&src, &LoadOptions::default()).unwrap();
    assert!(info.quantization.contains("Q8_0") && info.quantization.contains("Q4_1"), "{}", info.quantization);
    let prompt = tokens(9, 12);
    let steps = tokens(10, DECODE_STEPS);

    let mut cur = Cursor::new(bytes.as_slice());
    let content = candle_core::quantized::gguf_file::Content::read(&mut cur).unwrap();
    let mut r = reference::ModelWeights::from_gguf(content, &mut cur, &Device::Cpu).unwrap();
    let want = reference_logits(&prompt, &steps, |x, pos| r.forward(x, pos).unwrap().i(0).unwrap());
    compare("gguf llama", &ours(&model, &prompt, &steps), &want);
}

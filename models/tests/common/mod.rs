//! Helpers shared by the model tests: tiny random-weight models written to
//! in-memory safetensors / GGUF bytes, logit comparison, and finding and
//! loading the default model.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Cursor;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use salus_models::chat::{ChatMessage, Role};
use salus_models::{load, LoadOptions, LoadedModel, ModelSource, WeightBytes};

use salus_models::dev_model::default_model_if_present;

/// The default model loaded whole (network, tokenizer, chat template), or
/// `None`, with a skip message, when its file is absent.
pub fn load_default_model() -> Option<LoadedModel> {
    let path = default_model_if_present()?;
    let source = ModelSource::read_plaintext(&path).expect("read model");
    Some(load(&source, &LoadOptions::default()).expect("load default model"))
}

/// `question` as one user turn in the model's own chat template, tokenized.
pub fn chat_ids(lm: &LoadedModel, question: &str) -> Vec<u32> {
    let template = lm.chat_template.as_ref().expect("SmolLM2 ships a chat template");
    let text = template.render(&[ChatMessage::new(Role::User, question)], true).unwrap();
    lm.tokenizer.encode(text.expose(), false).unwrap()
}

pub const VOCAB: usize = 96;
pub const HIDDEN: usize = 64;
pub const INTER: usize = 128;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;

/// Deterministic pseudo-random tensor (xorshift), values in [-scale, scale] + offset.
pub fn rand_tensor(seed: u64, shape: &[usize], scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            offset + scale * (2.0 * u - 1.0)
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// HF-named tensors of a tiny Llama-layout model.
pub fn hf_tensors(seed: u64, bias: bool, tie: bool) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    let mut k = seed;
    let mut next = || {
        k += 1;
        k
    };
    m.insert("model.embed_tokens.weight".into(), rand_tensor(next(), &[VOCAB, HIDDEN], 0.5, 0.0));
    m.insert("model.norm.weight".into(), rand_tensor(next(), &[HIDDEN], 0.2, 1.0));
    if !tie {
        m.insert("lm_head.weight".into(), rand_tensor(next(), &[VOCAB, HIDDEN], 0.2, 0.0));
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let lin = 1.0 / (HIDDEN as f32).sqrt() * 1.7;
        m.insert(format!("{p}.input_layernorm.weight"), rand_tensor(next(), &[HIDDEN], 0.2, 1.0));
        m.insert(format!("{p}.post_attention_layernorm.weight"), rand_tensor(next(), &[HIDDEN], 0.2, 1.0));
        m.insert(format!("{p}.self_attn.q_proj.weight"), rand_tensor(next(), &[HEADS * HEAD_DIM, HIDDEN], lin, 0.0));
        m.insert(format!("{p}.self_attn.k_proj.weight"), rand_tensor(next(), &[KV_HEADS * HEAD_DIM, HIDDEN], lin, 0.0));
        m.insert(format!("{p}.self_attn.v_proj.weight"), rand_tensor(next(), &[KV_HEADS * HEAD_DIM, HIDDEN], lin, 0.0));
        m.insert(format!("{p}.self_attn.o_proj.weight"), rand_tensor(next(), &[HIDDEN, HEADS * HEAD_DIM], lin, 0.0));
        if bias {
            m.insert(format!("{p}.self_attn.q_proj.bias"), rand_tensor(next(), &[HEADS * HEAD_DIM], 0.3, 0.0));
            m.insert(format!("{p}.self_attn.k_proj.bias"), rand_tensor(next(), &[KV_HEADS * HEAD_DIM], 0.3, 0.0));
            m.insert(format!("{p}.self_attn.v_proj.bias"), rand_tensor(next(), &[KV_HEADS * HEAD_DIM], 0.3, 0.0));
        }
        m.insert(format!("{p}.mlp.gate_proj.weight"), rand_tensor(next(), &[INTER, HIDDEN], lin, 0.0));
        m.insert(format!("{p}.mlp.up_proj.weight"), rand_tensor(next(), &[INTER, HIDDEN], lin, 0.0));
        m.insert(
            format!("{p}.mlp.down_proj.weight"),
            rand_tensor(next(), &[HIDDEN, INTER], 1.0 / (INTER as f32).sqrt() * 1.7, 0.0),
        );
    }
    m
}

/// Serializes f32 tensors into safetensors bytes (format: u64 header length,
/// JSON header, raw little-endian data).
pub fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>, dtype: DType) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, t) in tensors {
        let t = t.to_dtype(dtype).unwrap();
        let start = data.len();
        match dtype {
            DType::F32 => t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .for_each(|x| data.extend_from_slice(&x.to_le_bytes())),
            DType::F16 => t
                .flatten_all()
                .unwrap()
                .to_vec1::<half::f16>()
                .unwrap()
                .iter()
                .for_each(|x| data.extend_from_slice(&x.to_le_bytes())),
            DType::BF16 => t
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .for_each(|x| data.extend_from_slice(&x.to_le_bytes())),
            _ => unreachable!("test helper supports f32/f16/bf16"),
        }
        let dt = match dtype {
            DType::F32 => "F32",
            DType::F16 => "F16",
            _ => "BF16",
        };
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dt, "shape": t.dims(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

/// An HF model directory in memory: config.json + the tensors split over `shards` files.
pub fn hf_source(config_json: &str, tensors: &BTreeMap<String, Tensor>, shards: usize, dtype: DType) -> ModelSource {
    let mut src = ModelSource::new("tiny");
    src.insert("config.json", WeightBytes::from_vec(config_json.as_bytes().to_vec()));
    let names: Vec<_> = tensors.keys().cloned().collect();
    let per = names.len().div_ceil(shards);
    for (i, chunk) in names.chunks(per).enumerate() {
        let part: BTreeMap<String, Tensor> = chunk.iter().map(|n| (n.clone(), tensors[n].clone())).collect();
        src.insert(
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards),
            WeightBytes::from_vec(safetensors_bytes(&part, dtype)),
        );
    }
    src
}

pub fn llama_config_json(extra: &str) -> String {
    format!(
        r#"{{"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":{VOCAB},"hidden_size":{HIDDEN},
        "intermediate_size":{INTER},"num_hidden_layers":{LAYERS},"num_attention_heads":{HEADS},
        "num_key_value_heads":{KV_HEADS},"rms_norm_eps":1e-5,"rope_theta":10000.0,
        "max_position_embeddings":256,"bos_token_id":1,"eos_token_id":2,"hidden_act":"silu"{extra}}}"#
    )
}

/// GGUF tensors (llama.cpp names) of a tiny llama model with mixed quantization;
/// the output projection is tied to the (Q8_0) embedding.
pub fn gguf_bytes(arch: &str, seed: u64) -> Vec<u8> {
    let hf = hf_tensors(seed, false, true);
    let q = |name: &str, dt: GgmlDType| QTensor::quantize(&hf[name], dt).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q("model.embed_tokens.weight", GgmlDType::Q8_0)),
        ("output_norm.weight".into(), q("model.norm.weight", GgmlDType::F32)),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        tensors.push((format!("{b}.attn_norm.weight"), q(&format!("{p}.input_layernorm.weight"), GgmlDType::F32)));
        tensors
            .push((format!("{b}.ffn_norm.weight"), q(&format!("{p}.post_attention_layernorm.weight"), GgmlDType::F32)));
        tensors.push((format!("{b}.attn_q.weight"), q(&format!("{p}.self_attn.q_proj.weight"), GgmlDType::Q8_0)));
        tensors.push((format!("{b}.attn_k.weight"), q(&format!("{p}.self_attn.k_proj.weight"), GgmlDType::Q4_0)));
        tensors.push((format!("{b}.attn_v.weight"), q(&format!("{p}.self_attn.v_proj.weight"), GgmlDType::Q4_1)));
        tensors.push((format!("{b}.attn_output.weight"), q(&format!("{p}.self_attn.o_proj.weight"), GgmlDType::F32)));
        tensors.push((format!("{b}.ffn_gate.weight"), q(&format!("{p}.mlp.gate_proj.weight"), GgmlDType::Q4_1)));
        tensors.push((format!("{b}.ffn_up.weight"), q(&format!("{p}.mlp.up_proj.weight"), GgmlDType::Q8_0)));
        tensors.push((format!("{b}.ffn_down.weight"), q(&format!("{p}.mlp.down_proj.weight"), GgmlDType::Q4_0)));
    }
    use gguf_file::Value;
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.context_length"), Value::U32(256)),
        (format!("{arch}.embedding_length"), Value::U32(HIDDEN as u32)),
        (format!("{arch}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{arch}.feed_forward_length"), Value::U32(INTER as u32)),
        (format!("{arch}.attention.head_count"), Value::U32(HEADS as u32)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (format!("{arch}.rope.dimension_count"), Value::U32(HEAD_DIM as u32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut cur = Cursor::new(Vec::new());
    gguf_file::write(&mut cur, &md_refs, &t_refs).unwrap();
    cur.into_inner()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    let b = b.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims(), "logit shapes differ");
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// A deterministic token sequence.
pub fn tokens(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(37).wrapping_add(seed * 11) + 3) % VOCAB as u32).collect()
}

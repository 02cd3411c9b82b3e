//! Single-stream speed on the default model: prompt processing (tokens/s over a
//! 128-token prompt, one prefill step) and greedy decode (tokens/s over 128
//! steps), for Salus' decoder and for candle-transformers' `quantized_llama` on
//! the same file and prompt.
//!
//! Run: `cargo bench --bench generate` (model: `$SALUS_MODEL`, else the
//! location `scripts/fetch-model.sh` caches it at). Sizes: `SALUS_BENCH_PROMPT`,
//! `SALUS_BENCH_DECODE`.

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use salus_models::{load, LoadOptions, ModelSource, PackedBatch, SeqId};

fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("SALUS_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var("SALUS_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/salus/models")
        });
    dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

struct Speed {
    prompt_tps: f64,
    decode_tps: f64,
    tokens: Vec<u32>,
}

fn bench_salus(source: &ModelSource, prompt: &[u32], decode: usize) -> Speed {
    let lm = load(source, &LoadOptions::default()).expect("load model");
    let run = |n_prompt: usize, n_decode: usize| -> Speed {
        let mut cache = lm.model.new_cache();
        let mut b = PackedBatch::new();
        b.push(SeqId(0), &prompt[..n_prompt], 0).unwrap();
        let t0 = Instant::now();
        let logits = lm
            .model
            .forward(&b, &mut cache)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let prompt_secs = t0.elapsed().as_secs_f64();
        let mut tok = argmax(&logits);
        let mut tokens = vec![tok];
        let t1 = Instant::now();
        for i in 0..n_decode {
            let mut b = PackedBatch::new();
            b.push(SeqId(0), &[tok], n_prompt + i).unwrap();
            let logits = lm
                .model
                .forward(&b, &mut cache)
                .unwrap()
                .i(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            tok = argmax(&logits);
            tokens.push(tok);
        }
        let decode_secs = t1.elapsed().as_secs_f64();
        Speed {
            prompt_tps: n_prompt as f64 / prompt_secs,
            decode_tps: n_decode as f64 / decode_secs,
            tokens,
        }
    };
    run(16, 8); // warm-up
    run(prompt.len(), decode)
}

fn bench_candle(bytes: &[u8], prompt: &[u32], decode: usize) -> Speed {
    let dev = Device::Cpu;
    let load = || {
        let mut cur = Cursor::new(bytes);
        let content = candle_core::quantized::gguf_file::Content::read(&mut cur).expect("gguf");
        ModelWeights::from_gguf(content, &mut cur, &dev).expect("candle quantized_llama")
    };
    let run = |n_prompt: usize, n_decode: usize| -> Speed {
        let mut m = load();
        let input = Tensor::new(&prompt[..n_prompt], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let t0 = Instant::now();
        let logits = m
            .forward(&input, 0)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let prompt_secs = t0.elapsed().as_secs_f64();
        let mut tok = argmax(&logits);
        let mut tokens = vec![tok];
        let t1 = Instant::now();
        for i in 0..n_decode {
            let input = Tensor::new(&[[tok]], &dev).unwrap();
            let logits = m
                .forward(&input, n_prompt + i)
                .unwrap()
                .i(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            tok = argmax(&logits);
            tokens.push(tok);
        }
        let decode_secs = t1.elapsed().as_secs_f64();
        Speed {
            prompt_tps: n_prompt as f64 / prompt_secs,
            decode_tps: n_decode as f64 / decode_secs,
            tokens,
        }
    };
    run(16, 8); // warm-up
    run(prompt.len(), decode)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing special.
    let path = model_path();
    if !path.exists() {
        eprintln!(
            "generate bench: model {} not found; run scripts/fetch-model.sh or set SALUS_MODEL",
            path.display()
        );
        return;
    }
    let n_prompt = env_usize("SALUS_BENCH_PROMPT", 128);
    let n_decode = env_usize("SALUS_BENCH_DECODE", 128);
    let source = ModelSource::read_plaintext(&path).expect("read model");
    let tokenizer = load(&source, &LoadOptions::default())
        .expect("load")
        .tokenizer;
    let text = "The patient is a 67-year-old man with a history of hypertension, type 2 diabetes and chronic kidney \
                disease who presents with two days of worsening shortness of breath, orthopnea and bilateral leg \
                swelling. Blood pressure 162/94 mmHg, heart rate 104, SpO2 91% on room air. ";
    let mut prompt = Vec::new();
    while prompt.len() < n_prompt {
        prompt.extend(tokenizer.encode(text, false).expect("encode"));
    }
    prompt.truncate(n_prompt);
    let gguf_bytes = source
        .gguf()
        .expect("the default model is a GGUF file")
        .1
        .as_slice()
        .to_vec();

    let ours = bench_salus(&source, &prompt, n_decode);
    let candle = bench_candle(&gguf_bytes, &prompt, n_decode);
    let same = ours.tokens == candle.tokens;
    println!("model: {}", path.display());
    println!(
        "prompt {n_prompt} tokens, decode {n_decode} tokens (greedy), threads: {}",
        candle_core::utils::get_num_threads()
    );
    println!(
        "salus          : prompt {:8.1} tok/s   decode {:6.1} tok/s",
        ours.prompt_tps, ours.decode_tps
    );
    println!(
        "candle q_llama : prompt {:8.1} tok/s   decode {:6.1} tok/s",
        candle.prompt_tps, candle.decode_tps
    );
    println!(
        "decode speed ratio salus/candle: {:.2}; greedy tokens identical: {same}",
        ours.decode_tps / candle.decode_tps
    );
}

//! Single-stream speed on the default model: prompt processing (tokens/s over a
//! 128-token prompt, one prefill step) and greedy decode (tokens/s over 128
//! steps), for Salus' decoder and for candle-transformers' `quantized_llama` on
//! the same file and prompt.
//!
//! Run: `cargo bench --bench generate` (model: `$SALUS_MODEL`, else the
//! location `scripts/fetch-model.sh` caches it at). Sizes: `SALUS_BENCH_PROMPT`,
//! `SALUS_BENCH_DECODE`.

// The default model's location and greedy choice, shared with the model tests.
use std::io::Cursor;
use std::time::Instant;

use candle_core::{Device, IndexOp, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use salus_models::dev_model::default_model_if_present;
use salus_models::sampling::argmax;
use salus_models::{load, LoadOptions, ModelSource, PackedBatch, SeqId};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Speed {
    prompt_tps: f64,
    decode_tps: f64,
    tokens: Vec<u32>,
}

/// Times a prefill of `prompt` (one step) and `n_decode` greedy steps through
/// `forward(tokens, start_pos)`, which returns the last position's logits.
fn timed_greedy(prompt: &[u32], n_decode: usize, mut forward: impl FnMut(&[u32], usize) -> Vec<f32>) -> Speed {
    let t0 = Instant::now();
    let logits = forward(prompt, 0);
    let prompt_secs = t0.elapsed().as_secs_f64();
    let mut tok = argmax(&logits);
    let mut tokens = vec![tok];
    let t1 = Instant::now();
    for i in 0..n_decode {
        tok = argmax(&forward(&[tok], prompt.len() + i));
        tokens.push(tok);
    }
    let decode_secs = t1.elapsed().as_secs_f64();
    Speed { prompt_tps: prompt.len() as f64 / prompt_secs, decode_tps: n_decode as f64 / decode_secs, tokens }
}

fn bench_salus(source: &ModelSource, prompt: &[u32], decode: usize) -> Speed {
    let lm = load(source, &LoadOptions::default()).expect("load model");
    let run = |prompt: &[u32], n_decode: usize| -> Speed {
        let mut cache = lm.model.new_cache();
        timed_greedy(prompt, n_decode, |tokens, start_pos| {
            let mut b = PackedBatch::new();
            b.push(SeqId(0), tokens, start_pos).unwrap();
            let logits = lm.model.forward(&b, &mut cache).unwrap();
            logits.i(0).unwrap().to_vec1::<f32>().unwrap()
        })
    };
    run(&prompt[..16], 8); // warm-up
    run(prompt, decode)
}

fn bench_candle(bytes: &[u8], prompt: &[u32], decode: usize) -> Speed {
    let dev = Device::Cpu;
    let load = || {
        let mut cur = Cursor::new(bytes);
        let content = candle_core::quantized::gguf_file::Content::read(&mut cur).expect("gguf");
        ModelWeights::from_gguf(content, &mut cur, &dev).expect("candle quantized_llama")
    };
    let run = |prompt: &[u32], n_decode: usize| -> Speed {
        let mut m = load();
        timed_greedy(prompt, n_decode, |tokens, start_pos| {
            let input = Tensor::new(tokens, &dev).unwrap().unsqueeze(0).unwrap();
            let logits = m.forward(&input, start_pos).unwrap();
            logits.i(0).unwrap().to_vec1::<f32>().unwrap()
        })
    };
    run(&prompt[..16], 8); // warm-up
    run(prompt, decode)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing special.
    let Some(path) = default_model_if_present() else {
        return;
    };
    let n_prompt = env_usize("SALUS_BENCH_PROMPT", 128);
    let n_decode = env_usize("SALUS_BENCH_DECODE", 128);
    let source = ModelSource::read_plaintext(&path).expect("read model");
    let tokenizer = load(&source, &LoadOptions::default()).expect("load").tokenizer;
    let text = "The patient is a 67-year-old man with a history of hypertension, type 2 diabetes and chronic kidney \
                disease who presents with two days of worsening shortness of breath, orthopnea and bilateral leg \
                swelling. Blood pressure 162/94 mmHg, heart rate 104, SpO2 91% on room air. ";
    let mut prompt = Vec::new();
    while prompt.len() < n_prompt {
        prompt.extend(tokenizer.encode(text, false).expect("encode"));
    }
    prompt.truncate(n_prompt);
    let gguf_bytes = source.gguf().expect("the default model is a GGUF file").1.as_slice().to_vec();

    let ours = bench_salus(&source, &prompt, n_decode);
    let candle = bench_candle(&gguf_bytes, &prompt, n_decode);
    let same = ours.tokens == candle.tokens;
    println!("model: {}", path.display());
    println!(
        "prompt {n_prompt} tokens, decode {n_decode} tokens (greedy), threads: {}",
        candle_core::utils::get_num_threads()
    );
    println!("salus          : prompt {:8.1} tok/s   decode {:6.1} tok/s", ours.prompt_tps, ours.decode_tps);
    println!("candle q_llama : prompt {:8.1} tok/s   decode {:6.1} tok/s", candle.prompt_tps, candle.decode_tps);
    println!(
        "decode speed ratio salus/candle: {:.2}; greedy tokens identical: {same}",
        ours.decode_tps / candle.decode_tps
    );
}

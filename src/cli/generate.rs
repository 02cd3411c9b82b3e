//! `salus generate`: one completion on the command line, streamed to stdout.
//!
//! stdout carries only the completion (so it can be piped); model facts,
//! timings and errors go to stderr. Prompt and completion are PHI: they are
//! never part of a diagnostic.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use salus_models::chat::{ChatMessage, Role};
use salus_models::sampling::SamplingParams;
use salus_models::{load, run_single_stream, LoadOptions, ModelSource, Phi, SingleStreamParams};
use salus_server::config::Config;

#[derive(Args)]
pub struct GenerateArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// The user message; read from stdin when absent.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A system message placed before the user message.
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the prompt to the model as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Maximum number of generated tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Random seed (same seed, same prompt → same text).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Print prompt-processing and decode speed (tokens/s) on stderr.
    #[arg(long)]
    pub bench: bool,
    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (CUDA needs a build with
    /// `--features cuda` and a usable GPU; otherwise a one-line error).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Server config file whose `[kernels]` section selects the CPU kernels
    /// (`SALUS_KERNELS__<KEY>` variables override it, as for `salus serve`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompt = Phi::new(match args.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
            s
        }
    });
    if prompt.expose().trim().is_empty() {
        bail!("empty prompt: pass --prompt TEXT or text on stdin");
    }
    let config = Config::load(args.config.as_deref(), std::env::vars())?;
    config.validate()?;
    // The device first: a wrong one fails before the model is read.
    let device = salus_server::served_model::open_device(&args.device)?;
    let dtype = salus_server::served_model::compute_dtype(&device);
    let t0 = std::time::Instant::now();
    let source = ModelSource::read_plaintext(&args.model).context("reading the model")?;
    let opts = LoadOptions { device, dtype, kernels: Some(config.kernels), ..LoadOptions::default() };
    let lm = load(&source, &opts).context("loading the model")?;
    drop(source);
    eprintln!(
        "model {} ({}, {}, {} params, context {}) loaded in {:.2}s",
        lm.info.name,
        lm.info.architecture.as_str(),
        lm.info.quantization,
        lm.info.num_params,
        lm.info.context_length,
        t0.elapsed().as_secs_f64()
    );

    let ids = if args.raw {
        lm.tokenizer.encode(prompt.expose(), true)?
    } else {
        let template = lm.chat_template.as_ref().ok_or_else(salus_models::chat::no_template_error)?;
        let mut messages = Vec::new();
        if let Some(system) = args.system {
            messages.push(ChatMessage::new(Role::System, system));
        }
        messages.push(ChatMessage::new(Role::User, prompt.expose().clone()));
        let text = template.render(&messages, true)?;
        lm.tokenizer.encode(text.expose(), false)?
    };
    drop(prompt);

    let mut params = SingleStreamParams::default();
    params.decode.sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        ..SamplingParams::default()
    };
    params.decode.max_tokens = args.max_tokens;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_err = None;
    let result = run_single_stream(&lm, &ids, &params, |piece| {
        if write_err.is_none() {
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    writeln!(out)?;
    if args.bench {
        let t = &result.timings;
        eprintln!(
            "prompt: {} tokens in {:.3}s = {:.1} tok/s; decode: {} tokens in {:.3}s = {:.1} tok/s; finish: {:?}",
            result.prompt_tokens,
            t.prefill_secs,
            t.prompt_tokens_per_sec(result.prompt_tokens),
            t.decode_steps,
            t.decode_secs,
            t.decode_tokens_per_sec(),
            result.finish_reason
        );
    }
    Ok(())
}

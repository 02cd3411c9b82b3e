//! `salus model …`: seal, inspect, verify, rewrap and pull sealed model weights.
//!
//! Key sources are `file:PATH` (mode 0600 or stricter), `env:NAME` or
//! `cmd:PROGRAM ARGS…`; keys are never printed. Progress bars go to stderr and
//! only when it is a terminal.

mod pull;
#[cfg(test)]
mod pull_tests;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use salus_seal::{self, SealSummary, DEFAULT_CHUNK_SIZE};
use salus_sensitive::secret::{write_new_key_file, KeySource};

#[derive(Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Seal a plaintext GGUF file or model directory into one sealed file.
    Seal {
        /// A .gguf file or a model directory (config.json, tokenizer files, *.safetensors).
        input: PathBuf,
        /// The sealed file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Key encryption key: file:PATH, env:NAME or cmd:PROGRAM [ARGS].
        #[arg(long)]
        kek: KeySource,
        /// Display name stored in the header (default: the input's name).
        #[arg(long)]
        name: Option<String>,
        /// Plaintext bytes per AES-GCM chunk.
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
    },
    /// Print a sealed file's header fields (no key needed).
    Inspect {
        sealed: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Decrypt and authenticate every chunk and part digest, keeping no plaintext.
    Verify {
        sealed: PathBuf,
        #[arg(long)]
        kek: KeySource,
    },
    /// Re-wrap the data key under a new KEK, in place; the payload is not rewritten.
    Rewrap {
        sealed: PathBuf,
        #[arg(long)]
        from_kek: KeySource,
        #[arg(long)]
        to_kek: KeySource,
    },
    /// Pull REPO[@REVISION] from a Hugging Face-compatible hub, sealing on the fly.
    Pull {
        /// OWNER/NAME[@REVISION] (revision defaults to main).
        repo: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        kek: KeySource,
        /// Hub base URL (default https://huggingface.co).
        #[arg(long, env = "HF_ENDPOINT")]
        endpoint: Option<String>,
        /// Pull only these top-level files (repeatable); default: all model files.
        #[arg(long = "file")]
        files: Vec<String>,
        #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
    },
    /// Write a new random 32-byte key to PATH (mode 0600; never overwrites).
    Keygen { path: PathBuf },
}

fn progress_bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn print_summary(s: &SealSummary) {
    println!("sealed {}", s.path.display());
    println!("  kind         {}", s.kind.as_str());
    println!("  name         {}", s.name);
    for p in &s.parts {
        println!("  part         {} ({} bytes)", p.name, p.len);
    }
    println!("  kek id       {}", s.kek_id);
    println!("  sealed size  {} bytes", s.sealed_len);
    println!("  fingerprint  {}", s.fingerprint);
}

pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Seal { input, out, kek, name, chunk_size } => {
            let key = kek.load()?;
            let pb = progress_bar(salus_seal::plaintext_layout(&input)?.total_len(), "sealing");
            let s = salus_seal::seal_path(&input, &out, &key, name.as_deref(), chunk_size, &|n| pb.inc(n))?;
            pb.finish_and_clear();
            print_summary(&s);
        }
        ModelCommand::Inspect { sealed, json } => {
            let i = salus_seal::inspect(&sealed)?;
            if json {
                let v = serde_json::json!({
                    "format_version": i.format_version, "kind": i.kind.as_str(), "name": i.name,
                    "chunk_size": i.chunk_size, "chunk_count": i.chunk_count, "plaintext_len": i.plaintext_len,
                    "manifest_len": i.manifest_len, "nonce_prefix": i.nonce_prefix_hex, "kek_ids": i.kek_ids,
                    "file_len": i.file_len,
                });
                println!("{v}");
            } else {
                println!("{}", sealed.display());
                println!("  format version  {}", i.format_version);
                println!("  kind            {}", i.kind.as_str());
                println!("  name            {}", i.name);
                println!("  chunk size      {}", i.chunk_size);
                println!("  chunks          {}", i.chunk_count);
                println!("  plaintext len   {}", i.plaintext_len);
                println!("  manifest len    {}", i.manifest_len);
                println!("  nonce prefix    {}", i.nonce_prefix_hex);
                println!("  kek ids         {}", i.kek_ids.join(", "));
                if i.kek_ids.len() > 1 {
                    println!("  note            two key slots in use: a rewrap was interrupted; rerun it");
                }
            }
        }
        ModelCommand::Verify { sealed, kek } => {
            let info = salus_seal::inspect(&sealed)?;
            let pb = progress_bar(info.plaintext_len, "verifying");
            let r = salus_seal::verify(&sealed, &kek, &|n| pb.inc(n));
            pb.finish_and_clear();
            let r = r.with_context(|| format!("verification of {} failed", sealed.display()))?;
            println!("OK {}: {} chunks, {} parts authenticated", sealed.display(), r.chunks, r.parts.len());
            println!("  fingerprint  {}", r.fingerprint);
        }
        ModelCommand::Rewrap { sealed, from_kek, to_kek } => {
            let from = from_kek.load().context("--from-kek")?;
            let to = to_kek.load().context("--to-kek")?;
            salus_seal::rewrap(&sealed, &from, &to)?;
            println!("rewrapped {}: key id {} -> {}", sealed.display(), from.key_id(), to.key_id());
        }
        ModelCommand::Pull { repo, out, kek, endpoint, files, chunk_size } => {
            let key = kek.load()?;
            let (repo, revision) = pull::parse_repo_spec(&repo)?;
            let opts = pull::PullOptions {
                endpoint,
                token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
                files,
                chunk_size,
                ..Default::default()
            };
            let plan = pull::plan(&repo, &revision, &opts)?;
            eprintln!("pulling {repo}@{revision} (commit {}), {} files", plan.commit, plan.files.len());
            let pb = progress_bar(plan.total_bytes(), "pulling");
            let s = pull::pull(&plan, &out, &key, &opts, &|n| pb.inc(n));
            pb.finish_and_clear();
            print_summary(&s?);
        }
        ModelCommand::Keygen { path } => {
            let key =
                write_new_key_file(&path).with_context(|| format!("cannot create key file {}", path.display()))?;
            println!("wrote new key to {} (key id {})", path.display(), key.key_id());
        }
    }
    Ok(())
}

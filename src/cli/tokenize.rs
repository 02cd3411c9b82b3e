//! `salus tokenize`: prints the token ids of stdin as a JSON array — a debugging
//! aid for tokenizer and chat-template questions. Loads only the tokenizer
//! (and chat template), not the weights.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use salus_models::chat::{ChatMessage, ChatTemplate, Role};
use salus_models::tokenizer::Tokenizer;
use salus_models::weights::GgufFile;
use salus_models::{ModelSource, Phi};

#[derive(Args)]
pub struct TokenizeArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Apply the chat template to stdin as one user message (with the generation prompt).
    #[arg(long)]
    pub chat: bool,
}

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let mut text = Phi::new(String::new());
    std::io::stdin().read_to_string(text.expose_mut()).context("reading stdin")?;
    let source = ModelSource::read_plaintext(&args.model).context("reading the model")?;
    let gguf = match source.gguf() {
        Some((file, bytes)) => Some(GgufFile::parse(file, bytes.as_slice())?),
        None => None,
    };
    let md = gguf.as_ref().map(|g| g.metadata());
    let tokenizer = Tokenizer::from_source(&source, md)?;
    let ids = if args.chat {
        let template = ChatTemplate::from_source_required(&source, md, None)?;
        let prompt = template.render(&[ChatMessage::new(Role::User, text.expose().clone())], true)?;
        tokenizer.encode(prompt.expose(), false)?
    } else {
        tokenizer.encode(text.expose(), true)?
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

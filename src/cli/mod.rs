//! Command-line interface. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "salus", version, about = "Self-hosted LLM inference server for healthcare")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
}

pub fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {};
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! Command-line interface. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

mod audit;
mod generate;
mod health;
mod keys;
mod model;
mod serve;
mod tokenize;

#[derive(Parser)]
#[command(name = "salus", version, about = "Self-hosted LLM inference server for healthcare")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the OpenAI-compatible HTTPS API (`--dev`: one-line development start).
    Serve(serve::ServeArgs),
    /// API keys: create, list, revoke.
    Keys(keys::KeysArgs),
    /// Sealed model weights: seal, inspect, verify, rewrap, pull, keygen.
    Model(model::ModelArgs),
    /// Audit trail: verify, query, export (FHIR), hash, keygen.
    Audit(audit::AuditArgs),
    /// Generate one completion on the command line (stdout: the completion only).
    Generate(generate::GenerateArgs),
    /// Print the token ids of stdin as a JSON array.
    Tokenize(tokenize::TokenizeArgs),
    /// Probe a running server's /health endpoint (exit 0 when healthy; container HEALTHCHECK).
    Health(health::HealthArgs),
}

pub fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Keys(args) => keys::run(args),
        Command::Model(args) => model::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Health(args) => health::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

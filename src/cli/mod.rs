//! Command-line interface. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};

mod access_report;
mod audit;
mod audit_report;
mod backup;
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
    /// Audit trail: verify, query, export (FHIR), report, hash, keygen.
    Audit(audit::AuditArgs),
    /// Backups of the audit trail: create, list, verify, restore (exit 3: verification failed).
    Backup(backup::BackupArgs),
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
        Command::Backup(args) => backup::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Health(args) => health::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            // 3: a backup (or the trail it backs up) failed verification; 1: anything else.
            std::process::ExitCode::from(backup::exit_code(&e))
        }
    }
}

/// The error and its causes on one line, each cause once: a layer whose
/// message already quotes its cause (`key store: {0}`) does not repeat it,
/// and multi-line messages (TOML parse errors) are folded.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text =
            cause.to_string().split('\n').map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("key store: {0}")]
    struct Outer(#[source] std::io::Error);

    /// Regression: `key store: X: X` (a layer quoting its cause, then the cause again).
    #[test]
    fn causes_are_printed_once_on_one_line() {
        let inner = std::io::Error::other("k.json is writable by other users");
        let e = anyhow::Error::new(Outer(inner)).context("opening the key store");
        assert_eq!(one_line(&e), "opening the key store: key store: k.json is writable by other users");
        let multi = anyhow::anyhow!("config c.toml: invalid string\nexpected `\"`\n");
        assert_eq!(one_line(&multi), "config c.toml: invalid string; expected `\"`");
        let chained = anyhow::Error::new(std::io::Error::other("disk full")).context("writing x");
        assert_eq!(one_line(&chained), "writing x: disk full");
    }
}

//! The `salus` binary: command-line front end. `anyhow` lives only here.

mod cli;
mod tls_client;

fn main() -> std::process::ExitCode {
    cli::run()
}

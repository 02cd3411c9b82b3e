//! The `salus` binary: command-line front end. `anyhow` lives only here.

mod cli;

fn main() -> std::process::ExitCode {
    cli::run()
}

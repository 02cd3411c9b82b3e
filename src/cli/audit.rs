//! `salus audit …`: verify, query, export and search the audit trail.
//!
//! Records are encrypted, so every command takes the audit master key
//! (`--key file:PATH | env:NAME | cmd:PROGRAM ARGS…`, or `SALUS_AUDIT_KEY`).
//! `verify` exits non-zero and names the segment and record on any integrity
//! failure; `query` and `export` verify while they read and stop at the first
//! failure. Prompt text for `hash` is read from stdin only, never from the
//! command line (argv is visible to other users and lands in shell history).

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use salus_audit::{self, AuditKeys, RecordFilter};
use salus_models::Phi;
use salus_sensitive::secret::{write_new_key_file, KeySource};

#[derive(Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Args)]
struct TrailArgs {
    /// The audit directory; repeat for several replicas' trails (each is read
    /// and verified on its own, and reported per directory).
    #[arg(long = "dir", required = true)]
    dirs: Vec<PathBuf>,
    /// Audit master key: file:PATH, env:NAME or cmd:PROGRAM [ARGS].
    #[arg(long, env = "SALUS_AUDIT_KEY")]
    key: KeySource,
}

#[derive(Args)]
struct FilterArgs {
    /// Only records of this principal id.
    #[arg(long)]
    principal: Option<String>,
    /// Only this event kind (inference.started) or family (inference, admin, auth…).
    #[arg(long)]
    event: Option<String>,
    /// Only records at or after this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    since: Option<String>,
    /// Only records at or before this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    until: Option<String>,
}

impl FilterArgs {
    fn build(self) -> anyhow::Result<RecordFilter> {
        if let Some(e) = &self.event {
            RecordFilter::check_event(e).map_err(anyhow::Error::msg)?;
        }
        Ok(RecordFilter {
            principal: self.principal,
            event: self.event,
            since: time_arg(self.since, "since")?,
            until: time_arg(self.until, "until")?,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// FHIR R4 AuditEvent resources in a Bundle (JSON).
    Fhir,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk every segment and check chain, Merkle roots, encryption and checkpoints.
    Verify {
        #[command(flatten)]
        trail: TrailArgs,
        /// Second checkpoint directory (WORM mount or copy from another host).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Print matching records as JSON lines (decrypted).
    Query {
        #[command(flatten)]
        trail: TrailArgs,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Export records in an interchange format.
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[command(flatten)]
        trail: TrailArgs,
        #[command(flatten)]
        filter: FilterArgs,
        /// Write to this file instead of stdout (never overwritten).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the HMAC the trail stores for a text, to search for it.
    Hash {
        #[arg(long, env = "SALUS_AUDIT_KEY")]
        key: KeySource,
        /// Must be `-`: the text is read from stdin, byte for byte (mind trailing newlines).
        #[arg(long)]
        text: String,
        /// Hash what the server hashes for a chat request whose only message is
        /// stdin (role user): stdin rendered with this model's chat template
        /// (a plaintext .gguf or Hugging Face directory).
        #[arg(long)]
        chat_model: Option<PathBuf>,
    },
    /// Write a new random 32-byte audit master key to PATH (mode 0600; never overwrites).
    Keygen { path: PathBuf },
    /// Reports for review.
    Report {
        #[command(subcommand)]
        report: ReportCommand,
    },
}

/// The period of a report.
#[derive(Args)]
struct RangeArgs {
    /// From this time on (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    since: Option<String>,
    /// Up to this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    until: Option<String>,
}

#[derive(Subcommand)]
enum ReportCommand {
    /// Every break-glass window opened in the range, with the requests made in it.
    BreakGlass {
        #[command(flatten)]
        trail: TrailArgs,
        /// Windows opened in this period.
        #[command(flatten)]
        range: RangeArgs,
        /// text (for a reviewer) or json.
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
    },
    /// Per principal: inferences, tokens, reviews by action, denials, break-glass uses.
    Access {
        #[command(flatten)]
        trail: TrailArgs,
        /// Records in this period.
        #[command(flatten)]
        range: RangeArgs,
        /// csv, or html (a table and a chart of daily volume per principal).
        #[arg(long, value_enum, default_value = "csv")]
        format: AccessFormat,
        /// Write to this file instead of stdout (never overwritten).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AccessFormat {
    Csv,
    Html,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

pub fn run(args: AuditArgs) -> anyhow::Result<()> {
    match args.command {
        AuditCommand::Verify { trail, checkpoints } => {
            if checkpoints.is_some() && trail.dirs.len() > 1 {
                bail!("--checkpoints belongs to one trail: give a single --dir with it");
            }
            let key = trail.key.load().context("loading the audit key")?;
            let mut failed = Vec::new();
            let several = trail.dirs.len() > 1;
            for dir in &trail.dirs {
                // One trail: `OK: …` (as always); several: `OK <dir>: …` per replica.
                let which = if several { format!(" {}", dir.display()) } else { String::new() };
                match salus_audit::verify_trail(dir, &key, checkpoints.as_deref()) {
                    Ok(rep) => println!(
                        "OK{which}: {} records (seq {}..{}) in {} segments ({} sealed, {} purged before); chain head {}; checkpoints: {}",
                        rep.records,
                        rep.first_seq,
                        rep.last_seq,
                        rep.segments,
                        rep.sealed_segments,
                        rep.purged_segments,
                        rep.chain_head,
                        rep.checkpoints.join(", ")
                    ),
                    Err(e) if !several => {
                        return Err(anyhow::Error::new(e))
                            .with_context(|| format!("audit trail {} FAILED verification", dir.display()))
                    }
                    Err(e) => {
                        println!("FAILED {}: {e}", dir.display());
                        failed.push(dir.display().to_string());
                    }
                }
            }
            if !failed.is_empty() {
                bail!("audit trail {} FAILED verification", failed.join(", "));
            }
            Ok(())
        }
        AuditCommand::Query { trail, filter } => {
            let filter = filter.build()?;
            let key = trail.key.load().context("loading the audit key")?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut write_err = None;
            for dir in &trail.dirs {
                let walk = salus_audit::read_trail(dir, &key, |rec, raw| {
                    if write_err.is_none() && filter.matches(rec) {
                        if let Err(e) = out.write_all(raw).and_then(|_| out.write_all(b"\n")) {
                            write_err = Some(e);
                        }
                    }
                });
                if let Some(e) = write_err {
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        return Err(e).context("writing to stdout");
                    }
                    return Ok(());
                }
                let _ = out.flush();
                walk.with_context(|| format!("reading audit trail {}", dir.display()))?;
            }
            Ok(())
        }
        AuditCommand::Export { format: ExportFormat::Fhir, trail, filter, out } => {
            let filter = filter.build()?;
            let mut records = all_records(&trail)?;
            records.retain(|r| filter.matches(r));
            let mut bundle = serde_json::to_vec_pretty(&salus_audit::fhir::export_bundle(&records))?;
            if out.is_none() {
                bundle.push(b'\n');
            }
            write_new_or_stdout(out.as_deref(), &bundle, &format!("{} AuditEvent resources", records.len()))?;
            Ok(())
        }
        AuditCommand::Hash { key, text, chat_model } => {
            if text != "-" {
                bail!(
                    "--text must be '-' (read the text from stdin); text on the command line is visible to other users"
                );
            }
            let key = key.load().context("loading the audit key")?;
            let mut text = Phi::new(Vec::new());
            std::io::stdin().read_to_end(text.expose_mut()).context("reading stdin")?;
            if let Some(model) = chat_model {
                text = render_chat(&model, text)?;
            }
            println!("{}", AuditKeys::from_master(&key).text_hmac(&text).as_str());
            Ok(())
        }
        AuditCommand::Report { report: ReportCommand::Access { trail, range, format, out } } => {
            let (since, until) = report_range(range)?;
            let records = all_records(&trail)?;
            let report = super::access_report::access_report(&records, since, until);
            let text = match format {
                AccessFormat::Csv => super::access_report::render_csv(&report),
                AccessFormat::Html => super::access_report::render_html(&report),
            };
            write_new_or_stdout(out.as_deref(), text.as_bytes(), "the access report")
        }
        AuditCommand::Report { report: ReportCommand::BreakGlass { trail, range, format } } => {
            let (since, until) = report_range(range)?;
            let records = all_records(&trail)?;
            let report = super::audit_report::break_glass_report(&records, since, until);
            match format {
                ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                ReportFormat::Text => print!("{}", super::audit_report::render_text(&report)),
            }
            Ok(())
        }
        AuditCommand::Keygen { path } => {
            let key = write_new_key_file(&path).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote audit key {} (id {})", path.display(), key.key_id());
            Ok(())
        }
    }
}

/// A time option (`--since`, `--until`): RFC 3339 or `YYYY-MM-DD`.
fn time_arg(s: Option<String>, what: &str) -> anyhow::Result<Option<time::OffsetDateTime>> {
    s.map(|s| RecordFilter::parse_time(&s).map_err(anyhow::Error::msg).with_context(|| format!("--{what}"))).transpose()
}

/// `--since` / `--until` of a report, in order.
type Range = (Option<time::OffsetDateTime>, Option<time::OffsetDateTime>);

fn report_range(RangeArgs { since, until }: RangeArgs) -> anyhow::Result<Range> {
    let (since, until) = (time_arg(since, "since")?, time_arg(until, "until")?);
    if let (Some(s), Some(u)) = (since, until) {
        if s > u {
            bail!("--since is after --until");
        }
    }
    Ok((since, until))
}

/// Every record of the trails, verified while read; several trails (replicas)
/// are merged in time order.
fn all_records(trail: &TrailArgs) -> anyhow::Result<Vec<salus_audit::AuditRecord>> {
    let key = trail.key.load().context("loading the audit key")?;
    let mut records = Vec::new();
    for dir in &trail.dirs {
        salus_audit::read_trail(dir, &key, |rec, _| records.push(rec.clone()))
            .with_context(|| format!("reading audit trail {}", dir.display()))?;
    }
    if trail.dirs.len() > 1 {
        // RFC 3339 UTC times of one format sort as text; equal times keep trail order.
        records.sort_by(|a, b| a.time.cmp(&b.time));
    }
    Ok(records)
}

/// Writes `bytes` to a new file (never overwriting one), saying so on stderr
/// as `wrote <what> to <path>`, or to stdout.
fn write_new_or_stdout(out: Option<&std::path::Path>, bytes: &[u8], what: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(bytes)?;
            f.sync_all()?;
            eprintln!("wrote {what} to {}", path.display());
        }
        None => std::io::stdout().lock().write_all(bytes)?,
    }
    Ok(())
}

/// Renders `text` as one user message with the model's chat template (with the
/// generation prompt): the canonical prompt bytes of a chat request.
fn render_chat(model: &std::path::Path, text: Phi<Vec<u8>>) -> anyhow::Result<Phi<Vec<u8>>> {
    use salus_models::chat::{ChatMessage, ChatTemplate, Role};
    use salus_models::weights::GgufFile;
    let content = String::from_utf8(text.expose().clone()).map_err(|_| anyhow::anyhow!("stdin is not UTF-8"))?;
    let content = Phi::new(content);
    let source = salus_models::ModelSource::read_plaintext(model).context("reading the model")?;
    let gguf = match source.gguf() {
        Some((file, bytes)) => Some(GgufFile::parse(file, bytes.as_slice())?),
        None => None,
    };
    let template = ChatTemplate::from_source_required(&source, gguf.as_ref().map(|g| g.metadata()), None)?;
    let rendered = template.render(&[ChatMessage::new(Role::User, content.expose().clone())], true)?;
    Ok(Phi::new(rendered.expose().as_bytes().to_vec()))
}

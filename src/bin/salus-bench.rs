//! `salus-bench`: a load generator for any OpenAI-compatible chat completions
//! endpoint (Salus, llama.cpp's server, vLLM…).
//!
//! For each concurrency level it keeps that many requests in flight (one
//! blocking client thread each) until the level's request count is done, and
//! reports aggregate output tokens/s, requests/s, time to first token
//! p50/p95/p99, inter-token latency p50/p95 and end-to-end latency p50/p95, plus
//! errors. Writes a JSON report and an SVG chart; shows a progress bar on stderr.
//!
//! Output tokens are taken from the server's `usage` (requested with
//! `stream_options.include_usage`), else counted as streamed content chunks.
//! Prompts are the built-in synthetic clinical notes or lines of `--prompts`.
//! Nothing of the prompts, completions or the API key is printed.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use salus_tools::bench_report::{summarize, Sample};
use salus_tools::tls_client::{client_config, ServerTrust};

#[derive(Parser, Debug)]
#[command(name = "salus-bench", about = "Load generator for OpenAI-compatible chat completion servers")]
struct Args {
    /// API base URL (the part before `/chat/completions`).
    #[arg(long, default_value = "https://127.0.0.1:8443/v1")]
    base_url: String,
    /// Bearer token; also read from SALUS_API_KEY.
    #[arg(long, env = "SALUS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Model name sent in the request (default: the first model the server's
    /// `GET {base_url}/models` lists).
    #[arg(long)]
    model: Option<String>,
    /// Concurrency levels, comma separated.
    #[arg(long, default_value = "1,4,8,16", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Requests per level (default: 2 × concurrency, at least 4).
    #[arg(long)]
    requests: Option<usize>,
    /// Extra requests that open each level and are left out of the latency
    /// percentiles (they still count for throughput), so TTFT and latency describe steady state
    /// rather than the burst of `concurrency` requests that opens each level.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// File with one prompt per line (default: built-in synthetic clinical notes).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Send the prompts verbatim. By default each request's message starts with
    /// a tag unique to the run and the request (`[<run>-<n>] `), so a server's
    /// prefix cache can reuse only what all requests share (the chat
    /// template's system prompt), not a whole prompt the set repeats.
    #[arg(long)]
    verbatim: bool,
    /// Ask for non-streamed responses (TTFT then equals end-to-end latency).
    #[arg(long)]
    no_stream: bool,
    /// Accept any server certificate (self-signed test servers only).
    #[arg(long)]
    insecure: bool,
    /// PEM file with the CA certificate(s) to trust for https.
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// JSON report path.
    #[arg(long, default_value = "salus-bench.json")]
    out_json: PathBuf,
    /// SVG chart path.
    #[arg(long, default_value = "salus-bench.svg")]
    out_svg: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("salus-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs positive levels");
    }
    let prompts = match &args.prompts {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading prompt file {}", p.display()))?;
            let v: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
            if v.is_empty() {
                bail!("prompt file {} has no non-empty line", p.display());
            }
            v
        }
        None => salus_tools::bench_report::synthetic_prompts(),
    };
    let url = format!("{}/chat/completions", args.base_url.trim_end_matches('/'));
    let agent = build_agent(&args)?;
    let stream = !args.no_stream;
    // Warm-up requests come on top of the measured ones.
    let per_level: Vec<usize> =
        args.concurrency.iter().map(|&c| args.requests.unwrap_or((2 * c).max(4)) + args.warmup).collect();
    let pb = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(per_level.iter().sum::<usize>() as u64) };
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} requests  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&agent, &args.base_url, args.api_key.as_deref())?,
    };
    let run_tag =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() % 100_000) * 100
            + u64::from(std::process::id() % 100);
    let bodies = Arc::new(Bodies {
        prompts,
        model,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        stream,
        tag: (!args.verbatim).then_some(run_tag),
    });
    let mut summaries = Vec::new();
    let mut offset = 0;
    for (&c, &n) in args.concurrency.iter().zip(&per_level) {
        pb.set_message(format!("concurrency {c}"));
        let counter = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let threads: Vec<_> = (0..c)
            .map(|_| {
                let (agent, url, key, bodies, counter, pb) =
                    (agent.clone(), url.clone(), args.api_key.clone(), bodies.clone(), counter.clone(), pb.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    loop {
                        let i = counter.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break out;
                        }
                        let body = bodies.body(offset + i);
                        out.push((i, one_request(&agent, &url, key.as_deref(), &body, stream)));
                        pb.inc(1);
                    }
                })
            })
            .collect();
        let mut started: Vec<(usize, Sample)> =
            threads.into_iter().flat_map(|t| t.join().unwrap_or_default()).collect();
        started.sort_by_key(|(i, _)| *i);
        let samples: Vec<Sample> = started.into_iter().map(|(_, s)| s).collect();
        summaries.push(summarize(c, &samples, args.warmup, start.elapsed()));
        offset += n;
    }
    pb.finish_and_clear();
    println!("{url}  max_tokens {}  stream {stream}", args.max_tokens);
    if args.warmup > 0 {
        println!("latency percentiles leave out the first {} requests of each level", args.warmup);
    }
    print!("{}", salus_tools::bench_report::table(&summaries));
    let json = salus_tools::bench_report::to_json(&url, args.max_tokens, stream, &summaries);
    std::fs::write(&args.out_json, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", args.out_json.display()))?;
    std::fs::write(&args.out_svg, salus_tools::bench_report::to_svg(&format!("salus-bench {url}"), &summaries))
        .with_context(|| format!("writing {}", args.out_svg.display()))?;
    eprintln!("wrote {} and {}", args.out_json.display(), args.out_svg.display());
    Ok(())
}

/// Request bodies: prompt `n % len` for the `n`-th request of the run.
struct Bodies {
    prompts: Vec<String>,
    model: String,
    max_tokens: usize,
    temperature: f32,
    stream: bool,
    /// Run id for the unique tag; None sends prompts verbatim.
    tag: Option<u64>,
}

impl Bodies {
    fn body(&self, n: usize) -> String {
        let prompt = &self.prompts[n % self.prompts.len()];
        let content = match self.tag {
            // The request number first: requests then share no token after the template's.
            Some(run) => format!("[{n}-{run}] {prompt}"),
            None => prompt.clone(),
        };
        let mut b = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
        });
        if self.stream {
            b["stream_options"] = serde_json::json!({"include_usage": true});
        }
        b.to_string()
    }
}

/// The first model id of `GET {base}/models`.
fn first_model(agent: &ureq::Agent, base: &str, key: Option<&str>) -> Result<String> {
    let url = format!("{}/models", base.trim_end_matches('/'));
    let mut req = agent.get(&url);
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let v: serde_json::Value = req
        .call()
        .map_err(describe)
        .with_context(|| format!("listing models at {url} (or pass --model)"))?
        .into_json()
        .with_context(|| format!("{url} did not answer JSON (pass --model)"))?;
    v["data"][0]["id"].as_str().map(str::to_string).with_context(|| format!("{url} lists no model (pass --model)"))
}

/// A transport error, or an HTTP status with the server's error code.
fn describe(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, resp) => {
            let body: serde_json::Value = resp.into_json().unwrap_or_default();
            let what = body["error"]["code"].as_str().or(body["error"]["type"].as_str()).unwrap_or("").to_string();
            anyhow::anyhow!("HTTP {code} {what}")
        }
        ureq::Error::Transport(t) => anyhow::anyhow!("{t}"),
    }
}

fn build_agent(args: &Args) -> Result<ureq::Agent> {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout(Duration::from_secs(args.timeout_secs))
        .max_idle_connections_per_host(args.concurrency.iter().copied().max().unwrap_or(1));
    if args.insecure || args.cacert.is_some() {
        b = b.tls_config(Arc::new(tls_config(args)?));
    }
    Ok(b.build())
}

fn tls_config(args: &Args) -> Result<rustls::ClientConfig> {
    if args.insecure {
        eprintln!("salus-bench: --insecure: server certificates are not verified");
        return Ok(client_config(ServerTrust::Unverified)?);
    }
    Ok(client_config(ServerTrust::CaFile(args.cacert.as_ref().context("no --cacert")?))?)
}

/// Sends one request and measures it. Any transport error, non-2xx status or
/// malformed response counts as an error.
fn one_request(agent: &ureq::Agent, url: &str, key: Option<&str>, body: &str, stream: bool) -> Sample {
    let t0 = Instant::now();
    let mut s = Sample::default();
    let mut req = agent.post(url).set("Content-Type", "application/json");
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match req.send_string(body) {
        Ok(r) => r,
        Err(_) => {
            s.e2e = t0.elapsed();
            return s;
        }
    };
    if !stream {
        let v: Option<serde_json::Value> = resp.into_json().ok();
        s.e2e = t0.elapsed();
        s.ttft = Some(s.e2e);
        if let Some(n) = v.as_ref().and_then(|v| v["usage"]["completion_tokens"].as_u64()) {
            s.output_tokens = n as usize;
            s.ok = true;
        }
        return s;
    }
    let mut chunks = 0usize;
    let mut usage = None;
    let mut last: Option<Instant> = None;
    let mut done = false;
    for line in BufReader::new(resp.into_reader()).lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data:") else { continue };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
            break;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else { break };
        if v.get("error").is_some() {
            break;
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            usage = Some(n as usize);
        }
        let has_text = v["choices"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["delta"]["content"].as_str().is_some_and(|t| !t.is_empty())));
        if has_text {
            let now = Instant::now();
            match last {
                None => s.ttft = Some(now - t0),
                Some(l) => s.itl.push(now - l),
            }
            last = Some(now);
            chunks += 1;
        }
    }
    s.e2e = t0.elapsed();
    s.ok = done;
    s.output_tokens = usage.unwrap_or(chunks);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(tag: Option<u64>) -> Bodies {
        Bodies {
            prompts: vec!["first prompt".into(), "second prompt".into()],
            model: "m".into(),
            max_tokens: 8,
            temperature: 0.0,
            stream: true,
            tag,
        }
    }

    fn content(b: &Bodies, n: usize) -> String {
        let v: serde_json::Value = serde_json::from_str(&b.body(n)).unwrap();
        v["messages"][0]["content"].as_str().unwrap().to_string()
    }

    /// By default a repeated prompt never reaches the server twice as the same
    /// text (a prefix cache would turn the repeats into hits); `--verbatim`
    /// sends the prompt set as it is.
    #[test]
    fn requests_are_tagged_uniquely_unless_verbatim() {
        let tagged = bodies(Some(4242));
        assert_eq!(content(&tagged, 0), "[0-4242] first prompt");
        assert_eq!(content(&tagged, 3), "[3-4242] second prompt");
        assert_ne!(content(&tagged, 0), content(&tagged, 2), "the same prompt, a different request");
        let verbatim = bodies(None);
        assert_eq!(content(&verbatim, 0), "first prompt");
        assert_eq!(content(&verbatim, 2), "first prompt");
        let v: serde_json::Value = serde_json::from_str(&verbatim.body(1)).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["max_tokens"], 8);
    }
}

//! Shared by `salus-bench` (over HTTP) and the in-process `batching` bench:
//! per-request samples, per-level summaries, the JSON report and an SVG chart
//! (written by hand: two panels, throughput and TTFT against concurrency).
//! Samples hold timings and counts only — never prompt or completion text.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::time::Duration;

/// One request's measurements.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub ok: bool,
    pub ttft: Option<Duration>,
    /// Gaps between consecutive streamed tokens (chunks).
    pub itl: Vec<Duration>,
    pub e2e: Duration,
    pub output_tokens: usize,
}

/// Summary of one concurrency level.
#[derive(Debug, Clone)]
pub struct LevelSummary {
    pub concurrency: usize,
    /// Leading requests left out of the latency percentiles.
    pub warmup: usize,
    pub requests: usize,
    pub errors: usize,
    pub wall_s: f64,
    pub output_tokens: usize,
    pub output_tok_per_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: [f64; 3],
    pub itl_ms: [f64; 2],
    pub e2e_ms: [f64; 2],
}

/// Nearest-rank percentile of sorted milliseconds (NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms_sorted(it: impl Iterator<Item = Duration>) -> Vec<f64> {
    let mut v: Vec<f64> = it.map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Summarizes one level. `samples` are in the order the requests started; the
/// first `warmup` count towards throughput and errors but not towards the
/// latency percentiles (they describe the start-up burst, not steady state).
pub fn summarize(concurrency: usize, samples: &[Sample], warmup: usize, wall: Duration) -> LevelSummary {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let wall_s = wall.as_secs_f64().max(1e-9);
    let output_tokens: usize = ok.iter().map(|s| s.output_tokens).sum();
    let measured: Vec<&Sample> = samples.iter().skip(warmup).filter(|s| s.ok).collect();
    let ttft = ms_sorted(measured.iter().filter_map(|s| s.ttft));
    let itl = ms_sorted(measured.iter().flat_map(|s| s.itl.iter().copied()));
    let e2e = ms_sorted(measured.iter().map(|s| s.e2e));
    LevelSummary {
        concurrency,
        warmup: warmup.min(samples.len()),
        requests: samples.len(),
        errors: samples.len() - ok.len(),
        wall_s,
        output_tokens,
        output_tok_per_s: output_tokens as f64 / wall_s,
        requests_per_s: ok.len() as f64 / wall_s,
        ttft_ms: [percentile(&ttft, 50.0), percentile(&ttft, 95.0), percentile(&ttft, 99.0)],
        itl_ms: [percentile(&itl, 50.0), percentile(&itl, 95.0)],
        e2e_ms: [percentile(&e2e, 50.0), percentile(&e2e, 95.0)],
    }
}

fn num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!((x * 1000.0).round() / 1000.0)
    } else {
        serde_json::Value::Null
    }
}

pub fn to_json(target: &str, max_tokens: usize, stream: bool, levels: &[LevelSummary]) -> serde_json::Value {
    serde_json::json!({
        "target": target,
        "max_tokens": max_tokens,
        "stream": stream,
        "levels": levels.iter().map(|l| serde_json::json!({
            "concurrency": l.concurrency,
            "requests": l.requests,
            "warmup_requests": l.warmup,
            "errors": l.errors,
            "wall_s": num(l.wall_s),
            "output_tokens": l.output_tokens,
            "output_tok_per_s": num(l.output_tok_per_s),
            "requests_per_s": num(l.requests_per_s),
            "ttft_ms": {"p50": num(l.ttft_ms[0]), "p95": num(l.ttft_ms[1]), "p99": num(l.ttft_ms[2])},
            "itl_ms": {"p50": num(l.itl_ms[0]), "p95": num(l.itl_ms[1])},
            "e2e_ms": {"p50": num(l.e2e_ms[0]), "p95": num(l.e2e_ms[1])},
        })).collect::<Vec<_>>(),
    })
}

pub fn table(levels: &[LevelSummary]) -> String {
    let mut s = String::from(
        "conc  reqs  err   out tok/s   req/s   TTFT p50/p95/p99 ms        ITL p50/p95 ms   E2E p50/p95 ms\n",
    );
    for l in levels {
        let _ = writeln!(
            s,
            "{:>4}  {:>4}  {:>3}  {:>10.1}  {:>6.2}   {:>7.1} / {:>7.1} / {:>7.1}   {:>6.1} / {:>6.1}   {:>7.0} / {:>7.0}",
            l.concurrency,
            l.requests,
            l.errors,
            l.output_tok_per_s,
            l.requests_per_s,
            l.ttft_ms[0],
            l.ttft_ms[1],
            l.ttft_ms[2],
            l.itl_ms[0],
            l.itl_ms[1],
            l.e2e_ms[0],
            l.e2e_ms[1]
        );
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One panel: x = concurrency (categorical, evenly spaced), one polyline per series.
fn panel(out: &mut String, x0: f64, title: &str, unit: &str, xs: &[usize], series: &[(&str, &str, Vec<f64>)]) {
    let (w, h, pad_l, pad_b, pad_t) = (420.0, 300.0, 60.0, 40.0, 30.0);
    let plot_w = w - pad_l - 20.0;
    let plot_h = h - pad_b - pad_t;
    let max_y = series.iter().flat_map(|s| s.2.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::max);
    let max_y = if max_y > 0.0 { max_y * 1.1 } else { 1.0 };
    let n = xs.len().max(1);
    let px = |i: usize| x0 + pad_l + if n == 1 { plot_w / 2.0 } else { plot_w * i as f64 / (n - 1) as f64 };
    let py = |v: f64| pad_t + plot_h - plot_h * (v / max_y);
    let _ =
        writeln!(out, r#"<text x="{:.1}" y="18" font-size="14" font-weight="bold">{}</text>"#, x0 + pad_l, esc(title));
    let _ = writeln!(
        out,
        r##"<line x1="{a:.1}" y1="{t:.1}" x2="{a:.1}" y2="{b:.1}" stroke="#333"/><line x1="{a:.1}" y1="{b:.1}" x2="{r:.1}" y2="{b:.1}" stroke="#333"/>"##,
        a = x0 + pad_l,
        t = pad_t,
        b = pad_t + plot_h,
        r = x0 + pad_l + plot_w
    );
    for k in 0..=4 {
        let v = max_y * k as f64 / 4.0;
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{:.0}</text><line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            x0 + pad_l - 5.0,
            py(v) + 3.0,
            v,
            x0 + pad_l,
            x0 + pad_l + plot_w,
            y = py(v)
        );
    }
    for (i, x) in xs.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{x}</text>"#,
            px(i),
            pad_t + plot_h + 14.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">concurrency</text>"#,
        x0 + pad_l + plot_w / 2.0,
        pad_t + plot_h + 32.0
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" transform="rotate(-90 {:.1} {:.1})" text-anchor="middle">{}</text>"#,
        x0 + 14.0,
        pad_t + plot_h / 2.0,
        x0 + 14.0,
        pad_t + plot_h / 2.0,
        esc(unit)
    );
    for (si, (name, color, ys)) in series.iter().enumerate() {
        let pts: Vec<String> = ys
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.1},{:.1}", px(i), py(*v)))
            .collect();
        let _ =
            writeln!(out, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, pts.join(" "));
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
        }
        let ly = pad_t + 12.0 + 14.0 * si as f64;
        let _ = writeln!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            x0 + pad_l + 10.0,
            ly - 9.0,
            x0 + pad_l + 24.0,
            ly,
            esc(name)
        );
    }
}

/// Throughput (output tok/s) and TTFT (p50, p95) against concurrency.
pub fn to_svg(title: &str, levels: &[LevelSummary]) -> String {
    let xs: Vec<usize> = levels.iter().map(|l| l.concurrency).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="860" height="330" font-family="sans-serif"><rect width="860" height="330" fill="white"/>"#
    );
    let _ = writeln!(s, "<title>{}</title>", esc(title));
    panel(
        &mut s,
        0.0,
        "Output throughput",
        "tokens/s",
        &xs,
        &[("aggregate tok/s", "#1f77b4", levels.iter().map(|l| l.output_tok_per_s).collect())],
    );
    panel(
        &mut s,
        430.0,
        "Time to first token",
        "ms",
        &xs,
        &[
            ("TTFT p50", "#2ca02c", levels.iter().map(|l| l.ttft_ms[0]).collect()),
            ("TTFT p95", "#d62728", levels.iter().map(|l| l.ttft_ms[1]).collect()),
        ],
    );
    s.push_str("</svg>\n");
    s
}

/// Built-in synthetic clinical notes of varied lengths (no real patient data).
pub fn synthetic_prompts() -> Vec<String> {
    let findings = [
        "Vitals stable: BP 132/84, HR 78, RR 16, SpO2 97% on room air, afebrile.",
        "Labs notable for HbA1c 8.2%, creatinine 1.1 mg/dL, potassium 4.3 mmol/L, LDL 131 mg/dL.",
        "Chest X-ray shows no acute cardiopulmonary process; ECG with normal sinus rhythm.",
        "Reports intermittent substernal chest tightness on exertion relieved by rest for two weeks.",
        "Medications: metformin 1000 mg BID, lisinopril 20 mg daily, atorvastatin 40 mg nightly.",
        "Allergies: penicillin (rash). Former smoker, 20 pack-years, quit 2015. Occasional alcohol.",
        "Physical exam: lungs clear bilaterally, regular rate and rhythm, no murmurs, no edema.",
        "Plan: stress test, increase atorvastatin to 80 mg, diabetes education, follow up in 4 weeks.",
    ];
    let tasks = [
        "Summarize the following clinical note in three bullet points.",
        "Write a short patient-friendly explanation of this note.",
        "List the problems and the plan for each from this note.",
        "Extract all medications with doses from this note.",
    ];
    (0..16)
        .map(|i| {
            let n = 1 + (i * 5) % findings.len();
            let body: Vec<&str> = (0..n).map(|k| findings[(i + k) % findings.len()]).collect();
            format!(
                "{}\n\nNote (synthetic): {}-year-old patient seen in clinic. {}",
                tasks[i % tasks.len()],
                40 + (i * 7) % 45,
                body.join(" ")
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ttft_ms: u64, tokens: usize) -> Sample {
        Sample {
            ok: true,
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: vec![Duration::from_millis(ttft_ms / 10)],
            e2e: Duration::from_millis(ttft_ms * 2),
            output_tokens: tokens,
        }
    }

    /// Warm-up requests count towards throughput but not towards latency.
    #[test]
    fn warmup_requests_are_left_out_of_latency_only() {
        let samples = vec![sample(900, 10), sample(800, 10), sample(20, 10), sample(30, 10), sample(40, 10)];
        let all = summarize(2, &samples, 0, Duration::from_secs(1));
        let steady = summarize(2, &samples, 2, Duration::from_secs(1));
        assert_eq!(all.ttft_ms[1], 900.0);
        assert_eq!(steady.ttft_ms, [30.0, 40.0, 40.0]);
        assert_eq!(steady.itl_ms[1], 4.0);
        assert_eq!(steady.e2e_ms[0], 60.0);
        assert_eq!((steady.output_tokens, steady.requests, steady.warmup), (50, 5, 2));
        assert_eq!(steady.output_tok_per_s, all.output_tok_per_s);
        // More warm-up than requests: no latency, no panic.
        let none = summarize(2, &samples, 9, Duration::from_secs(1));
        assert!(none.ttft_ms[0].is_nan() && none.warmup == 5);
    }
}

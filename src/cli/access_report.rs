//! `salus audit report access`: per principal, what it did in a period —
//! inferences, prompt and completion tokens, reviews by action, denials and
//! break-glass uses — as CSV, or as an HTML page with a chart of daily
//! inference volume per principal (what a compliance officer reads monthly).
//!
//! The HTML is one static file (inline SVG, no script, no external resource),
//! so it can be archived with the review and opened anywhere.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use salus_audit::{AuditRecord, RecordFilter};
use serde_json::Value;
use time::OffsetDateTime;

/// Review actions, in report order.
const ACTIONS: [&str; 4] = ["accepted", "edited", "rejected", "escalated"];

/// One principal's totals.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrincipalTotals {
    pub inferences: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// By action, in [`ACTIONS`] order.
    pub reviews: [u64; 4],
    pub denials: u64,
    pub break_glass: u64,
}

/// The report: totals per principal and inferences per (day, principal).
#[derive(Debug, Default)]
pub struct AccessReport {
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub totals: BTreeMap<String, PrincipalTotals>,
    pub daily: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Denials without a claimed principal (unknown keys, malformed tokens).
const UNAUTHENTICATED: &str = "(unauthenticated)";

pub fn access_report(
    records: &[AuditRecord],
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
) -> AccessReport {
    let mut rep = AccessReport { since, until, ..AccessReport::default() };
    for r in records {
        let Ok(at) = RecordFilter::parse_time(&r.time) else { continue };
        if since.is_some_and(|s| at < s) || until.is_some_and(|u| at > u) {
            continue;
        }
        let who = r.principal.as_ref().map(|p| p.id.clone());
        let detail = r.detail.as_ref();
        let tokens = |t: &mut PrincipalTotals| {
            if let Some(tok) = r.tokens {
                t.prompt_tokens += u64::from(tok.prompt);
                t.completion_tokens += u64::from(tok.completion);
            }
        };
        match r.kind.as_str() {
            "inference.started" => {
                let who = who.unwrap_or_default();
                rep.totals.entry(who.clone()).or_default().inferences += 1;
                let day = r.time.get(..10).unwrap_or("").to_string();
                *rep.daily.entry(day).or_default().entry(who).or_default() += 1;
            }
            "inference.completed" => {
                let t = rep.totals.entry(who.unwrap_or_default()).or_default();
                t.completed += 1;
                tokens(t);
            }
            "inference.failed" | "inference.interrupted" => {
                let t = rep.totals.entry(who.unwrap_or_default()).or_default();
                t.failed += 1;
                tokens(t);
            }
            "inference.cancelled" => {
                let t = rep.totals.entry(who.unwrap_or_default()).or_default();
                t.cancelled += 1;
                tokens(t);
            }
            "review.recorded" => {
                let action = detail.and_then(|d| d.get("action")).and_then(Value::as_str);
                if let Some(i) = ACTIONS.iter().position(|a| Some(*a) == action) {
                    rep.totals.entry(who.unwrap_or_default()).or_default().reviews[i] += 1;
                }
            }
            "auth.denied" => {
                let n = detail.and_then(|d| d.get("count")).and_then(Value::as_u64).unwrap_or(1);
                rep.totals.entry(who.unwrap_or_else(|| UNAUTHENTICATED.into())).or_default().denials += n;
            }
            "access.break_glass" => {
                rep.totals.entry(who.unwrap_or_default()).or_default().break_glass += 1;
            }
            _ => {}
        }
    }
    rep
}

const CSV_HEADER: &str = "principal,inferences,completed,failed,cancelled,prompt_tokens,completion_tokens,reviews_accepted,reviews_edited,reviews_rejected,reviews_escalated,denials,break_glass_uses";

fn csv_field(s: &str) -> String {
    // Quote always; double inner quotes; neutralize spreadsheet formulas.
    let s = if s.starts_with(['=', '+', '-', '@']) { format!("'{s}") } else { s.to_string() };
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn row(t: &PrincipalTotals) -> [u64; 12] {
    [
        t.inferences,
        t.completed,
        t.failed,
        t.cancelled,
        t.prompt_tokens,
        t.completion_tokens,
        t.reviews[0],
        t.reviews[1],
        t.reviews[2],
        t.reviews[3],
        t.denials,
        t.break_glass,
    ]
}

pub fn render_csv(rep: &AccessReport) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for (p, t) in &rep.totals {
        let nums: Vec<String> = row(t).iter().map(u64::to_string).collect();
        let _ = writeln!(out, "{},{}", csv_field(p), nums.join(","));
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn fmt_time(t: Option<OffsetDateTime>) -> String {
    t.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()).unwrap_or_else(|| "(any)".into())
}

/// Colours of the chart's principals (cycled).
const PALETTE: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

pub fn render_html(rep: &AccessReport) -> String {
    let mut h = String::new();
    let range = format!("{} to {}", fmt_time(rep.since), fmt_time(rep.until));
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Salus access report</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #999;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>\
         </head><body>\n<h1>Salus access report</h1>\n<p id=\"range\">Period: {}</p>\n",
        esc(&range)
    );
    h.push_str("<table id=\"totals\"><thead><tr>");
    for col in CSV_HEADER.split(',') {
        let _ = write!(h, "<th>{}</th>", esc(&col.replace('_', " ")));
    }
    h.push_str("</tr></thead><tbody>\n");
    for (p, t) in &rep.totals {
        let _ = write!(h, "<tr data-principal=\"{}\"><td>{}</td>", esc(p), esc(p));
        for n in row(t) {
            let _ = write!(h, "<td>{n}</td>");
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody></table>\n<h2>Inferences per day</h2>\n");
    h.push_str(&daily_chart(rep));
    h.push_str("</body></html>\n");
    h
}

/// Grouped bars: one group per day, one bar per principal, each labelled with its count.
fn daily_chart(rep: &AccessReport) -> String {
    let principals: Vec<&String> = rep.totals.iter().filter(|(_, t)| t.inferences > 0).map(|(p, _)| p).collect();
    if rep.daily.is_empty() || principals.is_empty() {
        return "<p id=\"chart-empty\">No inferences in this period.</p>\n".into();
    }
    let max = rep.daily.values().flat_map(|m| m.values()).copied().max().unwrap_or(1).max(1);
    let (bar, gap, height, top, left) = (18.0_f64, 14.0_f64, 200.0_f64, 20.0_f64, 40.0_f64);
    let group = bar * principals.len() as f64 + gap;
    let width = left + group * rep.daily.len() as f64 + 20.0;
    let legend_h = 18.0 * principals.len() as f64;
    let total_h = top + height + 40.0 + legend_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg id=\"daily-chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{total_h}\" role=\"img\" aria-label=\"Inferences per day per principal\">"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>",
        top + height,
        width - 10.0,
        top + height
    );
    for (d, (day, counts)) in rep.daily.iter().enumerate() {
        let x0 = left + d as f64 * group + gap / 2.0;
        for (i, p) in principals.iter().enumerate() {
            let n = counts.get(*p).copied().unwrap_or(0);
            let h = height * n as f64 / max as f64;
            let x = x0 + i as f64 * bar;
            let y = top + height - h;
            let _ = writeln!(
                s,
                "<rect class=\"bar\" data-day=\"{}\" data-principal=\"{}\" x=\"{x}\" y=\"{y}\" width=\"{}\" height=\"{h}\" fill=\"{}\"><title>{} {}: {n}</title></rect>",
                esc(day),
                esc(p),
                bar - 2.0,
                PALETTE[i % PALETTE.len()],
                esc(day),
                esc(p)
            );
            if n > 0 {
                let _ = writeln!(
                    s,
                    "<text class=\"count\" x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{n}</text>",
                    x + (bar - 2.0) / 2.0,
                    y - 3.0
                );
            }
        }
        let _ = writeln!(
            s,
            "<text class=\"day\" x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            x0 + bar * principals.len() as f64 / 2.0,
            top + height + 14.0,
            esc(day)
        );
    }
    for (i, p) in principals.iter().enumerate() {
        let y = top + height + 30.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text class=\"legend\" x=\"{}\" y=\"{}\" font-size=\"12\">{}</text>",
            PALETTE[i % PALETTE.len()],
            left + 18.0,
            y + 10.0,
            esc(p)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str, time: &str, principal: Option<&str>, extra: serde_json::Value) -> AuditRecord {
        let mut v = serde_json::json!({
            "v": 1, "seq": 1, "time": time, "event_id": "e", "prev_hash": "00", "kind": kind, "instance": "i",
            "action": "E", "outcome": "success",
        });
        if let Some(p) = principal {
            v["principal"] = serde_json::json!({"id": p, "kind": "human", "roles": []});
        }
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn totals_reviews_denials_and_daily_volume_per_principal() {
        let recs = vec![
            rec("inference.started", "2026-11-01T10:00:00Z", Some("alice"), serde_json::json!({})),
            rec(
                "inference.completed",
                "2026-11-01T10:00:01Z",
                Some("alice"),
                serde_json::json!({"tokens": {"prompt": 10, "completion": 5}}),
            ),
            rec("inference.started", "2026-11-02T10:00:00Z", Some("alice"), serde_json::json!({})),
            rec(
                "inference.failed",
                "2026-11-02T10:00:01Z",
                Some("alice"),
                serde_json::json!({"tokens": {"prompt": 7, "completion": 0}}),
            ),
            rec("inference.started", "2026-11-02T11:00:00Z", Some("=bob<i>"), serde_json::json!({})),
            rec(
                "review.recorded",
                "2026-11-02T12:00:00Z",
                Some("alice"),
                serde_json::json!({"detail": {"action": "edited"}}),
            ),
            rec("auth.denied", "2026-11-02T12:00:00Z", None, serde_json::json!({"detail": {"count": 42}})),
            rec("access.break_glass", "2026-11-02T12:00:00Z", Some("=bob<i>"), serde_json::json!({})),
            rec("inference.started", "2026-12-05T10:00:00Z", Some("alice"), serde_json::json!({})),
        ];
        let until = RecordFilter::parse_time("2026-11-30").unwrap();
        let rep = access_report(&recs, None, Some(until));
        let a = &rep.totals["alice"];
        assert_eq!((a.inferences, a.completed, a.failed, a.prompt_tokens, a.completion_tokens), (2, 1, 1, 17, 5));
        assert_eq!(a.reviews, [0, 1, 0, 0]);
        assert_eq!(rep.totals[UNAUTHENTICATED].denials, 42);
        assert_eq!(rep.totals["=bob<i>"].break_glass, 1);
        assert_eq!(rep.daily["2026-11-02"]["alice"], 1);
        let csv = render_csv(&rep);
        assert!(csv.contains("\"alice\",2,1,1,0,17,5,0,1,0,0,0,0"), "{csv}");
        assert!(csv.contains("\"'=bob<i>\","), "formula-like ids are neutralized: {csv}");
        let html = render_html(&rep);
        assert!(html.contains("<td>17</td>") && html.contains("data-day=\"2026-11-02\""));
        assert!(!html.contains("=bob<i>") && html.contains("=bob&lt;i&gt;"), "escaped, shown");
    }
}

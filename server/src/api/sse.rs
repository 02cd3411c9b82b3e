//! The streaming consumer: a [`Generation`] as OpenAI-style Server-Sent Events.
//!
//! Chunks are sent as the engine produces them; the audit outcome is recorded
//! before the final `data: [DONE]`, so a client that saw `[DONE]` knows its
//! inference is in the trail. If that record cannot be written, the stream ends
//! with an error event instead (the tokens are already sent; `/ready` turns
//! unhealthy as the audit log marks itself so). When the client disconnects the
//! task returns at once, dropping the generation, which cancels the engine's
//! work and records `inference.cancelled`.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc::Sender;

use super::generation::{Generation, Update, Usage};
use super::response::{usage_json, ResponseBuilder};

/// What a stream reports of its token counts (`stream_options`).
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamUsage {
    /// A final usage chunk before `[DONE]` (`include_usage`).
    pub include: bool,
    /// The counts so far in every chunk (vLLM's `continuous_usage_stats`).
    pub continuous: bool,
}

fn sse_data(v: &Value) -> Bytes {
    let mut s = String::with_capacity(256);
    s.push_str("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

/// The chunk sender. `include_usage` adds `"usage": null` to every chunk (the
/// final usage chunk carries the numbers); `continuous_usage` (vLLM) puts the
/// counts so far in every chunk instead.
struct ChunkSender {
    tx: Sender<Result<Bytes, Infallible>>,
    include_usage: bool,
    continuous_usage: bool,
}

impl ChunkSender {
    /// Sends one chunk; false when the client is gone.
    async fn send(&self, mut chunk: Value, so_far: &Usage) -> bool {
        if self.continuous_usage {
            chunk["usage"] = usage_json(so_far);
        } else if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        self.send_raw(sse_data(&chunk)).await
    }

    async fn send_raw(&self, bytes: Bytes) -> bool {
        self.tx.send(Ok(bytes)).await.is_ok()
    }
}

/// Streams `generation` as SSE, with usage as `usage` asks.
pub fn respond_stream(generation: Generation, builder: ResponseBuilder, usage: StreamUsage) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(32);
    tokio::spawn(async move {
        let out = ChunkSender { tx, include_usage: usage.include, continuous_usage: usage.continuous };
        let request_id = generation.request_id().to_string();
        if stream_chunks(generation, &builder, &out).await.is_none() {
            // However the disconnect was noticed (waiting or sending), one
            // line; the generation was dropped, which cancels the engine's work.
            tracing::info!(request_id = %request_id, "client disconnected; generation cancelled");
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Sends every chunk, then the outcome; `None` as soon as the client is gone.
async fn stream_chunks(mut generation: Generation, builder: &ResponseBuilder, out: &ChunkSender) -> Option<()> {
    let alive = |sent: bool| sent.then_some(());
    for choice in 0..generation.num_choices() {
        if let Some(chunk) = builder.preamble_chunk(choice) {
            alive(out.send(chunk, &generation.usage_so_far()).await)?;
        }
    }
    loop {
        let update = tokio::select! {
            u = generation.next() => u,
            _ = out.tx.closed() => return None,
        };
        let chunk = match update {
            None => break,
            Some(Update::Delta { choice, text, logprobs, tool_calls }) => {
                builder.delta_chunk(choice, text.expose(), &logprobs, &tool_calls)
            }
            Some(Update::Finished { choice, reason }) => builder.finish_chunk(choice, reason),
        };
        alive(out.send(chunk, &generation.usage_so_far()).await)?;
    }
    // The outcome is recorded now: a client that leaves during the last
    // chunks cancels nothing.
    match generation.finish().await {
        Ok(done) => {
            if !out.include_usage || out.send_raw(sse_data(&builder.usage_chunk(&done.usage))).await {
                out.send_raw(Bytes::from_static(b"data: [DONE]\n\n")).await;
            }
        }
        Err(err) => {
            out.send_raw(sse_data(&err.body())).await;
        }
    }
    Some(())
}

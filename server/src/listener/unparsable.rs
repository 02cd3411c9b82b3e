//! HTTP/1 requests that hyper cannot parse get an OpenAI error body too.
//!
//! hyper answers a request it cannot parse — a malformed request line or
//! header, an absurd `Content-Length`, headers or a URI too long — by itself,
//! before any service runs: `400 Bad Request` (or `414`, `431`) with an empty
//! body, then it closes the connection. Every other error a client of Salus
//! sees has the OpenAI shape (`{"error": {"message", "type", "param",
//! "code"}}`), and hyper offers no hook for that response. So this wrapper of
//! the connection's byte stream recognizes hyper's canned response in what it
//! writes and sends an OpenAI error with the same status instead.
//!
//! The match cannot catch an application response: the application never
//! writes an error without a JSON body, and a canned response is a head
//! alone (`content-length: 0`, no `content-type`) written in one piece at a
//! response boundary (hyper flattens a head into one write when the stream
//! does not take vectored writes, which this wrapper does not). Nothing of
//! the request is echoed.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The connection's stream, with hyper's bodiless parse-error responses
/// replaced by OpenAI errors.
pub(super) struct OpenAiParseErrors<S> {
    inner: S,
    /// A replacement being written, and how much of it is out.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S> OpenAiParseErrors<S> {
    pub(super) fn new(inner: S) -> Self {
        OpenAiParseErrors { inner, pending: None }
    }
}

impl<S: AsyncWrite + Unpin> OpenAiParseErrors<S> {
    /// Writes what is left of a replacement.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for OpenAiParseErrors<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OpenAiParseErrors<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some(replacement) = replacement_for(buf) {
            // hyper's bytes are taken whole; ours go out in their place.
            this.pending = Some((replacement, 0));
            if let Poll::Ready(Err(e)) = this.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The OpenAI error that replaces `buf`, when `buf` is hyper's canned
/// response to a request it could not parse.
fn replacement_for(buf: &[u8]) -> Option<Vec<u8>> {
    let head_end = find(buf, b"\r\n\r\n")?;
    if head_end + 4 != buf.len() {
        return None;
    }
    let head = buf[..head_end].to_ascii_lowercase();
    let status_line = head.split(|&b| b == b'\r').next()?;
    let status = match status_line {
        b"http/1.1 400 bad request" | b"http/1.0 400 bad request" => 400,
        b"http/1.1 414 uri too long" | b"http/1.0 414 uri too long" => 414,
        b"http/1.1 431 request header fields too large" | b"http/1.0 431 request header fields too large" => 431,
        _ => return None,
    };
    if find(&head, b"\r\ncontent-length: 0\r\n").is_none() && !head.ends_with(b"\r\ncontent-length: 0") {
        return None;
    }
    if find(&head, b"\r\ncontent-type:").is_some() {
        return None;
    }
    let (reason, message, code) = match status {
        400 => (
            "Bad Request",
            "the request is not valid HTTP (a malformed request line or header, such as an invalid Content-Length)",
            "malformed_request",
        ),
        414 => ("URI Too Long", "the request URI is too long", "uri_too_long"),
        _ => ("Request Header Fields Too Large", "the request headers are too large", "headers_too_large"),
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}
    })
    .to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bodiless_parse_error_heads_are_replaced() {
        let canned = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 17:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(replacement_for(canned).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"), "{out}");
        let body: serde_json::Value = serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "malformed_request");
        assert!(replacement_for(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n").is_some());
        // Not replaced: a JSON error, a head followed by a body, a 400 with a length, a body chunk.
        for other in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"data: HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
        ] {
            assert!(replacement_for(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
    }
}

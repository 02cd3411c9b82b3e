//! The connection loop: accept, cap, time out, serve with hyper, drain.
//!
//! Why each limit exists — every one closes a way for an unauthenticated
//! client to hold server resources:
//!
//! * **Connection caps**, global and per source address: descriptors and
//!   memory are finite; without a per-source cap one client can take them
//!   all and legitimate clients time out. A connection over a cap is closed
//!   at once, before TLS.
//! * **TLS handshake timeout**: a client that connects and never finishes the
//!   handshake.
//! * **Header-read timeout** (HTTP/1): the time a client has to send a
//!   request's headers, also while an idle keep-alive connection waits for the
//!   next request (slowloris).
//! * **Idle timeout** (HTTP/1 and HTTP/2): a connection with no request in
//!   flight for this long is closed gracefully (HTTP/2: GOAWAY). A request is
//!   in flight from its headers until its response body (an SSE stream
//!   included) has been sent or dropped.
//! * **HTTP/2 keep-alive pings**: a peer that vanished without closing.
//!
//! At start [`raise_fd_limit`] lifts the soft descriptor limit to the hard
//! limit. Accept failures (a full descriptor table) are logged at most once
//! per [`ACCEPT_ERROR_LOG_INTERVAL`], with the number suppressed.
//!
//! On shutdown the loop stops accepting, asks every connection to finish
//! gracefully, waits for them up to the drain timeout, then drops the rest
//! (which cancels their generations).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::tls::ReloadableTls;

/// Accept failures are logged at most this often.
pub const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The limits and timeouts of every connection (from `[server]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionSettings {
    pub handshake_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    pub drain_timeout: Duration,
}

impl ConnectionSettings {
    pub fn from_config(c: &ServerConfig) -> Self {
        ConnectionSettings {
            handshake_timeout: Duration::from_secs(c.handshake_timeout_secs),
            header_read_timeout: Duration::from_secs(c.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(c.idle_timeout_secs),
            http2_keepalive_interval: Duration::from_secs(c.http2_keepalive_interval_secs),
            http2_keepalive_timeout: Duration::from_secs(c.http2_keepalive_timeout_secs),
            max_connections: c.max_connections,
            max_connections_per_source: c.max_connections_per_source,
            drain_timeout: Duration::from_secs(c.shutdown_timeout_secs),
        }
    }
}

/// Open connections, in all and per source address.
#[derive(Default)]
struct ConnectionTable {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// Counts open connections against the caps; a [`ConnectionSlot`] gives its
/// place back when dropped.
#[derive(Clone)]
struct ConnectionCaps {
    table: Arc<Mutex<ConnectionTable>>,
    closed: Arc<tokio::sync::Notify>,
    max_total: usize,
    max_per_source: usize,
}

/// One admitted connection's place in the [`ConnectionCaps`].
struct ConnectionSlot {
    caps: ConnectionCaps,
    ip: IpAddr,
}

impl ConnectionCaps {
    fn new(max_total: usize, max_per_source: usize) -> Self {
        ConnectionCaps {
            table: Arc::default(),
            closed: Arc::default(),
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
        }
    }

    /// A slot for a new connection from `ip`, or `None` over a cap.
    fn admit(&self, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = t.per_source.get(&ip).copied().unwrap_or(0);
        if t.total >= self.max_total || from_source >= self.max_per_source {
            return None;
        }
        t.total += 1;
        *t.per_source.entry(ip).or_default() += 1;
        Some(ConnectionSlot { caps: self.clone(), ip })
    }

    fn open(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut t = self.caps.table.lock().unwrap_or_else(|p| p.into_inner());
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.per_source.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.per_source.remove(&self.ip);
            }
        }
        drop(t);
        self.caps.closed.notify_waiters();
    }
}

/// What a connection is doing: requests in flight and the last change, for
/// the idle timeout.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` of the last request start or end.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity { started: Instant::now(), in_flight: AtomicUsize::new(0), last_ms: AtomicU64::new(0) })
    }

    fn touch(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let last = self.started + Duration::from_millis(self.last_ms.load(Ordering::Acquire));
            let deadline = last + timeout;
            if self.in_flight.load(Ordering::Acquire) == 0 && Instant::now() >= deadline {
                return;
            }
            let wake = if self.in_flight.load(Ordering::Acquire) > 0 { Instant::now() + timeout } else { deadline };
            tokio::time::sleep_until(wake.into()).await;
        }
    }
}

/// A request in flight; ends when dropped (with its response body).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// A response body that keeps its request in flight until it is done.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Raises the soft limit on open files to the hard limit (connections are
/// descriptors). Returns the limit now in force.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (limit.current, limit.maximum) {
        if cur < max {
            limit.current = Some(max);
            setrlimit(Resource::Nofile, limit)?;
        }
    } else if limit.maximum.is_none() && limit.current.is_some() {
        // Unlimited hard limit: take a generous soft limit instead.
        limit.current = Some(1 << 20);
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// Logs accept failures at most once per [`ACCEPT_ERROR_LOG_INTERVAL`].
struct AcceptErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl AcceptErrorLog {
    fn failed(&mut self, e: &std::io::Error) {
        if self.last.is_some_and(|t| t.elapsed() < ACCEPT_ERROR_LOG_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(error = %e, suppressed = self.suppressed, "accept failed");
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains for at
/// most `settings.drain_timeout`. `tls = None` serves plain HTTP (the caller
/// checked loopback).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<ReloadableTls>>,
    settings: ConnectionSettings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let caps = ConnectionCaps::new(settings.max_connections, settings.max_connections_per_source);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let settings = Arc::new(settings);
    let mut accept_errors = AcceptErrorLog { last: None, suppressed: 0 };
    let mut refused = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    accept_errors.failed(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(slot) = caps.admit(peer.ip()) else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(refused_total = refused, "connection refused: connection cap reached");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnectionTask {
            app: app.clone(),
            tls: tls.clone(),
            settings: settings.clone(),
            stop: stop_rx.clone(),
            peer,
            _slot: slot,
        };
        tokio::spawn(conn.run(stream));
    }
    drop(listener);
    tracing::info!(connections = caps.open(), "shutdown: draining connections");
    let _ = stop_tx.send(true);
    let drained = async {
        loop {
            let closed = caps.closed.notified();
            if caps.open() == 0 {
                return;
            }
            closed.await;
        }
    };
    if tokio::time::timeout(settings.drain_timeout, drained).await.is_err() {
        tracing::warn!("shutdown: drain timeout reached; cancelling remaining requests");
    }
}

/// One accepted connection.
struct ConnectionTask {
    app: Router,
    tls: Option<Arc<ReloadableTls>>,
    settings: Arc<ConnectionSettings>,
    stop: tokio::sync::watch::Receiver<bool>,
    peer: SocketAddr,
    _slot: ConnectionSlot,
}

impl ConnectionTask {
    async fn run(self, stream: tokio::net::TcpStream) {
        match self.tls.clone() {
            Some(tls) => {
                let handshake = tls.acceptor().accept(stream);
                match tokio::time::timeout(self.settings.handshake_timeout, handshake).await {
                    Ok(Ok(s)) => self.serve_http(s).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            }
            None => self.serve_http(stream).await,
        }
    }

    async fn serve_http<S>(mut self, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let (peer, app, tracked) = (self.peer, self.app.clone(), activity.clone());
        let svc = tower::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            let in_flight = tracked.begin();
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            async move {
                let resp = app.oneshot(req).await?;
                Ok::<_, std::convert::Infallible>(
                    resp.map(|inner| Body::new(TrackedBody { inner, _in_flight: in_flight })),
                )
            }
        });
        let mut builder = ConnBuilder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.settings.header_read_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(self.settings.http2_keepalive_interval)
            .keep_alive_timeout(self.settings.http2_keepalive_timeout);
        // Requests hyper cannot parse get an OpenAI error body (see `unparsable`).
        let io = unparsable::OpenAiParseErrors::new(io);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc));
        tokio::pin!(conn);
        let idle = activity.idle_for(self.settings.idle_timeout);
        tokio::pin!(idle);
        let mut closing = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = &mut idle, if !closing => {
                    tracing::debug!("closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                changed = self.stop.changed(), if !closing => {
                    if changed.is_err() || *self.stop.borrow() {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

mod unparsable;

#[cfg(test)]
mod tests;

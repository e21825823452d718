//! The accept loop: one hyper HTTP/1 connection per accepted socket, bounded three ways.
//!
//! - A header-read timeout: a client that has not sent a whole request head within
//!   [`Limits::header_read_timeout`] of starting it (or of the previous response) is
//!   disconnected, so half-sent requests cannot hold sockets forever.
//! - A keep-alive idle timeout: a connection with no request in flight and no byte
//!   received for [`Limits::idle_timeout`] is closed.
//! - A connection limit: past [`Limits::max_connections`] open connections a new one is
//!   read for its request head and answered `503 Service Unavailable` (a JSON error,
//!   `Connection: close`) instead of being refused silently. At most
//!   [`OVERFLOW_CONNECTIONS`] such answers are pending at once; beyond that a new
//!   connection is closed at once, because answering costs a socket too.
//!
//! The per-connection stream is whatever the [`Acceptor`] makes of the TCP stream: the
//! stream itself, or a TLS stream over it (see `tls.rs`), whose handshake is bounded by the
//! header-read timeout as well.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::Limits;

/// How many over-limit connections may wait for their 503 at once.
pub(crate) const OVERFLOW_CONNECTIONS: usize = 64;

/// Longest time an over-limit connection gets to send its request head before it is
/// closed without an answer.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Turns an accepted TCP stream into the stream HTTP runs over.
pub(crate) trait Acceptor: Clone + Send + Sync + 'static {
    /// The stream HTTP runs over.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Whether the stream is encrypted.
    const ENCRYPTED: bool;
    /// Completes whatever handshake the stream needs.
    fn accept(&self, stream: TcpStream) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Plain TCP: the stream as it is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlainAcceptor;

impl Acceptor for PlainAcceptor {
    type Stream = TcpStream;
    const ENCRYPTED: bool = false;
    async fn accept(&self, stream: TcpStream) -> io::Result<TcpStream> {
        Ok(stream)
    }
}

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting, asks every
/// open connection to finish its current request and waits for them all.
/// What the admin API allows on a connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdminPolicy {
    /// The admin API takes a bearer token.
    pub(crate) token: bool,
    /// `--admin-allow-plaintext`: the token may cross a non-loopback network in clear.
    pub(crate) allow_plaintext: bool,
}

impl AdminPolicy {
    /// Whether admin requests on a connection to `local` must be refused: the bearer
    /// token would cross a network unencrypted.
    pub(crate) fn refuses(self, encrypted: bool, local: std::net::IpAddr) -> bool {
        self.token && !encrypted && !self.allow_plaintext && !local.to_canonical().is_loopback()
    }
}

/// Why a plaintext admin request is refused.
pub(crate) const PLAINTEXT_ADMIN_REFUSED: &str = "the admin API does not take its bearer token \
    over plain HTTP on a non-loopback address, where anyone on the network path could read \
    it: serve TLS (--tls-cert, --tls-key), listen on a loopback address, or pass \
    --admin-allow-plaintext";

pub(crate) async fn serve<A: Acceptor>(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    acceptor: A,
    admin: AdminPolicy,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> io::Result<()> {
    let max_connections = limits.max_connections.max(1);
    let connections = Arc::new(Semaphore::new(max_connections));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    let (stop_sender, stop) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) if is_connection_error(&error) => continue,
            Err(_) => {
                // Out of file descriptors or memory: accepting again at once would spin.
                // The connections that hold them end by their own timeouts.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Small writes (SSE events, short answers) go out at once rather than waiting for
        // the client's acknowledgement of the previous segment.
        let _ = stream.set_nodelay(true);
        if let Ok(permit) = Arc::clone(&connections).try_acquire_owned() {
            let router = router.clone();
            let acceptor = acceptor.clone();
            let stop = stop.clone();
            let refuse_admin = stream
                .local_addr()
                .map_or(true, |local| admin.refuses(A::ENCRYPTED, local.ip()));
            tokio::spawn(async move {
                serve_connection(stream, router, limits, acceptor, refuse_admin, stop).await;
                drop(permit);
            });
        } else if let Ok(permit) = Arc::clone(&overflow).try_acquire_owned() {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                answer_over_limit(stream, acceptor, limits, max_connections).await;
                drop(permit);
            });
        }
        // Else the stream is dropped here, which closes it.
    }
    drop(listener);
    let _ = stop_sender.send(true);
    // Every connection holds a permit until it ends: holding them all means none is left.
    let _all = connections
        .acquire_many(u32::try_from(max_connections).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

/// Errors of one connection that leave the listener healthy.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

fn http1(header_read_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
}

async fn serve_connection<A: Acceptor>(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    acceptor: A,
    refuse_admin: bool,
    stop: watch::Receiver<bool>,
) {
    // The handshake (TLS) counts against the header-read timeout: a client that stalls in
    // it is as slow as one that stalls in its request head.
    let started = Instant::now();
    let stream =
        match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) | Err(_) => return,
        };
    let header_read_timeout = limits
        .header_read_timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    serve_http(
        stream,
        router,
        limits,
        header_read_timeout,
        refuse_admin,
        stop,
    )
    .await;
}

/// Serves HTTP/1 on an accepted (and, for TLS, handshaken) stream until the client
/// leaves, a timeout closes it or `stop` asks it to finish. With `refuse_admin`, every
/// `/admin` request is answered 403 with the reason, before the router sees it.
pub(crate) async fn serve_http<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    router: Router,
    limits: Limits,
    header_read_timeout: Duration,
    refuse_admin: bool,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(CountingStream {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let request_guard = activity.begin_request();
            let mut router = router.clone();
            async move {
                let response = if refuse_admin && is_admin_path(request.uri().path()) {
                    crate::error::error_response(
                        StatusCode::FORBIDDEN,
                        "plaintext_admin_refused",
                        PLAINTEXT_ADMIN_REFUSED,
                    )
                } else {
                    tower_service::Service::call(&mut router, request.map(Body::new)).await?
                };
                Ok::<_, Infallible>(response.map(|body| TrackedBody {
                    inner: body,
                    _request: request_guard,
                }))
            }
        })
    };
    let connection = http1(header_read_timeout).serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        let idle_deadline = activity.idle_deadline(limits.idle_timeout);
        tokio::select! {
            _ = connection.as_mut() => return,
            changed = stop.changed(), if !closing => {
                let _ = changed;
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(idle_deadline.into()), if !closing => {
                if activity.is_idle_since(limits.idle_timeout) {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

fn is_admin_path(path: &str) -> bool {
    path == "/admin" || path.starts_with("/admin/")
}

/// Reads an over-limit connection's request head and answers 503.
async fn answer_over_limit<A: Acceptor>(
    stream: TcpStream,
    acceptor: A,
    limits: Limits,
    max_connections: usize,
) {
    let timeout = limits.header_read_timeout.min(OVERFLOW_HEADER_TIMEOUT);
    let Ok(Ok(stream)) = tokio::time::timeout(timeout, acceptor.accept(stream)).await else {
        return;
    };
    let message = format!(
        "the proxy has {max_connections} open connections, its limit (--max-connections); \
         try again later"
    );
    let service = hyper::service::service_fn(move |_request: Request<Incoming>| {
        let body = serde_json::json!({
            "error": {"code": "unavailable", "message": message, "status": 503}
        });
        let mut response = Response::new(http_body_util::Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1(timeout);
    builder.keep_alive(false);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    // The whole exchange is bounded: the head by the timer above, the answer by this.
    let _ = tokio::time::timeout(timeout * 2, connection).await;
}

/// What a connection is doing: how many requests it has in flight and when it last
/// received a byte or finished a response.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Requests whose response body has not been dropped yet.
    in_flight: AtomicUsize,
    /// Milliseconds after `start` of the last received byte or finished response.
    last_event_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_event_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_event_ms.store(now, Ordering::Relaxed);
    }

    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            activity: Arc::clone(self),
        }
    }

    fn last_event(&self) -> Instant {
        self.start + Duration::from_millis(self.last_event_ms.load(Ordering::Relaxed))
    }

    /// When the connection will have been idle for `idle_timeout` if nothing happens.
    fn idle_deadline(&self, idle_timeout: Duration) -> Instant {
        let from = if self.in_flight.load(Ordering::Acquire) == 0 {
            self.last_event()
        } else {
            Instant::now()
        };
        from + idle_timeout
    }

    /// No request in flight and nothing received or answered for `idle_timeout`.
    fn is_idle_since(&self, idle_timeout: Duration) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.last_event().elapsed() >= idle_timeout
    }
}

/// Counts a request as in flight until its response body is dropped (hyper drops it once
/// it is written, or when the connection ends).
#[derive(Debug)]
struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's guard.
struct TrackedBody {
    inner: Body,
    _request: RequestGuard,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream that notes every read that brings bytes.
struct CountingStream<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests;

//! `hearth_serve`: the HTTP/1.1 listener of the control plane's API and of the host
//! agent, with the limits `axum::serve` lacks.
//!
//! - **Header timeout**: a connection that has not sent a complete request head within
//!   [`ServerLimits::header_read_timeout`] is closed. hyper applies the same timer while a
//!   keep-alive connection waits for its next request, so it is also the **idle timeout**.
//! - **Body idle timeout**: a request body that delivers no bytes for
//!   [`ServerLimits::body_idle_timeout`] fails (a slow drip is cut; a big upload that keeps
//!   moving is not: there is no total limit).
//! - **Connection cap**: at most [`ServerLimits::max_connections`] connections are served
//!   at once; beyond that the listener stops accepting, so new connections wait in the
//!   kernel's backlog until one ends.
//!
//! HTTP/2 (cleartext, prior knowledge: what gRPC-style clients such as E2B's SDKs send
//! to an `http://` URL) is served when [`ServerLimits::http2`] is on, beside HTTP/1.1 on
//! the same port. hyper has no idle timeout for HTTP/2, so such connections are pinged
//! every [`H2_PING_INTERVAL`] and closed when a ping goes unanswered for
//! [`H2_PING_TIMEOUT`]; streams per connection are capped at [`H2_MAX_STREAMS`].
//! WebSocket upgrades work over HTTP/1.1 (see [`proxy`]).
//! This crate owns only the transport; routing and errors belong to its users.

pub mod proxy;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Transport limits of a listener.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Time to send a whole request head; also how long an idle keep-alive connection
    /// is kept.
    pub header_read_timeout: Duration,
    /// Longest pause between two pieces of a request body.
    pub body_idle_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests before it drops them.
    pub shutdown_grace: Duration,
    /// Serve HTTP/2 (prior knowledge) beside HTTP/1.1.
    pub http2: bool,
}

/// How often an HTTP/2 connection is pinged.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Concurrent streams per HTTP/2 connection.
pub const H2_MAX_STREAMS: u32 = 256;

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(30),
            http2: false,
        }
    }
}

/// The error a request body reports when it stalled for too long.
#[derive(Debug, thiserror::Error)]
#[error("request body stalled: no data for {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

/// A request body that fails when no frame arrives for `idle`.
struct IdleTimeoutBody {
    inner: Incoming,
    idle: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for IdleTimeoutBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                this.sleep = None;
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.sleep = None;
                        Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serve `app` on `listener` under `limits` until `shutdown` resolves; then stop
/// accepting, let in-flight requests finish (up to `shutdown_grace`) and return.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    serve_with(listener, app, limits, None, shutdown).await
}

/// [`serve`] over TLS: every connection's handshake (which, with a client verifier in
/// `tls`, checks the client's certificate) must finish within the header timeout, or
/// the connection is dropped before any request is read.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_with(listener, app, limits, Some(acceptor), shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if !limits.http2 {
        http = http.http1_only();
    }
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    if limits.http2 {
        http.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_PING_INTERVAL))
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .max_concurrent_streams(H2_MAX_STREAMS);
    }
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let idle = limits.body_idle_timeout;
        let svc = app
            .clone()
            .map_request(move |req: http::Request<Incoming>| {
                req.map(|inner| {
                    Body::new(IdleTimeoutBody {
                        inner,
                        idle,
                        sleep: None,
                    })
                })
            });
        let http = http.clone();
        let watcher = graceful.watcher();
        let head_timeout = limits.header_read_timeout;
        let tls = tls.clone();
        tokio::spawn(async move {
            // hyper-util's `auto` builder waits, with no timeout, for the first bytes
            // (to tell HTTP/1 from HTTP/2) before hyper's head timeout starts: a client
            // that connects and sends nothing would hold its slot forever.
            let mut first = [0u8; 1];
            match tokio::time::timeout(head_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    tracing::debug!(%peer, "connection sent nothing within the header timeout");
                    drop(permit);
                    return;
                }
            }
            let svc = TowerToHyperService::new(svc);
            let result = match tls {
                None => {
                    let conn = http.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::info!(%peer, error = %e, "TLS handshake refused");
                                drop(permit);
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                drop(permit);
                                return;
                            }
                        };
                    let conn = http.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?limits.shutdown_grace, "connections still open at shutdown; not waiting for them");
    }
}

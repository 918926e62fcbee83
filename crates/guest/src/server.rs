//! The guest agent's listener, with the limits `axum::serve` lacks.
//!
//! - **Header timeout**: a connection that has not sent a whole HTTP/1 request head within
//!   [`ServerLimits::header_read_timeout`] is closed; hyper applies the same timer while a
//!   keep-alive connection waits for its next request, so it is also the idle timeout.
//! - **Connection cap**: at most [`ServerLimits::max_connections`] connections are served
//!   at once; beyond that the listener stops accepting (new ones wait in the backlog).
//!
//! Request bodies get no idle timeout: `process.Process/StreamInput` legitimately pauses
//! for as long as a terminal user does. HTTP/1.1 only, through hyper's own HTTP/1 builder:
//! the host agent talks HTTP/1.1 to the guest, hyper has no head timeout for h2c, and
//! hyper-util's `auto` builder first sniffs for an h2 preface with no timeout at all (a
//! connection that never sends a byte would be held forever).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Transport limits of the agent's listener.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Time to send a whole request head; also how long an idle keep-alive connection
    /// is kept.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// Serves `app` on `listener` under `limits` until the future is dropped.
pub async fn serve(listener: TcpListener, app: axum::Router, limits: ServerLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            // The semaphore is never closed.
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let http = http.clone();
        let svc = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

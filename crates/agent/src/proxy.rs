//! Reverse proxy from `/sandboxes/{sb-id}/envd/{*rest}` to the sandbox's guest
//! agent at `http://<guest_address>/{rest}` (query kept), and from
//! `/sandboxes/{sb-id}/port/{port}/{*rest}` to any port of the guest (the guest
//! agent's own port is the envd route). Bodies stream both ways without buffering;
//! hop-by-hop headers are stripped; a WebSocket (any `Upgrade`) is spliced through
//! once the guest answers 101. Unknown sandboxes get a JSON 404. It owns no sandbox
//! state: it reads the registry. Guest ports are reachable from the host only by
//! root (the host guard), so this proxy is the one way in for anyone else.
//!
//! The guest is hostile: a request to its agent carries the sandbox's access token
//! (`X-Access-Token`, replacing any the caller sent; requests to other ports carry
//! none) and never the agent token;
//! the guest must send its response head within
//! [`crate::AgentConfig::guest_header_timeout`] of the request body's end, in at
//! most [`crate::GUEST_MAX_HEAD_BYTES`]; redirects are passed back, never
//! followed; anything else (garbage, a reset, a timeout) is a JSON 502 whose
//! message is short and escaped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use hearth_types::SandboxId;
use http::header::HeaderValue;
use http::{StatusCode, Uri};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::sandbox::{escape_guest_text, ACCESS_TOKEN_HEADER};
use crate::Ctx;

/// Marks an answer the agent made itself (not the guest's), so that the control
/// plane's sandbox proxy can tell it from a guest app's own error pages.
pub const AGENT_ERROR_HEADER: &str = "x-hearth-agent-error";

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (
        status,
        [(AGENT_ERROR_HEADER, HeaderValue::from_static("1"))],
        axum::Json(body),
    )
        .into_response()
}

pub use hearth_serve::proxy::strip_hop_by_hop;

/// `/sandboxes/{id}/envd/{*rest}`: the guest agent.
pub(crate) async fn handle(
    State(ctx): State<Arc<Ctx>>,
    Path((id, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    forward(ctx, id, None, rest, req).await
}

/// `/sandboxes/{id}/port/{port}/{*rest}`: any port of the guest.
pub(crate) async fn handle_port(
    State(ctx): State<Arc<Ctx>>,
    Path((id, port, rest)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    match parse_port(&port) {
        Ok(port) => forward(ctx, id, Some(port), rest, req).await,
        Err(r) => r,
    }
}

/// `/sandboxes/{id}/port/{port}` and `.../{port}/`: the root path of a guest port.
pub(crate) async fn handle_port_root(
    State(ctx): State<Arc<Ctx>>,
    Path((id, port)): Path<(String, String)>,
    req: Request,
) -> Response {
    match parse_port(&port) {
        Ok(port) => forward(ctx, id, Some(port), String::new(), req).await,
        Err(r) => r,
    }
}

#[allow(clippy::result_large_err)]
fn parse_port(s: &str) -> Result<u16, Response> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!(
                "port {:?} is not a port number (1-65535)",
                escape_guest_text(s, 16)
            ),
        )),
    }
}

/// Forward `req` to the guest of sandbox `id`: its agent when `port` is `None` or
/// the agent's own port, else `port`.
async fn forward(
    ctx: Arc<Ctx>,
    id: String,
    port: Option<u16>,
    rest: String,
    req: Request,
) -> Response {
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("sandbox {id} is not on this host"),
        )
    };
    let Ok(sid) = id.parse::<SandboxId>() else {
        return not_found();
    };
    let Some(handle) = ctx.registry.get(&sid) else {
        return not_found();
    };
    let (addr, token, record) = {
        let r = handle.record.borrow();
        match (r.state, r.guest_address) {
            (crate::state::SandboxState::Running, Some(agent)) => match port {
                Some(p) if p != agent.port() => (
                    std::net::SocketAddr::new(agent.ip(), p),
                    None,
                    handle.record.clone(),
                ),
                _ => (agent, r.access_token.clone(), handle.record.clone()),
            },
            (state, _) => {
                return error(
                    StatusCode::CONFLICT,
                    "not_running",
                    format!(
                        "sandbox {id} is {state}, not running; resume it first if it is paused"
                    ),
                )
            }
        }
    };
    // A guest that vanishes (VM exited, destroyed) sends no reset: without this, a
    // proxied stream would wait for it forever.
    let gone = vm_gone(record);
    let pq = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    let uri: Uri = match format!("http://{addr}{pq}").parse() {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_argument", e.to_string()),
    };
    let (mut parts, body) = req.into_parts();
    let upgrade = hearth_serve::proxy::prepare_request(&mut parts);
    // The host's secret never reaches a guest.
    parts.headers.remove(crate::AGENT_TOKEN_HEADER);
    // Only the agent speaks for the sandbox: a caller's own token is replaced.
    parts.headers.remove(ACCESS_TOKEN_HEADER);
    if let Some(token) = token {
        if let Ok(v) = HeaderValue::from_str(token.as_str()) {
            parts.headers.insert(ACCESS_TOKEN_HEADER, v);
        }
    }
    if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
        parts.headers.insert(http::header::HOST, host);
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let (sent_tx, sent_rx) = oneshot::channel();
    let body = Body::new(NotifyEnd {
        inner: body,
        done: Some(sent_tx),
    });
    let upstream = http::Request::from_parts(parts, body);
    let head_timeout = ctx.config.guest_header_timeout;
    let request = ctx.http.request(upstream);
    // The head deadline starts once the request body is sent (an upload's answer
    // only comes after it); a dropped body counts as sent.
    let deadline = async {
        let _ = sent_rx.await;
        tokio::time::sleep(head_timeout).await;
    };
    let mut gone = Box::pin(gone);
    let outcome = tokio::select! {
        r = request => Some(r),
        () = deadline => None,
        () = &mut gone => {
            return error(
                StatusCode::BAD_GATEWAY,
                "unavailable",
                format!("the VM of {sid} is gone"),
            );
        }
    };
    match outcome {
        Some(Ok(resp)) => {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                return match hearth_serve::proxy::switch(upgrade, resp, gone) {
                    Ok(resp) => resp,
                    Err(why) => {
                        warn!(sandbox_id = %sid, "guest {why}");
                        error(
                            StatusCode::BAD_GATEWAY,
                            "unavailable",
                            format!("the guest of {sid} {why}"),
                        )
                    }
                };
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(
                parts,
                Body::new(UntilGone {
                    inner: Body::new(body),
                    gone: Some(gone),
                }),
            )
        }
        Some(Err(e)) => {
            let chain = crate::error_chain(&e);
            if e.is_connect() && addr.port() != hearth_proto::GUEST_AGENT_PORT {
                debug!(sandbox_id = %sid, error = %chain, "guest port not open");
                // E2B's SDKs look for "port is not open".
                error(
                    StatusCode::BAD_GATEWAY,
                    "unavailable",
                    format!(
                        "port is not open: nothing answers on port {} of sandbox {sid}",
                        addr.port()
                    ),
                )
            } else if e.is_connect() {
                debug!(sandbox_id = %sid, error = %chain, "guest agent unreachable");
                error(
                    StatusCode::BAD_GATEWAY,
                    "unavailable",
                    format!("guest agent of {sid} is unreachable"),
                )
            } else {
                warn!(sandbox_id = %sid, error = %escape_guest_text(&chain, 500), "guest agent sent no valid answer");
                error(
                    StatusCode::BAD_GATEWAY,
                    "unavailable",
                    format!(
                        "guest agent of {sid} sent no valid answer: {}",
                        escape_guest_text(&chain, 120)
                    ),
                )
            }
        }
        None => {
            warn!(sandbox_id = %sid, ?head_timeout, "guest agent sent no response head in time");
            error(
                StatusCode::BAD_GATEWAY,
                "unavailable",
                format!(
                    "guest agent of {sid} did not answer within {}s",
                    head_timeout.as_secs_f64()
                ),
            )
        }
    }
}

/// A request body that says when it has been sent completely (or dropped).
struct NotifyEnd {
    inner: Body,
    done: Option<oneshot::Sender<()>>,
}

impl HttpBody for NotifyEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.inner.is_end_stream()
        {
            if let Some(done) = self.done.take() {
                let _ = done.send(());
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves once the sandbox behind `record` no longer runs a VM that could answer:
/// it left `Running`, lost its guest address, or its actor is gone.
async fn vm_gone(mut record: tokio::sync::watch::Receiver<crate::state::SandboxRecord>) {
    let _ = record
        .wait_for(|r| r.guest_address.is_none() || r.state != crate::state::SandboxState::Running)
        .await;
}

/// A guest's response body that ends with an error as soon as the VM is gone.
struct UntilGone<G> {
    inner: Body,
    gone: Option<Pin<Box<G>>>,
}

impl<G: std::future::Future<Output = ()> + Send> HttpBody for UntilGone<G> {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if let Some(gone) = self.gone.as_mut() {
            if gone.as_mut().poll(cx).is_ready() {
                self.gone = None;
                return Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the sandbox's VM is gone",
                )))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

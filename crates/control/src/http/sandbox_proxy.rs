//! The sandbox proxy's front: a request meant for a sandbox port rather than the API
//! is recognised before routing, by E2B's headers (`E2b-Sandbox-Id`,
//! `E2b-Sandbox-Port`: what E2B's SDKs send when `E2B_SANDBOX_URL` is set) or by its
//! host name `<port>-<sandbox id>.<domain>` (what browsers and the SDKs' `get_host()`
//! use), and forwarded to the sandbox's host (`App::open_sandbox_port` decides who
//! may). Everything else goes on to the API. Errors have E2B's proxy shape
//! (`{"code", "message", "sandboxId"}`), so the SDKs map them as they would E2B's.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hearth_types::SandboxId;
use http::header::{HeaderValue, HOST};
use http::StatusCode;

use super::AppState;
use crate::app::hosts::HostError;
use crate::app::sandbox_proxy::{ProxyError, ENVD_PORT};
use crate::app::AppError;

const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
const ACCESS_TOKEN_HEADER: &str = "x-access-token";
/// Headers meant for the proxy (or the API), never passed to a sandbox.
const PROXY_ONLY: &[&str] = &[
    SANDBOX_ID_HEADER,
    SANDBOX_PORT_HEADER,
    "e2b-traffic-access-token",
    "x-api-key",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// A sandbox port a request is addressed to.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    id: SandboxId,
    port: u16,
}

fn error(status: StatusCode, message: String, id: Option<&str>) -> Response {
    let mut body = serde_json::json!({ "code": status.as_u16(), "message": message });
    if let Some(id) = id {
        body["sandboxId"] = serde_json::Value::String(id.to_owned());
    }
    (status, axum::Json(body)).into_response()
}

fn parse_port(s: &str) -> Option<u16> {
    s.trim().parse::<u16>().ok().filter(|p| *p > 0)
}

/// The sandbox port `req` is addressed to: `None` for an API request, `Some(Err)` for
/// a malformed sandbox address.
#[allow(clippy::result_large_err)]
fn target(req: &Request) -> Option<Result<Target, Response>> {
    let headers = req.headers();
    if let Some(id) = headers.get(SANDBOX_ID_HEADER) {
        let id = id.to_str().unwrap_or_default().trim();
        let Ok(parsed) = id.parse::<SandboxId>() else {
            return Some(Err(error(
                StatusCode::BAD_REQUEST,
                format!("{SANDBOX_ID_HEADER} is not a sandbox ID (sb- and 16 lowercase letters or digits)"),
                None,
            )));
        };
        let port = match headers.get(SANDBOX_PORT_HEADER) {
            None => Some(ENVD_PORT),
            Some(v) => v.to_str().ok().and_then(parse_port),
        };
        let Some(port) = port else {
            return Some(Err(error(
                StatusCode::BAD_REQUEST,
                format!("{SANDBOX_PORT_HEADER} is not a port number (1-65535)"),
                Some(id),
            )));
        };
        return Some(Ok(Target { id: parsed, port }));
    }
    // HTTP/1.1 sends Host; HTTP/2 the :authority, which hyper puts in the URI.
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))?;
    parse_host(&host)
}

/// `<port>-<sandbox id>.<domain>[:<listen port>]` -> the target; any other host name
/// is the API's.
#[allow(clippy::result_large_err)]
fn parse_host(host: &str) -> Option<Result<Target, Response>> {
    let (label, domain) = host.split_once('.')?;
    if domain.is_empty() {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || id.is_empty() {
        return None;
    }
    let id_text = id.to_ascii_lowercase();
    let Some(port) = parse_port(port) else {
        return Some(Err(error(
            StatusCode::BAD_REQUEST,
            format!("{port:.8} is not a port number (1-65535)"),
            None,
        )));
    };
    match id_text.parse::<SandboxId>() {
        Ok(id) => Some(Ok(Target { id, port })),
        Err(_) => Some(Err(error(
            StatusCode::BAD_REQUEST,
            "the host name's sandbox ID is not a sandbox ID (sb- and 16 lowercase letters or digits)".into(),
            None,
        ))),
    }
}

/// Middleware over the whole server: sandbox traffic is proxied, the rest routed.
pub(crate) async fn route(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let target = match target(&req) {
        None => return next.run(req).await,
        Some(Err(resp)) => return resp,
        Some(Ok(t)) => t,
    };
    let id_text = target.id.to_string();
    let token = req
        .headers()
        .get(ACCESS_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let host = match state
        .app
        .open_sandbox_port(&target.id, target.port, token.as_deref())
        .await
    {
        Ok(h) => h,
        Err(e) => return refused(e, &id_text),
    };
    let (mut parts, body) = req.into_parts();
    let original_host = parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    for name in PROXY_ONLY {
        parts.headers.remove(*name);
    }
    // The agent puts the guest's own token on its agent port; nobody else's app sees
    // the caller's.
    parts.headers.remove(ACCESS_TOKEN_HEADER);
    if let Some(h) = original_host {
        parts.headers.insert("x-forwarded-host", h);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    match host
        .proxy(&target.id, target.port, Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => resp,
        // The host no longer holds it (destroyed meanwhile).
        Err(HostError::Http { status: 404, .. }) => error(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {id_text} was not found"),
            Some(&id_text),
        ),
        // The host's own word (port not open, guest unreachable, paused meanwhile).
        Err(HostError::Http { status, message }) => error(
            StatusCode::from_u16(status)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::BAD_GATEWAY),
            message,
            Some(&id_text),
        ),
        Err(e) => {
            tracing::debug!(sandbox_id = %target.id, port = target.port, error = %e, "sandbox proxy: host failed");
            error(
                StatusCode::BAD_GATEWAY,
                format!(
                    "The sandbox {id_text} could not be reached on port {}: {e}",
                    target.port
                ),
                Some(&id_text),
            )
        }
    }
}

fn refused(e: ProxyError, id: &str) -> Response {
    let (status, message) = match &e {
        ProxyError::NotFound(_) | ProxyError::NotRunning { .. } => {
            (StatusCode::BAD_GATEWAY, e.to_string())
        }
        ProxyError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, e.to_string()),
        // Gone between the lookup and the host call: E2B's "not found" is a 502.
        ProxyError::App(AppError::NotFound(_)) => (StatusCode::BAD_GATEWAY, e.to_string()),
        ProxyError::App(a) => (super::e2b::status_of(a), super::e2b::message_of(a)),
    };
    error(status, message, Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn req(headers: &[(&str, &str)]) -> Request {
        let mut b = http::Request::builder().uri("/process.Process/Start");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn api_requests_are_not_sandbox_traffic() {
        for host in [
            "127.0.0.1:7420",
            "localhost:7420",
            "api.example.com",
            "[::1]:7420",
            "a-b.example.com",
            "12-.x",
        ] {
            assert!(target(&req(&[("host", host)])).is_none(), "{host}");
        }
        assert!(target(&req(&[])).is_none());
    }

    #[test]
    fn headers_and_host_names_address_a_port() {
        let id = "sb-abcdefghij012345";
        let t = target(&req(&[
            (SANDBOX_ID_HEADER, id),
            (SANDBOX_PORT_HEADER, "49983"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(t.port, 49983);
        assert_eq!(t.id.to_string(), id);
        let t = target(&req(&[(SANDBOX_ID_HEADER, id)])).unwrap().unwrap();
        assert_eq!(t.port, ENVD_PORT, "the port header defaults to the agent's");
        let t = target(&req(&[("host", &format!("8000-{id}.localhost:7420"))]))
            .unwrap()
            .unwrap();
        assert_eq!((t.port, t.id.to_string().as_str()), (8000, id));
    }

    #[test]
    fn malformed_sandbox_addresses_are_400() {
        let bad = [
            vec![(SANDBOX_ID_HEADER, "../etc")],
            vec![
                (SANDBOX_ID_HEADER, "sb-abcdefghij012345"),
                (SANDBOX_PORT_HEADER, "0"),
            ],
            vec![
                (SANDBOX_ID_HEADER, "sb-abcdefghij012345"),
                (SANDBOX_PORT_HEADER, "70000"),
            ],
            vec![("host", "99999-sb-abcdefghij012345.localhost")],
            vec![("host", "80-sb-nope.localhost")],
        ];
        for h in bad {
            let r = target(&req(&h)).expect("a sandbox address").unwrap_err();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{h:?}");
        }
    }
}

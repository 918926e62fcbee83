//! Reverse proxy from `/sandboxes/{sb-id}/envd/{*rest}` to the sandbox's guest
//! agent at `http://<guest_address>/{rest}` (query kept). Bodies stream both ways
//! without buffering; hop-by-hop headers are stripped. Unknown sandboxes get a
//! JSON 404. It owns no sandbox state: it reads the registry.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use hearth_types::SandboxId;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use tracing::debug;

use crate::Ctx;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// Remove hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

pub(crate) async fn handle(
    State(ctx): State<Arc<Ctx>>,
    Path((id, rest)): Path<(String, String)>,
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
    let Some(addr) = ctx
        .registry
        .get(&sid)
        .and_then(|h| h.snapshot().guest_address)
    else {
        return not_found();
    };
    let pq = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    let uri: Uri = match format!("http://{addr}{pq}").parse() {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_argument", e.to_string()),
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The host's secret never reaches a guest.
    parts.headers.remove(crate::AGENT_TOKEN_HEADER);
    if let Ok(host) = HeaderValue::from_str(&addr.to_string()) {
        parts.headers.insert(http::header::HOST, host);
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let upstream = http::Request::from_parts(parts, body);
    match ctx.http.request(upstream).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            debug!(sandbox_id = %sid, error = %e, "guest agent unreachable");
            error(
                StatusCode::BAD_GATEWAY,
                "unavailable",
                format!("guest agent of {sid} is unreachable: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("connect-protocol-version", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("content-type") && h.contains_key("connect-protocol-version"));
    }
}

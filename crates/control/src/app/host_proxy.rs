//! Forwarding one HTTP request (or WebSocket) to a port of a sandbox through its host
//! agent's port route (`/sandboxes/{id}/port/{port}/{*path}`): the sandbox proxy's
//! last hop. Bodies stream both ways; hop-by-hop headers are stripped; an `Upgrade`
//! is passed on and the connections spliced once the agent answers 101. The agent
//! adds the guest's own access token for its agent port; the agent token goes to the
//! agent only (the agent never forwards it).

use axum::body::Body;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::hosts::HostError;
use hearth_serve::proxy;
use hearth_types::SandboxId;

/// An HTTP/1.1 client for the agent's port route (plain, or mutual TLS for an
/// enrolled host).
pub type RawClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// `tls`: the enrolled host's client config; `None`: a static host over plain HTTP.
pub fn raw_client(tls: Option<rustls::ClientConfig>) -> RawClient {
    Client::builder(TokioExecutor::new()).build(super::hosts::connector(tls))
}

/// Send `req` (its path and query kept) to `port` of sandbox `id` via the agent at
/// `agent_url`.
pub async fn forward(
    client: &RawClient,
    agent_url: &str,
    agent_token: Option<&str>,
    id: &SandboxId,
    port: u16,
    req: Request<Body>,
) -> Result<Response<Body>, HostError> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path().trim_start_matches('/');
    let target = match parts.uri.query() {
        Some(q) => format!("{agent_url}/sandboxes/{id}/port/{port}/{path}?{q}"),
        None => format!("{agent_url}/sandboxes/{id}/port/{port}/{path}"),
    };
    let uri: Uri = target
        .parse()
        .map_err(|e| HostError::Transport(format!("proxy URL: {e}")))?;
    let upgrade = proxy::prepare_request(&mut parts);
    parts.headers.remove(http::header::HOST);
    if let Some(t) = agent_token {
        let mut v = HeaderValue::from_str(t)
            .map_err(|_| HostError::Transport("agent token is not a valid header value".into()))?;
        v.set_sensitive(true);
        parts.headers.insert(hearth_proto::AGENT_TOKEN_HEADER, v);
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let resp = client
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|e| HostError::Transport(format!("host agent: {}", error_chain(&e))))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The agent ends its side when the VM goes; that ends this splice too.
        return proxy::switch(upgrade, resp, std::future::pending()).map_err(|why| {
            HostError::Http {
                status: 502,
                message: format!("the sandbox {why}"),
            }
        });
    }
    if resp.headers().contains_key(AGENT_ERROR_HEADER) {
        return Err(agent_error(resp).await);
    }
    let (mut parts, body) = resp.into_parts();
    proxy::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// Marks an answer the host agent made itself (`{"error": {"code", "message"}}`), not
/// the guest's: it becomes a [`HostError`] so the proxy can answer in its own shape.
const AGENT_ERROR_HEADER: &str = "x-hearth-agent-error";

async fn agent_error(resp: Response<hyper::body::Incoming>) -> HostError {
    use http_body_util::BodyExt;
    let status = resp.status().as_u16();
    let limited = http_body_util::Limited::new(resp.into_body(), super::hosts::MAX_ERROR_BODY);
    let message = match limited.collect().await {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b.to_bytes())
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("the host agent answered {status}")),
        Err(_) => format!("the host agent answered {status}"),
    };
    let message: String = message
        .chars()
        .take(super::hosts::MAX_MESSAGE_CHARS)
        .collect();
    HostError::Http { status, message }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

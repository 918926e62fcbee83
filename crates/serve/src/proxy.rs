//! What both reverse-proxy hops (control plane -> host agent -> guest) share: the
//! hop-by-hop headers that are never forwarded, and passing protocol upgrades
//! (WebSocket) through: keep the `Connection: upgrade` / `Upgrade` pair that stripping
//! removes, and once the upstream answers `101 Switching Protocols`, splice the
//! client's connection to the upstream's, both ways, until either side closes or a
//! given future resolves.

use std::future::Future;

use axum::body::Body;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, UPGRADE};
use http::request::Parts;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

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

/// Remove hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
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

/// The `Upgrade` protocol a request or response asks for: set when `Connection`
/// names `upgrade` and an `Upgrade` header is present.
pub fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    headers.get(UPGRADE).cloned()
}

/// Put back the upgrade pair (after hop-by-hop headers were stripped).
pub fn restore(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// A request's upgrade, taken out of it before it is forwarded.
pub struct Upgrade {
    protocol: Option<HeaderValue>,
    client: Option<OnUpgrade>,
}

/// Make a request's head ready to forward: hop-by-hop headers stripped, an upgrade
/// it asks for kept (its pair of headers, and the client's side taken out).
pub fn prepare_request(parts: &mut Parts) -> Upgrade {
    let protocol = requested(&parts.headers);
    let client = parts.extensions.remove::<OnUpgrade>();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(p) = protocol.clone() {
        restore(&mut parts.headers, p);
    }
    Upgrade { protocol, client }
}

/// The upstream answered 101: pass the switch on and splice the two connections until
/// either closes or `until` resolves. `Err` when the request asked for no upgrade
/// (an upstream may not switch protocols unasked).
pub fn switch(
    upgrade: Upgrade,
    mut resp: http::Response<hyper::body::Incoming>,
    until: impl Future<Output = ()> + Send + 'static,
) -> Result<http::Response<Body>, &'static str> {
    let (Some(asked), Some(client)) = (upgrade.protocol, upgrade.client) else {
        return Err("switched protocols unasked");
    };
    let upstream = hyper::upgrade::on(&mut resp);
    let protocol = resp.headers().get(UPGRADE).cloned().unwrap_or(asked);
    let (mut parts, _) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    restore(&mut parts.headers, protocol);
    splice(client, upstream, until);
    Ok(http::Response::from_parts(parts, Body::empty()))
}

/// Splice `client` and `upstream` once both upgrades complete, in a task of its own;
/// ends when either side closes or `until` resolves. Returns at once.
fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    until: impl Future<Output = ()> + Send + 'static,
) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "an upgraded connection did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            () = until => {}
        }
    });
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

    #[test]
    fn only_connection_upgrade_with_an_upgrade_header_counts() {
        let mut h = HeaderMap::new();
        assert!(requested(&h).is_none());
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(
            requested(&h).is_none(),
            "Upgrade without Connection: upgrade"
        );
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert_eq!(requested(&h).unwrap(), "websocket");
        let (mut parts, _) = http::Request::builder()
            .header(CONNECTION, "Upgrade, x-hop")
            .header(UPGRADE, "websocket")
            .header("x-hop", "1")
            .header("x-end", "1")
            .body(())
            .unwrap()
            .into_parts();
        let up = prepare_request(&mut parts);
        assert_eq!(up.protocol.unwrap(), "websocket");
        assert_eq!(parts.headers[CONNECTION], "upgrade");
        assert_eq!(parts.headers[UPGRADE], "websocket");
        assert!(!parts.headers.contains_key("x-hop") && parts.headers.contains_key("x-end"));
    }
}

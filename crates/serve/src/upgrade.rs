//! Passing protocol upgrades (WebSocket) through a reverse proxy: keep the
//! `Connection: upgrade` / `Upgrade` pair that hop-by-hop stripping removes, and once
//! the upstream answers `101 Switching Protocols`, splice the client's connection to
//! the upstream's, both ways, until either side closes or `until` resolves.

use std::future::Future;

use http::header::{HeaderMap, HeaderValue, CONNECTION, UPGRADE};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

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

/// Splice `client` and `upstream` once both upgrades complete, in a task of its own;
/// ends when either side closes or `until` resolves. Returns at once.
pub fn splice(
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
        let mut out = HeaderMap::new();
        restore(&mut out, HeaderValue::from_static("websocket"));
        assert_eq!(out[CONNECTION], "upgrade");
        assert_eq!(out[UPGRADE], "websocket");
    }
}

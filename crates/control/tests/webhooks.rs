//! Webhooks through the real router and a real HTTP receiver on loopback (a fake host
//! agent stands in for the VMs): a team's events arrive in order, signed, filtered by
//! pattern, never another team's; a failing receiver gets the same event again after
//! a backoff, and enough failures in a row disable the webhook; bad URLs (schemes,
//! credentials, private addresses) are refused and store nothing.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use common::{env_with, Env};
use hearth_control::app::webhooks::signature;
use hearth_control::app::Policy;
use serde_json::{json, Value};

/// One POST the receiver got: its headers and body.
type Delivery = (HeaderMap, Vec<u8>);

/// What the receiver got: (headers, body) per POST; it answers the next status of
/// `answers` (200 once they run out).
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Delivery>>>,
    answers: Arc<Mutex<Vec<u16>>>,
}

impl Receiver {
    async fn start(answers: &[u16]) -> (Receiver, String) {
        let r = Receiver {
            answers: Arc::new(Mutex::new(answers.iter().rev().copied().collect())),
            ..Default::default()
        };
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    state.got.lock().unwrap().push((headers, body.to_vec()));
                    let code = state.answers.lock().unwrap().pop().unwrap_or(200);
                    StatusCode::from_u16(code).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, format!("http://{addr}/hook"))
    }

    fn bodies(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect()
    }
}

async fn env_allowing_loopback() -> Env {
    env_with(Policy {
        webhook_allow_private: true,
        webhook_max_failures: 3,
        webhook_backoff: Duration::from_millis(20),
        ..Policy::default()
    })
    .await
}

async fn create_hook(e: &Env, key: &str, url: &str, events: Option<Value>) -> (String, String) {
    let mut body = json!({ "url": url });
    if let Some(ev) = events {
        body["events"] = ev;
    }
    let (s, v) = e.call("POST", "/v1/webhooks", Some(key), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (
        v["webhook"]["id"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_teams_events_arrive_signed_in_order_and_only_its_own() {
    let e = env_allowing_loopback().await;
    let (rx, url) = Receiver::start(&[]).await;
    let (hook, secret) = create_hook(&e, &e.key_a, &url, None).await;
    let (rx_keys, url_keys) = Receiver::start(&[]).await;
    create_hook(&e, &e.key_a, &url_keys, Some(json!(["key.*"]))).await;

    let a = e.create().await;
    let (s, _) = e
        .call(
            "DELETE",
            &format!("/v1/sandboxes/{a}"),
            Some(&e.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Team b's acts are not team a's events.
    let (s, v) = e
        .call(
            "POST",
            "/v1/sandboxes",
            Some(&e.key_b),
            Some(json!({"template": "minimal"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let r = e.state.app().deliver_webhooks_once().await.unwrap();
    assert_eq!((r.delivered, r.failed), (4, 0), "{r:?}");

    let bodies = rx.bodies();
    let actions: Vec<_> = bodies
        .iter()
        .map(|b| b["action"].as_str().unwrap())
        .collect();
    // Its own creation (a first event to check the receiver with), the second
    // hook's, then the sandbox's.
    assert_eq!(
        actions,
        [
            "webhook.create",
            "webhook.create",
            "sandbox.create",
            "sandbox.delete"
        ],
        "{bodies:?}"
    );
    assert_eq!(bodies[0]["target"], hook.as_str());
    assert!(bodies[2..].iter().all(|b| b["target"] == a.as_str()));
    assert!(bodies.iter().all(|b| b["team_id"] == e.team_a.to_string()));
    // The signature is the HMAC of "<timestamp>.<body>" under the secret.
    for (headers, body) in rx.got.lock().unwrap().iter() {
        let ts: i64 = headers["hearth-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            headers["hearth-signature"].to_str().unwrap(),
            signature(&secret, ts, body)
        );
        assert_eq!(headers["hearth-webhook-id"].to_str().unwrap(), hook);
        assert_ne!(
            signature("another secret", ts, body),
            signature(&secret, ts, body)
        );
    }
    // The `key.*` hook got none of these; a second pass sends nothing again.
    assert!(rx_keys.bodies().is_empty());
    let r = e.state.app().deliver_webhooks_once().await.unwrap();
    assert_eq!(r.delivered, 0);
    let (_, v) = e
        .call(
            "POST",
            "/v1/keys",
            Some(&e.key_a),
            Some(json!({"name": "x"})),
        )
        .await;
    assert!(v["secret"].is_string(), "{v}");
    e.state.app().deliver_webhooks_once().await.unwrap();
    assert_eq!(rx_keys.bodies()[0]["action"], "key.create");
    assert_eq!(rx.bodies().len(), 5, "`*` gets the key event too");

    // Team b cannot see or delete team a's webhook.
    let (_, list) = e.call("GET", "/v1/webhooks", Some(&e.key_b), None).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 0, "{list}");
    let (s, _) = e
        .call(
            "DELETE",
            &format!("/v1/webhooks/{hook}"),
            Some(&e.key_b),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e
        .call(
            "DELETE",
            &format!("/v1/webhooks/{hook}"),
            Some(&e.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    e.create().await;
    e.state.app().deliver_webhooks_once().await.unwrap();
    assert_eq!(rx.bodies().len(), 5, "a deleted webhook gets nothing");
}

#[tokio::test]
async fn a_failing_receiver_gets_the_event_again_and_too_many_failures_disable_it() {
    let e = env_allowing_loopback().await;
    let (rx, url) = Receiver::start(&[500, 503]).await;
    let (hook, _) = create_hook(&e, &e.key_a, &url, Some(json!(["sandbox.*"]))).await;
    let id = e.create().await;
    for _ in 0..2 {
        let r = e.state.app().deliver_webhooks_once().await.unwrap();
        assert_eq!((r.delivered, r.failed), (0, 1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, list) = e.call("GET", "/v1/webhooks", Some(&e.key_a), None).await;
    assert_eq!(list["webhooks"][0]["failures"], 2, "{list}");
    assert!(list["webhooks"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("503"));
    let r = e.state.app().deliver_webhooks_once().await.unwrap();
    assert_eq!((r.delivered, r.failed), (1, 0));
    // The same event three times (at least once), nothing lost or reordered.
    let bodies = rx.bodies();
    assert_eq!(bodies.len(), 3);
    assert!(bodies
        .iter()
        .all(|b| b["target"] == id.as_str() && b["id"] == bodies[0]["id"]));
    let (_, list) = e.call("GET", "/v1/webhooks", Some(&e.key_a), None).await;
    assert_eq!(list["webhooks"][0]["failures"], 0, "{list}");

    // A receiver that keeps failing: disabled after 3 in a row, then left alone.
    *rx.answers.lock().unwrap() = vec![500; 10];
    e.create().await;
    for _ in 0..5 {
        e.state.app().deliver_webhooks_once().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rx.bodies().len(), 3 + 3);
    let (_, list) = e.call("GET", "/v1/webhooks", Some(&e.key_a), None).await;
    let w = &list["webhooks"][0];
    assert_eq!(w["id"], hook.as_str());
    assert!(w["disabled_at"].is_string(), "{w}");
}

#[tokio::test]
async fn bad_webhooks_are_refused_and_store_nothing() {
    // The default policy: no private addresses.
    let e = common::env().await;
    for (url, needle) in [
        ("ftp://example.com/x", "http"),
        ("http://user:pw@example.com/x", "user"),
        ("not a url", "parse"),
        ("http://127.0.0.1:9/x", "private"),
        ("http://10.1.2.3/x", "private"),
        ("http://169.254.169.254/latest", "private"),
        ("http://[::1]/x", "private"),
        ("http://[::ffff:192.168.0.1]/x", "private"),
    ] {
        let (s, v) = e
            .call(
                "POST",
                "/v1/webhooks",
                Some(&e.key_a),
                Some(json!({ "url": url })),
            )
            .await;
        common::assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", needle);
    }
    let long = format!("https://example.com/{}", "a".repeat(2100));
    let (s, _) = e
        .call(
            "POST",
            "/v1/webhooks",
            Some(&e.key_a),
            Some(json!({ "url": long })),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    for events in [
        json!([]),
        json!(["Sandbox.*"]),
        json!([".."]),
        json!(["a/b"]),
        json!(vec!["x"; 17]),
    ] {
        let (s, v) = e
            .call(
                "POST",
                "/v1/webhooks",
                Some(&e.key_a),
                Some(json!({ "url": "https://example.com/h", "events": events })),
            )
            .await;
        common::assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", "event");
    }
    for bad in ["wh-", "../../x", "wh-ABCDEFGHIJKL"] {
        let (s, _) = e
            .call(
                "DELETE",
                &format!("/v1/webhooks/{bad}"),
                Some(&e.key_a),
                None,
            )
            .await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::NOT_FOUND,
            "{bad}: {s}"
        );
    }
    let (_, list) = e.call("GET", "/v1/webhooks", Some(&e.key_a), None).await;
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 0, "{list}");
    // A public URL is fine, up to the team's cap.
    for _ in 0..hearth_control::app::webhooks::MAX_WEBHOOKS_PER_TEAM {
        create_hook(&e, &e.key_a, "https://hooks.example.com/h", None).await;
    }
    let (s, v) = e
        .call(
            "POST",
            "/v1/webhooks",
            Some(&e.key_a),
            Some(json!({ "url": "https://example.com/h" })),
        )
        .await;
    common::assert_error(
        s,
        &v,
        StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
        "webhooks",
    );
    // A name that resolves to a private address is refused at delivery (no POST made):
    // `localhost` resolves to loopback.
    let e = common::env().await;
    create_hook(&e, &e.key_a, "http://localhost:9/hook", None).await;
    e.create().await;
    let r = e.state.app().deliver_webhooks_once().await.unwrap();
    assert_eq!(r.failed, 1);
    let (_, list) = e.call("GET", "/v1/webhooks", Some(&e.key_a), None).await;
    assert!(
        list["webhooks"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("private"),
        "{list}"
    );
}

//! The extension point: a deployment's routes and workers on a real control plane
//! (real listener on loopback, real SQLite file, no host agent).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Json;
use hearth_control::http::error::ApiError;
use hearth_control::http::Caller;
use hearth_control::{AppState, ControlConfig, ControlError, Extensions};
use hearth_db::NewApiKey;
use serde_json::{json, Value};

async fn whoami(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    let sandboxes = s.app().db.list_sandboxes(caller.team_id).await?.len();
    Ok(Json(json!({
        "team_id": caller.team_id.to_string(),
        "key_id": caller.key_id.as_str(),
        "admin": caller.is_admin,
        "sandboxes": sandboxes,
    })))
}

fn config(dir: &tempfile::TempDir) -> ControlConfig {
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("db.sqlite").display()
    );
    ControlConfig::new("127.0.0.1:0".parse().unwrap(), url)
}

#[tokio::test]
async fn a_route_sees_the_caller_a_public_route_needs_no_key_and_a_worker_runs_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let passes = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let (p, e) = (passes.clone(), ended.clone());
    let ext = Extensions::new()
        .route("/v1/ext/whoami", get(whoami))
        .public_route("/ext/ping", get(|| async { "pong" }))
        .worker("counter", move |mut cx| async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = cx.stopped() => break,
                    _ = tick.tick() => {}
                }
                // A real read through the app, as a billing pass would make.
                if cx.app().db.list_teams().await.is_ok() {
                    p.fetch_add(1, Ordering::SeqCst);
                }
            }
            assert!(cx.is_stopping());
            e.fetch_add(1, Ordering::SeqCst);
        });
    let control = hearth_control::start_with(config(&dir), ext).await.unwrap();
    let base = format!("http://{}", control.local_addr());
    let admin = control.bootstrap_key().unwrap().to_owned();
    let db = &control.state().app().db;
    let other = db.create_team("other").await.unwrap();
    let (other_key, other_secret) = db
        .create_api_key(&NewApiKey::new(other.id, "k", false))
        .await
        .unwrap();
    let http = reqwest::Client::new();

    // Behind the API's auth: no key and a bad key are the API's 401.
    for key in [None, Some("hk_not-a-key")] {
        let mut req = http.get(format!("{base}/v1/ext/whoami"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthenticated", "{v}");
    }
    // With a key: the caller's own team and key, through either header.
    let v: Value = http
        .get(format!("{base}/v1/ext/whoami"))
        .header("x-api-key", &other_secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["team_id"], other.id.to_string(), "{v}");
    assert_eq!(v["key_id"], other_key.id.as_str());
    assert_eq!(v["admin"], false);
    assert_eq!(v["sandboxes"], 0);
    let v: Value = http
        .get(format!("{base}/v1/ext/whoami"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["admin"], true, "{v}");
    assert_ne!(v["team_id"], other.id.to_string());
    // A revoked key stops working on the extension route at once.
    db.revoke_api_key(&other_key.id).await.unwrap();
    let resp = http
        .get(format!("{base}/v1/ext/whoami"))
        .header("x-api-key", &other_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Public: no key needed.
    let resp = http.get(format!("{base}/ext/ping")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "pong");
    // Authenticated extension routes are counted like the API's own.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("/v1/ext/whoami"), "{metrics}");

    // The worker runs (bounded wait) and has ended once shutdown returns.
    for _ in 0..250 {
        if passes.load(Ordering::SeqCst) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        passes.load(Ordering::SeqCst) >= 2,
        "the worker made no passes"
    );
    assert_eq!(ended.load(Ordering::SeqCst), 0);
    control.shutdown().await;
    assert_eq!(
        ended.load(Ordering::SeqCst),
        1,
        "the worker was not stopped"
    );
}

#[tokio::test]
async fn a_route_that_overlaps_the_api_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ext = Extensions::new().route("/v1/sandboxes", get(|| async { "mine" }));
    match hearth_control::start_with(config(&dir), ext).await {
        Err(ControlError::Extension(msg)) => assert!(msg.contains("/v1/sandboxes"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("an overlapping route was accepted"),
    }
    // The same path with a method the API does not serve there is fine.
    let ext = Extensions::new().route("/v1/audit", axum::routing::post(|| async { "posted" }));
    let control = hearth_control::start_with(config(&dir), ext).await.unwrap();
    control.shutdown().await;
}

//! `GET /v1/events` through the real router: a team's events arrive live, only its
//! own; a reconnect with Last-Event-ID misses nothing; streams are capped per team.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{env, env_with, expect, Env};
use hearth_control::app::concurrency::StreamCaps;
use hearth_control::app::Policy;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

async fn open(e: &Env, key: &str, last_event_id: Option<&str>) -> axum::response::Response {
    let mut req = Request::get("/v1/events").header("authorization", format!("Bearer {key}"));
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    e.router
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

/// Read SSE events (id, event, data) until `want` of them came or 10 s passed.
async fn read(body: &mut Body, want: usize) -> Vec<(i64, String, Value)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < want {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("only {} of {want} events: {out:?}", out.len()))
            .expect("stream ended")
            .unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        text.push_str(std::str::from_utf8(&data).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let (mut id, mut event, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event: ").or(line.strip_prefix("event:"))
                {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                    data = serde_json::from_str(v).ok();
                }
            }
            if let (Some(id), Some(event), Some(data)) = (id, event, data) {
                out.push((id, event, data));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_team_gets_its_own_events_live_and_resumes_without_a_gap() {
    let e = env().await;
    let before = e.create().await; // before the stream: not sent without Last-Event-ID
    let resp = open(&e, &e.key_a, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let v = expect(
        StatusCode::CREATED,
        e.post(&e.key_b, "/v1/sandboxes", json!({"template": "minimal"}))
            .await,
    );
    let b_id = v["id"].as_str().unwrap().to_owned();
    let a_id = e.create().await;
    let (s, _) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{a_id}/pause"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let got = read(&mut body, 2).await;
    assert_eq!(got[0].1, "sandbox.create");
    assert_eq!(got[0].2["target"], json!(a_id));
    assert_eq!(got[1].1, "sandbox.pause");
    assert!(got[1].0 > got[0].0);
    let seen = format!("{got:?}");
    assert!(!seen.contains(&b_id) && !seen.contains(&before), "{seen}");
    drop(body);

    // Reconnect after the first: the pause again, then what came after.
    let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{a_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let resp = open(&e, &e.key_a, Some(&got[0].0.to_string())).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let again = read(&mut body, 2).await;
    assert_eq!(again[0].0, got[1].0);
    assert_eq!(again[1].1, "sandbox.delete");
    // From the start: everything of team a's, nothing of b's.
    let resp = open(&e, &e.key_a, Some("0")).await;
    let mut body = resp.into_body();
    let all = read(&mut body, 4).await;
    assert_eq!(all[0].2["target"], json!(before));
    assert!(!format!("{all:?}").contains(&b_id));
}

#[tokio::test]
async fn event_streams_are_capped_per_team_and_bad_ids_are_400() {
    let e = env_with(Policy {
        streams: StreamCaps {
            event_streams: 1,
            ..StreamCaps::default()
        },
        ..Policy::default()
    })
    .await;
    let first = open(&e, &e.key_a, None).await;
    assert_eq!(first.status(), StatusCode::OK);
    let second = open(&e, &e.key_a, None).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another team has its own slots; a closed stream gives its slot back.
    assert_eq!(open(&e, &e.key_b, None).await.status(), StatusCode::OK);
    drop(first);
    assert_eq!(open(&e, &e.key_a, None).await.status(), StatusCode::OK);
    for bad in ["x", "-1", "1.5", ""] {
        let r = open(&e, &e.key_b, Some(bad)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad:?}");
    }
    let (s, _) = e.get(&e.key_b, "/v1/events?after=-3").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = e.call("GET", "/v1/events", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

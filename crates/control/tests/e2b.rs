//! E2B's REST API beside `/v1`: the JSON field names and status codes E2B's SDKs
//! parse, its error shape for every failure (401 included), `base` -> `python`, the
//! lifecycle calls (pause, connect, resume, timeout, refreshes), listing filters and
//! pagination, logs, and team isolation. The host is the FakeHost.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use hearth_control::app::hosts::HostTemplate;
use serde_json::{json, Value};

/// A request the way E2B's SDKs send it: the key in `X-API-KEY`.
async fn e2b(
    e: &Env,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    e.send(req).await
}

fn assert_e2b_error(s: StatusCode, v: &Value, want: StatusCode, needle: &str) {
    assert_eq!(s, want, "{v}");
    assert_eq!(v["code"], want.as_u16(), "E2B's shape: {v}");
    let m = v["message"].as_str().unwrap_or_default();
    assert!(m.contains(needle), "{needle:?} not in {m:?}");
}

/// An env whose host also has the `python` platform template.
async fn env_with_python() -> Env {
    let e = env_with(hearth_control::app::Policy {
        e2b_domain: Some("localhost:7420".into()),
        ..Default::default()
    })
    .await;
    e.host.st().templates.insert(
        "python".parse().unwrap(),
        HostTemplate {
            name: "python".parse().unwrap(),
            allocated_bytes: 1,
            apparent_bytes: 1,
            has_memory: false,
            source_sandbox_id: None,
            vcpus: 0,
            memory_mb: 0,
            disk_size_mb: 0,
            in_use: 0,
        },
    );
    e.state.app().reconcile_once().await.unwrap();
    e
}

async fn create(e: &Env, body: Value) -> Value {
    let (s, v) = e2b(e, "POST", "/v2/sandboxes", Some(&e.key_a), Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

#[tokio::test]
async fn create_answers_what_the_sdk_reads() {
    let e = env_with_python().await;
    let v = create(
        &e,
        json!({"templateID": "base", "timeout": 120, "metadata": {"job": "x"},
               "envVars": {"A": "1"}, "autoPause": true, "autoResume": {"enabled": true}}),
    )
    .await;
    for field in [
        "sandboxID",
        "templateID",
        "clientID",
        "envdVersion",
        "envdAccessToken",
        "domain",
    ] {
        assert!(v[field].is_string(), "{field} missing: {v}");
    }
    assert_eq!(v["templateID"], "python");
    assert_eq!(v["alias"], "base");
    assert_eq!(v["envdVersion"], hearth_types::ENVD_VERSION);
    assert_eq!(v["domain"], "localhost:7420");
    let id = v["sandboxID"].as_str().unwrap();
    let token = e
        .state
        .app()
        .envd_access_token(&id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(v["envdAccessToken"], token.as_str());

    let (s, d) = e2b(&e, "GET", &format!("/sandboxes/{id}"), Some(&e.key_a), None).await;
    assert_eq!(s, StatusCode::OK, "{d}");
    assert_eq!(d["state"], "running");
    assert_eq!(d["metadata"]["job"], "x");
    assert_eq!(d["cpuCount"], 1);
    assert_eq!(d["lifecycle"]["onTimeout"], "pause");
    assert_eq!(d["lifecycle"]["autoResume"], true);
    for field in ["startedAt", "endAt", "envdAccessToken"] {
        assert!(d[field].is_string(), "{field}: {d}");
    }
    // The /v1 view of the same sandbox: env and on_timeout as asked.
    let (_, row) = e
        .call("GET", &format!("/v1/sandboxes/{id}"), Some(&e.key_a), None)
        .await;
    assert_eq!(row["on_timeout"], "pause", "{row}");
    assert_eq!(row["timeout_s"], 120, "{row}");

    // secure: false (v1 body) -> no token.
    let (s, v) = e2b(
        &e,
        "POST",
        "/sandboxes",
        Some(&e.key_a),
        Some(json!({"templateID": "minimal", "secure": false})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["envdAccessToken"].is_null(), "{v}");
}

#[tokio::test]
async fn bad_creates_get_e2b_errors_and_create_nothing() {
    let e = env_with_python().await;
    let k = Some(e.key_a.as_str());
    let cases = [
        (json!({}), StatusCode::BAD_REQUEST, "templateID"),
        (
            json!({"templateID": "nope"}),
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (json!({"templateID": "../x"}), StatusCode::BAD_REQUEST, ""),
        (
            json!({"templateID": "minimal", "timeout": -1}),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            json!({"templateID": "minimal", "timeout": 10_000_000}),
            StatusCode::BAD_REQUEST,
            "timeout",
        ),
        (
            json!({"templateID": "minimal", "allow_internet_access": true}),
            StatusCode::BAD_REQUEST,
            "egress",
        ),
        (
            json!({"templateID": "minimal", "network": {"allowOut": ["1.1.1.1"]}}),
            StatusCode::BAD_REQUEST,
            "network",
        ),
        (
            json!({"templateID": "minimal", "autoResume": "yes"}),
            StatusCode::BAD_REQUEST,
            "autoResume",
        ),
        (
            json!({"templateID": "minimal", "metadata": {"k": 1}}),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
    ];
    for (body, want, needle) in cases {
        let (s, v) = e2b(&e, "POST", "/v2/sandboxes", k, Some(body.clone())).await;
        assert_e2b_error(s, &v, want, needle);
    }
    let req = Request::builder()
        .method("POST")
        .uri("/v2/sandboxes")
        .header("x-api-key", &e.key_a)
        .body(Body::from("{not json"))
        .unwrap();
    let (s, v) = e.send(req).await;
    assert_e2b_error(s, &v, StatusCode::BAD_REQUEST, "JSON");
    assert_eq!(e.host.st().creates, 0);
    assert_eq!(e.row_count().await, 0);
}

#[tokio::test]
async fn bad_keys_unknown_paths_and_other_teams_in_e2b_shape() {
    let e = env().await;
    for key in [None, Some("hk_wrong"), Some("")] {
        let (s, v) = e2b(&e, "GET", "/v2/sandboxes", key, None).await;
        assert_e2b_error(s, &v, StatusCode::UNAUTHORIZED, "API key");
    }
    let (s, v) = e2b(&e, "GET", "/v3/templates/x/builds", Some(&e.key_a), None).await;
    assert_e2b_error(s, &v, StatusCode::NOT_FOUND, "not part of");
    let (s, v) = e2b(
        &e,
        "GET",
        "/sandboxes/sb-aaaaaaaaaaaaaaaa/metrics",
        Some(&e.key_a),
        None,
    )
    .await;
    assert_eq!(v["code"], s.as_u16(), "{v}");

    let id = create(&e, json!({"templateID": "minimal"})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    // Team b sees nothing of it: 404 like an unknown ID, not a 403.
    for (m, p) in [
        ("GET", format!("/sandboxes/{id}")),
        ("DELETE", format!("/sandboxes/{id}")),
        ("POST", format!("/sandboxes/{id}/pause")),
        ("POST", format!("/v2/sandboxes/{id}/connect")),
        ("GET", format!("/sandboxes/{id}/logs")),
        ("GET", format!("/sandboxes/{id}/metrics")),
    ] {
        let (s, v) = e2b(&e, m, &p, Some(&e.key_b), Some(json!({"timeout": 30}))).await;
        assert_e2b_error(s, &v, StatusCode::NOT_FOUND, "doesn't exist");
    }
    let (_, list) = e2b(&e, "GET", "/v2/sandboxes", Some(&e.key_b), None).await;
    assert_eq!(list, json!([]));
    let (s, v) = e2b(&e, "GET", "/sandboxes/not-an-id", Some(&e.key_a), None).await;
    assert_e2b_error(s, &v, StatusCode::NOT_FOUND, "doesn't exist");
}

#[tokio::test]
async fn pause_connect_resume_timeout_and_kill() {
    let e = env().await;
    let k = Some(e.key_a.as_str());
    let id = create(&e, json!({"templateID": "minimal", "timeout": 60})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    // connect to a running sandbox: 200, and the lifetime is only extended.
    let (s, v) = e2b(
        &e,
        "POST",
        &format!("/v2/sandboxes/{id}/connect"),
        k,
        Some(json!({"timeout": 10})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["envdAccessToken"].is_string());
    let (_, row) = e.call("GET", &format!("/v1/sandboxes/{id}"), k, None).await;
    assert_eq!(
        row["timeout_s"], 60,
        "a shorter connect timeout shortened it: {row}"
    );

    let (s, v) = e2b(
        &e,
        "POST",
        &format!("/sandboxes/{id}/timeout"),
        k,
        Some(json!({"timeout": 600})),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v) = e2b(
        &e,
        "POST",
        &format!("/sandboxes/{id}/refreshes"),
        k,
        Some(json!({"duration": 5000})),
    )
    .await;
    assert_e2b_error(s, &v, StatusCode::BAD_REQUEST, "duration");

    let (s, v) = e2b(&e, "POST", &format!("/sandboxes/{id}/pause"), k, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v) = e2b(&e, "POST", &format!("/sandboxes/{id}/pause"), k, None).await;
    assert_e2b_error(s, &v, StatusCode::CONFLICT, "already paused");
    let (_, d) = e2b(&e, "GET", &format!("/sandboxes/{id}"), k, None).await;
    assert_eq!(d["state"], "paused");
    let (_, paused) = e2b(&e, "GET", "/v2/sandboxes?state=paused", k, None).await;
    assert_eq!(paused.as_array().unwrap().len(), 1, "{paused}");

    // connect to a paused sandbox resumes it: 201.
    let (s, v) = e2b(
        &e,
        "POST",
        &format!("/sandboxes/{id}/connect"),
        k,
        Some(json!({"timeout": 300})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(e.host.st().resumes, 1);
    let (s, v) = e2b(
        &e,
        "POST",
        &format!("/sandboxes/{id}/resume"),
        k,
        Some(json!({"timeout": 300})),
    )
    .await;
    assert_e2b_error(s, &v, StatusCode::CONFLICT, "already running");

    let (s, v) = e2b(&e, "GET", &format!("/sandboxes/{id}/logs"), k, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["logs"].as_array().unwrap().len(), 2, "{v}");
    assert!(
        v["logs"][1]["line"].as_str().unwrap().contains("ready"),
        "{v}"
    );
    let (s, v) = e2b(
        &e,
        "GET",
        &format!("/v2/sandboxes/{id}/logs?limit=1"),
        k,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["logs"].as_array().unwrap().len(), 1, "{v}");

    let (s, v) = e2b(
        &e,
        "POST",
        &format!("/sandboxes/{id}/fork"),
        k,
        Some(json!({"count": 2})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    for r in v.as_array().unwrap() {
        assert!(
            r["sandbox"]["sandboxID"].is_string() && r["sandbox"]["envdAccessToken"].is_string(),
            "{r}"
        );
    }
    assert_eq!(e.host.st().forks, 1);

    let (s, _) = e2b(&e, "DELETE", &format!("/sandboxes/{id}"), k, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = e2b(&e, "DELETE", &format!("/sandboxes/{id}"), k, None).await;
    assert_e2b_error(s, &v, StatusCode::NOT_FOUND, "doesn't exist");
    let (s, v) = e2b(&e, "GET", &format!("/sandboxes/{id}"), k, None).await;
    assert_e2b_error(s, &v, StatusCode::NOT_FOUND, "doesn't exist");
}

#[tokio::test]
async fn list_filters_by_metadata_and_pages() {
    let e = env().await;
    let k = Some(e.key_a.as_str());
    for i in 0..5 {
        let team = if i % 2 == 0 { "red" } else { "blue" };
        create(
            &e,
            json!({"templateID": "minimal", "metadata": {"team": team, "n": i.to_string()}}),
        )
        .await;
    }
    let (s, v) = e2b(&e, "GET", "/v2/sandboxes?metadata=team%3Dred", k, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");
    let (_, v) = e2b(
        &e,
        "GET",
        "/v2/sandboxes?metadata=team%3Dred%26n%3D2",
        k,
        None,
    )
    .await;
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["metadata"]["n"], "2");
    let (_, v) = e2b(&e, "GET", "/sandboxes?metadata=team%3Dblue", k, None).await;
    assert_eq!(v.as_array().unwrap().len(), 2, "{v}");
    let (s, v) = e2b(&e, "GET", "/v2/sandboxes?metadata=garbage", k, None).await;
    assert_e2b_error(s, &v, StatusCode::BAD_REQUEST, "key=value");
    let (s, v) = e2b(&e, "GET", "/v2/sandboxes?state=stopped", k, None).await;
    assert_e2b_error(s, &v, StatusCode::BAD_REQUEST, "state");

    // Pages of 2: 2 + 2 + 1, every sandbox once.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..4 {
        let uri = match &token {
            Some(t) => format!("/v2/sandboxes?limit=2&nextToken={t}"),
            None => "/v2/sandboxes?limit=2".to_owned(),
        };
        let req = Request::builder()
            .uri(uri)
            .header("x-api-key", &e.key_a)
            .body(Body::empty())
            .unwrap();
        let resp = tower::ServiceExt::oneshot(e.router.clone(), req)
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-total-running"], "5");
        token = resp
            .headers()
            .get("x-next-token")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        let page: Value = serde_json::from_slice(&bytes).unwrap();
        for sb in page.as_array().unwrap() {
            seen.push(sb["sandboxID"].as_str().unwrap().to_owned());
        }
        if token.is_none() {
            break;
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5, "{seen:?}");
    let (s, v) = e2b(&e, "GET", "/v2/sandboxes?limit=0", k, None).await;
    assert_e2b_error(s, &v, StatusCode::BAD_REQUEST, "limit");
}

#[tokio::test]
async fn templates_list_the_base_alias() {
    let e = env_with_python().await;
    let (s, v) = e2b(&e, "GET", "/templates", Some(&e.key_a), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let python = v
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["templateID"] == "python")
        .unwrap_or_else(|| panic!("no python in {v}"));
    assert!(python["aliases"]
        .as_array()
        .unwrap()
        .contains(&json!("base")));
    assert_eq!(python["public"], true);
}

#[tokio::test]
async fn metrics_of_a_running_sandbox_and_none_of_a_paused_one() {
    let e = env().await;
    let k = Some(e.key_a.as_str());
    let id = create(&e, json!({"templateID": "minimal", "timeout": 60})).await["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let (s, v) = e2b(&e, "GET", &format!("/sandboxes/{id}/metrics"), k, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = &v.as_array().expect("a list of samples")[0];
    for field in [
        "timestamp",
        "timestampUnix",
        "cpuCount",
        "cpuUsedPct",
        "memUsed",
        "memTotal",
        "memCache",
        "diskUsed",
        "diskTotal",
    ] {
        assert!(!m[field].is_null(), "{field} missing: {m}");
    }
    assert_eq!(m["memTotal"], 256u64 << 20);
    assert_eq!(m["timestamp"], "2023-11-14T22:13:20.000Z");

    // A window that ended before now has no sample.
    let (s, v) = e2b(
        &e,
        "GET",
        &format!("/sandboxes/{id}/metrics?end=1000"),
        k,
        None,
    )
    .await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));
    // Bad query strings are 400s in E2B's shape.
    for (query, needle) in [
        ("metrics?start=5&end=4", "after"),
        ("metrics?start=soon", "start"),
        ("logs?limit=many", "limit"),
    ] {
        let (s, v) = e2b(&e, "GET", &format!("/sandboxes/{id}/{query}"), k, None).await;
        assert_e2b_error(s, &v, StatusCode::BAD_REQUEST, needle);
    }

    let path = format!("/sandboxes/metrics?sandbox_ids={id},sb-aaaaaaaaaaaaaaaa,{id}");
    let (s, v) = e2b(&e, "GET", &path, k, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["sandboxes"].as_object().unwrap().len(), 1, "{v}");
    assert_eq!(v["sandboxes"][&id]["cpuCount"], 1);
    // Team b's ask for it gets nothing, and no list at all is a 400.
    let (_, v) = e2b(&e, "GET", &path, Some(&e.key_b), None).await;
    assert_eq!(v, json!({"sandboxes": {}}));
    let (s, v) = e2b(&e, "GET", "/sandboxes/metrics", k, None).await;
    assert_e2b_error(s, &v, StatusCode::BAD_REQUEST, "sandbox_ids");

    let (s, _) = e2b(&e, "POST", &format!("/sandboxes/{id}/pause"), k, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = e2b(&e, "GET", &format!("/sandboxes/{id}/metrics"), k, None).await;
    assert_eq!((s, v), (StatusCode::OK, json!([])));
}

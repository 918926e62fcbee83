//! `GET /metrics` through the real router: Prometheus text with request counts and
//! latencies by route template, sandboxes by state and hosts, and nothing that names a
//! team, key or sandbox.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::env;
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn scrape(e: &common::Env) -> String {
    let resp = e
        .router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_sandboxes_by_state_and_name_no_tenant() {
    let e = env().await;
    let a = e.create().await;
    let b = e.create().await;
    let (s, _) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{a}/pause"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e.get("hk_wrong", "/v1/sandboxes").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = e.get(&e.key_a, "/v1/no/such/route").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let text = scrape(&e).await;
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let created = r#"hearth_http_requests_total{method="POST",route="/v1/sandboxes",status="201"}"#;
    assert_eq!(value(&text, created), Some(2.0), "{text}");
    let refused = r#"hearth_http_requests_total{method="GET",route="/v1/sandboxes",status="401"}"#;
    assert_eq!(value(&text, refused), Some(1.0), "{text}");
    let pause = r#"hearth_http_request_duration_seconds_count{method="POST",route="/v1/sandboxes/{id}/pause"}"#;
    assert_eq!(value(&text, pause), Some(1.0), "{text}");
    assert!(text.contains("hearth_http_request_duration_seconds_bucket{le="));
    assert_eq!(
        value(&text, r#"hearth_sandboxes{state="running"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"hearth_sandboxes{state="paused"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"hearth_sandboxes{state="error"}"#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(value(&text, "hearth_hosts_answering"), Some(1.0), "{text}");
    // Unmatched routes are not series; no ID, team or key is a label.
    assert!(!text.contains("no/such"), "{text}");
    for secret in [
        a.as_str(),
        b.as_str(),
        &e.team_a.to_string(),
        &e.key_a,
        "hk_wrong",
    ] {
        assert!(!text.contains(secret), "{secret} in the metrics");
    }

    // Deleting moves the gauge at the next scrape.
    let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{b}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let text = scrape(&e).await;
    assert_eq!(
        value(&text, r#"hearth_sandboxes{state="running"}"#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"hearth_sandboxes{state="stopped"}"#),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn metrics_time_lifecycle_operations_count_their_failures_and_show_host_capacity() {
    let e = env().await;
    let a = e.create().await;
    let (s, _) = e
        .call(
            "POST",
            &format!("/v1/sandboxes/{a}/pause"),
            Some(&e.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e
        .call(
            "POST",
            &format!("/v1/sandboxes/{a}/resume"),
            Some(&e.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    // Refusals by kind: no such template; a host refusing for capacity.
    let (s, _) = e
        .call(
            "POST",
            "/v1/sandboxes",
            Some(&e.key_a),
            Some(serde_json::json!({"template": "nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e
        .call(
            "POST",
            "/v1/sandboxes",
            Some(&e.key_a),
            Some(serde_json::json!({"template": "minimal", "memory_mb": 8192, "vcpus": 8})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    e.host.st().fail_create = Some(hearth_control::app::hosts::HostError::Rpc {
        code: connectrpc::ErrorCode::ResourceExhausted,
        message: "host memory: full".into(),
    });
    let (s, _) = e
        .call(
            "POST",
            "/v1/sandboxes",
            Some(&e.key_a),
            Some(serde_json::json!({"template": "minimal"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    e.state.app().reconcile_once().await.unwrap();

    let text = scrape(&e).await;
    let op =
        |s: &str, op: &str| format!("hearth_sandbox_operation_duration_seconds_{s}{{op=\"{op}\"}}");
    assert_eq!(value(&text, &op("count", "create")), Some(2.0), "{text}");
    assert_eq!(value(&text, &op("count", "pause")), Some(1.0), "{text}");
    assert_eq!(value(&text, &op("count", "resume")), Some(1.0), "{text}");
    assert!(
        text.contains(
            "hearth_sandbox_operation_duration_seconds_bucket{le=\"+Inf\",op=\"create\"} 2"
        ) || text.contains(
            "hearth_sandbox_operation_duration_seconds_bucket{op=\"create\",le=\"+Inf\"} 2"
        ),
        "{text}"
    );
    let err = |kind: &str| {
        format!("hearth_sandbox_operation_errors_total{{op=\"create\",kind=\"{kind}\"}}")
    };
    assert_eq!(value(&text, &err("not_found")), Some(1.0), "{text}");
    assert_eq!(value(&text, &err("capacity_exceeded")), Some(1.0), "{text}");
    // The fake host: 64 GiB, 64 vCPUs; two sandboxes (256 MiB + 8 GiB, 1 + 8 vCPUs).
    let host = e.host.host_id.clone().unwrap();
    let h = |name: &str| format!("hearth_{name}{{host_id=\"{host}\"}}");
    assert_eq!(
        value(&text, &h("host_memory_capacity_bytes")),
        Some(65536.0 * 1048576.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &h("host_memory_used_bytes")),
        Some((8192.0 + 256.0) * 1048576.0),
        "{text}"
    );
    assert_eq!(value(&text, &h("host_vcpus_used")), Some(9.0), "{text}");
    assert_eq!(
        value(&text, &h("host_sandbox_slots_used")),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &h("host_placements_in_flight")),
        Some(0.0),
        "{text}"
    );
    for secret in [a.as_str(), &e.team_a.to_string(), &e.key_a] {
        assert!(!text.contains(secret), "{secret} in the metrics");
    }
}

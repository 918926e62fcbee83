//! The sandbox proxy in front of the API: which requests it takes (E2B's headers, a
//! `<port>-<id>.<domain>` host name), who may pass (the envd access token on the guest
//! agent's port of a secure sandbox), what reaches the sandbox (no API key, no
//! caller's token), auto-resume, and E2B's error shape when it refuses. The host is
//! the FakeHost, which echoes what it was sent.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use hearth_control::app::sandboxes::CreateParams;
use hearth_types::SandboxId;
use serde_json::Value;

fn to_sandbox(id: &str, port: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::builder()
        .method("POST")
        .uri("/filesystem.Filesystem/Stat?x=1")
        .header("e2b-sandbox-id", id)
        .header("e2b-sandbox-port", port)
        .header("x-api-key", "sk-must-not-leak")
        .header("content-type", "application/json");
    if let Some(t) = token {
        b = b.header("x-access-token", t);
    }
    b.body(Body::from(r#"{"path":"/tmp"}"#)).unwrap()
}

async fn token(e: &Env, id: &str) -> String {
    let id: SandboxId = id.parse().unwrap();
    e.state.app().envd_access_token(&id).await.unwrap()
}

#[tokio::test]
async fn the_guest_agent_port_needs_the_sandboxs_own_token() {
    let e = env().await;
    let a = e.create().await;
    let b = e.create().await;
    let ta = token(&e, &a).await;
    let tb = token(&e, &b).await;

    let v = expect(
        StatusCode::OK,
        e.send(to_sandbox(&a, "49983", Some(&ta))).await,
    );
    assert_eq!(v["port"], 49983);
    assert_eq!(v["path"], "/filesystem.Filesystem/Stat?x=1");
    assert_eq!(v["body"], r#"{"path":"/tmp"}"#);
    let headers = v["headers"].as_object().unwrap();
    for gone in [
        "x-api-key",
        "x-access-token",
        "e2b-sandbox-id",
        "e2b-sandbox-port",
    ] {
        assert!(
            !headers.contains_key(gone),
            "{gone} reached the sandbox: {v}"
        );
    }
    assert_eq!(headers["content-type"], "application/json");

    for bad in [None, Some(tb.as_str()), Some("not-a-token"), Some("")] {
        let (s, v) = e.send(to_sandbox(&a, "49983", bad)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad:?}: {v}");
        assert_eq!(v["code"], 401);
        assert!(
            v["message"].as_str().unwrap().contains("X-Access-Token"),
            "{v}"
        );
    }
    assert_eq!(e.host.st().creates, 2);
}

#[tokio::test]
async fn other_ports_by_host_name_are_public_and_get_no_token() {
    let e = env().await;
    let a = e.create().await;
    let req = Request::builder()
        .uri("/index.html")
        .header("host", format!("8000-{a}.localhost:7420"))
        .header("x-access-token", token(&e, &a).await)
        .body(Body::empty())
        .unwrap();
    let v = expect(StatusCode::OK, e.send(req).await);
    assert_eq!(v["port"], 8000);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/index.html");
    let headers = v["headers"].as_object().unwrap();
    assert!(!headers.contains_key("x-access-token"), "{v}");
    assert_eq!(
        headers["x-forwarded-host"],
        format!("8000-{a}.localhost:7420")
    );
}

#[tokio::test]
async fn unknown_and_destroyed_sandboxes_are_not_found_in_e2b_words() {
    let e = env().await;
    let ghost = SandboxId::generate().to_string();
    let v = expect(
        StatusCode::BAD_GATEWAY,
        e.send(to_sandbox(&ghost, "49983", Some("x"))).await,
    );
    assert!(
        v["message"].as_str().unwrap().contains("was not found"),
        "{v}"
    );
    assert_eq!(v["sandboxId"], ghost.as_str());

    let a = e.create().await;
    let t = token(&e, &a).await;
    let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{a}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let v = expect(
        StatusCode::BAD_GATEWAY,
        e.send(to_sandbox(&a, "49983", Some(&t))).await,
    );
    assert!(
        v["message"].as_str().unwrap().contains("was not found"),
        "{v}"
    );
}

#[tokio::test]
async fn malformed_addresses_are_400_and_api_requests_pass() {
    let e = env().await;
    expect(
        StatusCode::BAD_REQUEST,
        e.send(to_sandbox("../../etc", "49983", None)).await,
    );
    let a = e.create().await;
    expect(
        StatusCode::BAD_REQUEST,
        e.send(to_sandbox(&a, "0", None)).await,
    );
    // The API still answers on its own host name.
    let req = Request::builder()
        .uri("/v1/sandboxes")
        .header("host", "127.0.0.1:7420")
        .header("authorization", format!("Bearer {}", e.key_a))
        .body(Body::empty())
        .unwrap();
    expect(StatusCode::OK, e.send(req).await);
}

#[tokio::test]
async fn a_paused_sandbox_is_resumed_by_traffic_only_with_auto_resume() {
    let e = env().await;
    let app = e.state.app().clone();
    let mk = |auto_resume: bool| {
        let app: Arc<_> = app.clone();
        let team = e.team_a;
        async move {
            app.create_sandbox(
                team,
                CreateParams {
                    template: "minimal".into(),
                    auto_resume,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .id
        }
    };
    let plain = mk(false).await;
    let auto = mk(true).await;
    for id in [&plain, &auto] {
        expect(
            StatusCode::OK,
            e.post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
                .await,
        );
    }
    let t = token(&e, plain.as_str()).await;
    let v = expect(
        StatusCode::BAD_GATEWAY,
        e.send(to_sandbox(plain.as_str(), "49983", Some(&t))).await,
    );
    assert!(v["message"].as_str().unwrap().contains("paused"), "{v}");
    assert_eq!(e.host.st().resumes, 0);

    let t = token(&e, auto.as_str()).await;
    expect(
        StatusCode::OK,
        e.send(to_sandbox(auto.as_str(), "49983", Some(&t))).await,
    );
    assert_eq!(e.host.st().resumes, 1);
    let (_, row) = e.get(&e.key_a, &format!("/v1/sandboxes/{auto}")).await;
    assert_eq!(row["state"], "running", "{row}");
    // A wrong token never resumes anything.
    let (s, _) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{auto}/pause"))
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e
        .send(to_sandbox(auto.as_str(), "49983", Some("forged")))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e.host.st().resumes, 1);
}

#[tokio::test]
async fn an_insecure_sandbox_opens_its_agent_port_without_a_token() {
    let e = env().await;
    let id = e
        .state
        .app()
        .create_sandbox(
            e.team_a,
            CreateParams {
                template: "minimal".into(),
                secure: Some(false),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id;
    let (s, v): (StatusCode, Value) = e.send(to_sandbox(id.as_str(), "49983", None)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

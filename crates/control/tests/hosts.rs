//! Enrolled hosts through the real router over an in-memory database: the admin API,
//! enrollment with one-time tokens, heartbeats that mark a silent host unreachable,
//! and the reconciler that marks its sandboxes lost only after the grace time.
//! (Real agents over mutual TLS: crates/cli/tests/multihost.rs.)

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{assert_error, env, env_with, Env};
use hearth_control::app::Policy;
use hearth_db::{HostStatus, SandboxState};
use hearth_types::HostId;
use serde_json::{json, Value};

async fn create_host(e: &Env, name: &str, url: &str) -> (String, String) {
    let (s, v) = e
        .call(
            "POST",
            "/v1/admin/hosts",
            Some(&e.key_admin),
            Some(json!({"name": name, "url": url})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (
        v["host"]["id"].as_str().unwrap().to_owned(),
        v["enrollment_token"].as_str().unwrap().to_owned(),
    )
}

async fn enroll(e: &Env, token: &str) -> (StatusCode, Value) {
    let key = hearth_pki::HostKey::generate().unwrap();
    e.call(
        "POST",
        "/v1/hosts/enroll",
        None,
        Some(json!({"token": token, "csr": key.csr_pem})),
    )
    .await
}

#[tokio::test]
async fn an_admin_creates_a_host_and_its_agent_enrolls_once() {
    let e = env().await;
    let (id, token) = create_host(&e, "h1", "https://10.0.0.2:7421").await;
    assert!(id.starts_with("host-"), "{id}");
    assert!(token.starts_with("hearth_enroll_"), "{token}");
    let (s, v) = e
        .call(
            "GET",
            &format!("/v1/admin/hosts/{id}"),
            Some(&e.key_admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "pending");
    assert!(v["enroll_expires_at"].is_string(), "{v}");
    // The token is stored as a hash only.
    assert!(!v.to_string().contains(&token));

    let (s, v) = enroll(&e, &token).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["host_id"], json!(id));
    assert!(v["certificate"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(v["ca_certificate"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let pin = hearth_pki::cert_fingerprint_pem(v["certificate"].as_str().unwrap()).unwrap();

    // Used once: the same token again, and any other, are refused.
    let (s, v) = enroll(&e, &token).await;
    assert_error(
        s,
        &v,
        StatusCode::FORBIDDEN,
        "forbidden",
        "enrollment token",
    );
    let (s, v) = enroll(&e, "hearth_enroll_guessed").await;
    assert_error(
        s,
        &v,
        StatusCode::FORBIDDEN,
        "forbidden",
        "enrollment token",
    );

    let (s, v) = e
        .call("GET", "/v1/admin/hosts", Some(&e.key_admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let h = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == json!(id))
        .unwrap()
        .clone();
    assert_eq!(h["status"], "active");
    assert_eq!(h["cert_fingerprint"], json!(pin));
    assert!(h["enrolled_at"].is_string());

    // Audit: create by the admin's key (the token never recorded).
    let entries = e
        .state
        .app()
        .db
        .list_audit(e.team_a, None, 50)
        .await
        .unwrap();
    assert!(entries
        .iter()
        .any(|a| a.action == "host.create" && a.target == id));
    assert!(!format!("{entries:?}").contains(&token));
}

#[tokio::test]
async fn drain_undrain_and_revoke() {
    let e = env().await;
    let (id, token) = create_host(&e, "h1", "https://10.0.0.2:7421").await;
    assert_eq!(enroll(&e, &token).await.0, StatusCode::OK);
    let path = format!("/v1/admin/hosts/{id}");
    let (s, v) = e
        .call("POST", &format!("{path}/drain"), Some(&e.key_admin), None)
        .await;
    assert_eq!(
        (s, v["status"].clone()),
        (StatusCode::OK, json!("draining")),
        "{v}"
    );
    let (s, v) = e
        .call("POST", &format!("{path}/undrain"), Some(&e.key_admin), None)
        .await;
    assert_eq!(
        (s, v["status"].clone()),
        (StatusCode::OK, json!("active")),
        "{v}"
    );
    let (s, v) = e.call("DELETE", &path, Some(&e.key_admin), None).await;
    assert_eq!(
        (s, v["status"].clone()),
        (StatusCode::OK, json!("revoked")),
        "{v}"
    );
    let (s, v) = e.call("DELETE", &path, Some(&e.key_admin), None).await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "already revoked");
    let (s, v) = e
        .call("POST", &format!("{path}/undrain"), Some(&e.key_admin), None)
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "revoked");
    let entries = e
        .state
        .app()
        .db
        .list_audit(e.team_a, None, 50)
        .await
        .unwrap();
    for a in ["host.drain", "host.undrain", "host.revoke"] {
        assert!(
            entries.iter().any(|x| x.action == a && x.target == id),
            "{a}"
        );
    }
}

#[tokio::test]
async fn a_revoked_hosts_unused_token_is_refused() {
    let e = env().await;
    let (id, token) = create_host(&e, "h1", "https://10.0.0.2:7421").await;
    let (s, _) = e
        .call(
            "DELETE",
            &format!("/v1/admin/hosts/{id}"),
            Some(&e.key_admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = enroll(&e, &token).await;
    assert_error(
        s,
        &v,
        StatusCode::FORBIDDEN,
        "forbidden",
        "enrollment token",
    );
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let e = env_with(Policy {
        enroll_token_ttl: Duration::from_millis(1),
        ..Policy::default()
    })
    .await;
    let (_, token) = create_host(&e, "h1", "https://10.0.0.2:7421").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (s, v) = enroll(&e, &token).await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden", "expired");
}

#[tokio::test]
async fn a_non_admin_gets_403_on_every_host_endpoint_and_changes_nothing() {
    let e = env().await;
    let (id, _) = create_host(&e, "h1", "https://10.0.0.2:7421").await;
    let before = e.state.app().db.list_hosts().await.unwrap();
    for (method, path, body) in [
        ("GET", "/v1/admin/hosts".to_owned(), None),
        (
            "POST",
            "/v1/admin/hosts".to_owned(),
            Some(json!({"name": "h2", "url": "https://10.0.0.3:7421"})),
        ),
        ("GET", format!("/v1/admin/hosts/{id}"), None),
        ("POST", format!("/v1/admin/hosts/{id}/drain"), None),
        ("POST", format!("/v1/admin/hosts/{id}/undrain"), None),
        ("DELETE", format!("/v1/admin/hosts/{id}"), None),
        // Not even a malformed ID gets past the admin check.
        ("GET", "/v1/admin/hosts/bad".to_owned(), None),
    ] {
        let (s, v) = e.call(method, &path, Some(&e.key_b), body).await;
        assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden", "admin");
        assert!(!v.to_string().contains("h1"), "{method} {path}: {v}");
    }
    assert_eq!(e.state.app().db.list_hosts().await.unwrap(), before);
}

#[tokio::test]
async fn bad_input_is_a_4xx_and_changes_nothing() {
    let e = env().await;
    let before = e.state.app().db.list_hosts().await.unwrap();
    let long = "a".repeat(64);
    for body in [
        json!({"name": "UPPER", "url": "https://h:1"}),
        json!({"name": "../x", "url": "https://h:1"}),
        json!({"name": long, "url": "https://h:1"}),
        json!({"name": "ok", "url": "http://h:1"}),
        json!({"name": "ok", "url": "https://h"}),
        json!({"name": "ok", "url": "https://h:1/path"}),
        json!({"name": "ok", "url": "https://user@h:1"}),
        json!({"name": "ok"}),
        json!({"name": "ok", "url": "https://h:1", "extra": 1}),
        json!({"name": 5, "url": "https://h:1"}),
    ] {
        let (s, v) = e
            .call(
                "POST",
                "/v1/admin/hosts",
                Some(&e.key_admin),
                Some(body.clone()),
            )
            .await;
        assert!(s.is_client_error(), "{body}: {s} {v}");
    }
    assert_eq!(e.state.app().db.list_hosts().await.unwrap(), before);
    create_host(&e, "dup", "https://h:1").await;
    let (s, v) = e
        .call(
            "POST",
            "/v1/admin/hosts",
            Some(&e.key_admin),
            Some(json!({"name": "dup", "url": "https://h:2"})),
        )
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "dup");
    for (method, path) in [
        ("GET", "/v1/admin/hosts/nope"),
        ("DELETE", "/v1/admin/hosts/sb-0000000000000000"),
    ] {
        let (s, v) = e.call(method, path, Some(&e.key_admin), None).await;
        assert_error(
            s,
            &v,
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "host ID",
        );
    }
    let (s, v) = e
        .call(
            "GET",
            &format!("/v1/admin/hosts/{}", HostId::generate()),
            Some(&e.key_admin),
            None,
        )
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "not found");
    // Enrollment: a garbage CSR uses nothing up.
    let (_, token) = create_host(&e, "h9", "https://h:9").await;
    let (s, v) = e
        .call(
            "POST",
            "/v1/hosts/enroll",
            None,
            Some(json!({"token": token, "csr": "not a csr"})),
        )
        .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", "csr");
    let (s, v) = e
        .call(
            "POST",
            "/v1/hosts/enroll",
            None,
            Some(json!({"token": token, "csr": "x".repeat(20_000)})),
        )
        .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", "csr");
    assert_eq!(enroll(&e, &token).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_silent_host_goes_unreachable_then_its_sandboxes_are_lost_after_the_grace() {
    let e = env_with(Policy {
        host_unreachable_after: Duration::ZERO,
        host_lost_after: Duration::from_millis(300),
        ..Policy::default()
    })
    .await;
    // Nothing listens on port 1: every heartbeat fails at once.
    let (id, token) = create_host(&e, "h1", "https://127.0.0.1:1").await;
    assert_eq!(enroll(&e, &token).await.0, StatusCode::OK);
    let host: HostId = id.parse().unwrap();
    let app = e.state.app();
    // A running sandbox of team a placed on that host.
    let sb = hearth_types::SandboxId::generate();
    let now = chrono::Utc::now();
    app.db
        .insert_sandbox(&hearth_db::NewSandbox {
            id: sb.clone(),
            team_id: e.team_a,
            template: "minimal".parse().unwrap(),
            state: SandboxState::Starting,
            vcpus: 1,
            memory_mb: 256,
            disk_size_mb: 1024,
            timeout_s: 300,
            on_timeout: hearth_db::OnTimeout::Destroy,
            env: Default::default(),
            metadata: Default::default(),
            host_id: Some(host.clone()),
            created_at: now,
            expires_at: now + chrono::Duration::seconds(300),
            secure: true,
            auto_resume: false,
        })
        .await
        .unwrap();
    assert!(app
        .db
        .mark_sandbox_running(&sb, now + chrono::Duration::seconds(300))
        .await
        .unwrap());

    app.heartbeat_once().await.unwrap();
    assert!(
        app.hosts.enrolled(&host).is_some(),
        "registered from the database"
    );
    let h = app.db.get_host(&host).await.unwrap().unwrap();
    assert_eq!(h.status, HostStatus::Unreachable);
    // Not schedulable, and its sandbox not lost yet.
    assert!(!app
        .hosts
        .entries()
        .iter()
        .any(|x| x.enrolled.is_some() && x.schedulable()));
    app.reconcile_once().await.unwrap();
    let row = app.db.get_sandbox(e.team_a, &sb).await.unwrap().unwrap();
    assert_eq!(row.state, SandboxState::Running);

    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = app.reconcile_once().await.unwrap();
    assert_eq!(r.lost, vec![sb.clone()]);
    let row = app.db.get_sandbox(e.team_a, &sb).await.unwrap().unwrap();
    assert_eq!(row.state, SandboxState::Error);
    assert!(row.error.unwrap().contains("stopped answering"));
}

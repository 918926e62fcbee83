//! [`AgentHostClient`] against hostile far sides on loopback: an agent (or the guest
//! behind its proxy) that answers with redirects, endless bodies or control
//! characters. What a user would notice: a clear error, nothing sent to the redirect
//! target (so the agent token stays with the agent), bounded messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Response, StatusCode};
use futures::StreamExt;
use hearth_types::SandboxId;

use super::*;

/// A listener that only counts connections: the redirect target.
async fn target() -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    (format!("http://{addr}"), hits)
}

/// A fake agent that answers every request with `answer()`.
async fn agent(answer: fn(&str) -> Response<Body>, arg: String) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || {
        let arg = arg.clone();
        async move { answer(&arg) }
    });
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    format!("http://{addr}")
}

fn redirect(to: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, format!("{to}/steal"))
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn redirects_are_errors_and_nothing_reaches_their_target() {
    let (to, hits) = target().await;
    let url = agent(redirect, to).await;
    let c = AgentHostClient::new(&url, Some("secret-token")).unwrap();
    let id = SandboxId::generate();

    // The target never answers: a followed redirect would hang the call, hence the bound.
    let bound = Duration::from_secs(20);
    let e = tokio::time::timeout(bound, c.download_file(&id, "root", "/etc/passwd"))
        .await
        .expect("no redirect followed")
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("the guest agent answered 302"),
        "{e}"
    );
    let body = futures::stream::iter([Ok(Bytes::from_static(b"x"))]).boxed();
    let e = tokio::time::timeout(bound, c.upload_file(&id, "root", "/tmp/x", body))
        .await
        .expect("no redirect followed")
        .unwrap_err();
    assert!(e.to_string().contains("answered 302"), "{e}");
    let spec = ProcSpec {
        cmd: "true".into(),
        args: vec![],
        env: Default::default(),
        cwd: None,
        user: "root".into(),
        stdin: false,
        pty: None,
        deadline: Duration::from_secs(5),
    };
    let started = c.start_process(&id, spec).await;
    if let Ok(mut events) = started {
        assert!(matches!(events.next().await, Some(Err(_)) | None));
    }
    assert!(c.info().await.is_err());
    assert!(c.destroy_sandbox(&id).await.is_err());

    // A followed redirect would have connected before its call returned.
    assert_eq!(hits.load(Ordering::SeqCst), 0, "a redirect was followed");
}

fn endless_error(_: &str) -> Response<Body> {
    let chunk = Bytes::from(vec![b'A'; 64 * 1024]);
    let body = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
    Response::builder()
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .body(Body::from_stream(body))
        .unwrap()
}

#[tokio::test]
async fn an_endless_error_body_is_read_only_up_to_its_bound() {
    let url = agent(endless_error, String::new()).await;
    let c = AgentHostClient::new(&url, None).unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        c.download_file(&SandboxId::generate(), "root", "/x"),
    )
    .await
    .expect("bounded read returns")
    .err()
    .unwrap();
    let HostError::Http { status, message } = e else {
        panic!("{e:?}")
    };
    assert_eq!(status, 500);
    assert!(message.chars().count() <= MAX_MESSAGE_CHARS + 1);
}

fn nasty_error(_: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(
            "{\"message\":\"no such file\\n\\u001b[31mFAKE LOG LINE\"}",
        ))
        .unwrap()
}

#[tokio::test]
async fn guest_text_in_errors_is_escaped() {
    let url = agent(nasty_error, String::new()).await;
    let c = AgentHostClient::new(&url, None).unwrap();
    let e = c
        .download_file(&SandboxId::generate(), "root", "/x")
        .await
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    assert!(msg.contains("no such file\\n\\u{1b}[31mFAKE"), "{msg}");
    assert!(e.is_not_found());
}

#[test]
fn sanitize_escapes_and_cuts() {
    assert_eq!(sanitize("a\tb\r\n"), "a\\tb\\r\\n");
    let long = "é".repeat(MAX_MESSAGE_CHARS + 10);
    let s = sanitize(&long);
    assert_eq!(s.chars().count(), MAX_MESSAGE_CHARS + 1);
    assert!(s.ends_with('…'));
}

#[test]
fn guest_metrics_are_checked_not_trusted() {
    let good = r#"{"ts":1700000000,"cpu_count":2,"cpu_used_pct":12.5,"mem_total":268435456,
        "mem_used":20000000,"mem_cache":1000,"disk_used":100,"disk_total":1000,"extra":1}"#;
    let m = SandboxMetrics::from_guest(good).unwrap();
    assert_eq!(m.cpu_count, 2);
    assert_eq!(m.mem_total, 268_435_456);
    assert_eq!(m.cpu_used_pct, 12.5);
    let mut base: serde_json::Value = serde_json::from_str(good).unwrap();
    for (field, value) in [
        ("cpu_used_pct", serde_json::json!(101.0)),
        ("cpu_used_pct", serde_json::json!(-1)),
        ("cpu_used_pct", serde_json::json!("12")),
        ("mem_used", serde_json::json!(-5)),
        ("mem_used", serde_json::json!(268435457u64)),
        ("disk_used", serde_json::json!(1001)),
        ("cpu_count", serde_json::json!(1u64 << 40)),
        ("ts", serde_json::json!(-1)),
        ("disk_total", serde_json::Value::Null),
        ("mem_cache", serde_json::json!("lots")),
    ] {
        let saved = base[field].clone();
        base[field] = value.clone();
        let err = SandboxMetrics::from_guest(&base.to_string()).unwrap_err();
        assert!(
            err.to_string().contains("invalid"),
            "{field}={value}: {err}"
        );
        base[field] = saved;
    }
    // An older guest without a cache figure is still read.
    base.as_object_mut().unwrap().remove("mem_cache");
    assert_eq!(
        SandboxMetrics::from_guest(&base.to_string())
            .unwrap()
            .mem_cache,
        0
    );
    assert!(SandboxMetrics::from_guest("<html>").is_err());
    assert!(SandboxMetrics::from_guest("").is_err());
}

//! Every error the HTTP edge can produce is `{"error":{"code","message"}}` with the
//! right status and code, including axum's own rejections (bad query strings, path
//! segments, methods, content types, sizes) that are plain text or empty by default.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use hearth_control::{bootstrap, router, App, AppState};
use hearth_db::Db;
use hearth_types::SandboxLimits;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

async fn app() -> (axum::Router, String) {
    let db = Db::connect("sqlite::memory:").await.unwrap();
    let key = bootstrap(&db)
        .await
        .unwrap()
        .expect("first start makes a key");
    let state = AppState::new(App::new(db, Vec::new(), SandboxLimits::default(), 1 << 20));
    (router(state), key)
}

/// Send `req` and return status, headers and the JSON error body (panics when the body
/// is not the error shape).
async fn error_of(
    app: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, String, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "{status}: not JSON: {:?}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).expect("JSON body");
    let code = v["error"]["code"].as_str().expect("error.code").to_string();
    let message = v["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_string();
    assert!(!message.is_empty(), "{status} {code}: empty message");
    (status, headers, code, message)
}

fn req(method: &str, uri: &str, key: &str) -> axum::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
}

#[tokio::test]
async fn rejections_are_json_with_the_right_status_and_code() {
    let (app, key) = app().await;
    let long_id = format!("/v1/sandboxes/sb-{}", "a".repeat(300));
    let cases: Vec<(Request<Body>, u16, &str)> = vec![
        (
            req("GET", "/v1/nope", &key).body(Body::empty()).unwrap(),
            404,
            "not_found",
        ),
        (
            req("PATCH", "/v1/sandboxes", &key)
                .body(Body::empty())
                .unwrap(),
            405,
            "method_not_allowed",
        ),
        (
            req("POST", "/v1/sandboxes", &key)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(r#"{"template":"minimal"}"#))
                .unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            req("POST", "/v1/sandboxes", &key)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{not json"))
                .unwrap(),
            400,
            "invalid_argument",
        ),
        (
            req("POST", "/v1/sandboxes", &key)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(format!(
                    r#"{{"template":"{}"}}"#,
                    "x".repeat(2 << 20)
                )))
                .unwrap(),
            413,
            "payload_too_large",
        ),
        (
            req("GET", "/v1/sandboxes/sb-aaaaaaaaaaaaaaaa/files", &key)
                .body(Body::empty())
                .unwrap(),
            400,
            "invalid_argument",
        ),
        (
            req(
                "GET",
                "/v1/sandboxes/sb-aaaaaaaaaaaaaaaa/files?user=%FF",
                &key,
            )
            .body(Body::empty())
            .unwrap(),
            400,
            "invalid_argument",
        ),
        (
            req("GET", &long_id, &key).body(Body::empty()).unwrap(),
            400,
            "invalid_argument",
        ),
        (
            req("GET", "/v1/sandboxes/%FF%FE", &key)
                .body(Body::empty())
                .unwrap(),
            400,
            "invalid_argument",
        ),
        (
            req(
                "GET",
                &format!("/v1/sandboxes?next_token={}", "a".repeat(9000)),
                &key,
            )
            .body(Body::empty())
            .unwrap(),
            414,
            "uri_too_long",
        ),
        (
            req("GET", "/v1/templates", &key)
                .header("x-big", "b".repeat(40 * 1024))
                .body(Body::empty())
                .unwrap(),
            431,
            "headers_too_large",
        ),
        (
            Request::builder()
                .uri("/v1/templates")
                .body(Body::empty())
                .unwrap(),
            401,
            "unauthenticated",
        ),
    ];
    for (request, status, code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let what: String = what.chars().take(120).collect();
        let (got, headers, got_code, message) = error_of(&app, request).await;
        assert_eq!(got.as_u16(), status, "{what}: {got_code} {message}");
        assert_eq!(got_code, code, "{what}: {message}");
        if status == 405 {
            assert!(headers.contains_key(header::ALLOW), "{what}: no Allow");
        }
        if status == 415 {
            assert!(
                message.contains("application/json"),
                "{what}: the 415 should say what to send: {message}"
            );
        }
    }
}

#[tokio::test]
async fn websocket_exec_without_an_upgrade_is_a_json_error() {
    let (app, key) = app().await;
    let (status, _, code, _) = error_of(
        &app,
        req("GET", "/v1/sandboxes/sb-aaaaaaaaaaaaaaaa/exec/ws", &key)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(status.is_client_error(), "{status}");
    assert_ne!(code, "internal");
}

#[tokio::test]
async fn json_body_without_content_type_is_parsed() {
    let (app, key) = app().await;
    // No content type at all: taken as JSON. No host is registered, so the create
    // itself fails, but not for the body.
    let (status, _, code, message) = error_of(
        &app,
        req("POST", "/v1/sandboxes", &key)
            .body(Body::from(r#"{"template":"minimal"}"#))
            .unwrap(),
    )
    .await;
    assert_ne!(status.as_u16(), 415, "{code} {message}");
    assert_ne!(status.as_u16(), 400, "{code} {message}");
}

#[tokio::test]
async fn whole_floats_are_integers_and_fractions_are_refused() {
    let (app, key) = app().await;
    let create = |body: &'static str| {
        req("POST", "/v1/sandboxes", &key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    // 9.0 parses as 9, so the range check answers (and quotes it); 1.5 is not a count.
    let (status, _, code, message) =
        error_of(&app, create(r#"{"template":"minimal","vcpus":9.0}"#)).await;
    assert_eq!((status.as_u16(), code.as_str()), (400, "invalid_argument"));
    assert!(
        message.contains("vcpus must be between 1 and 8, got 9"),
        "{message}"
    );
    let (status, _, _, message) =
        error_of(&app, create(r#"{"template":"minimal","vcpus":1.5}"#)).await;
    assert_eq!(status.as_u16(), 400);
    assert!(message.contains("whole number"), "{message}");
    let (status, _, _, message) =
        error_of(&app, create(r#"{"template":"minimal","memory_mb":1e300}"#)).await;
    assert_eq!(status.as_u16(), 400);
    assert!(message.contains("whole number"), "{message}");
}

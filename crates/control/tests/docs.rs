//! `GET /openapi.json` and `GET /docs`: served without a key, the page lists every
//! operation of the document and loads nothing from anywhere.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

async fn get(env: &common::Env, uri: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let req = Request::get(uri).body(Body::empty()).unwrap();
    let resp = env.router.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

#[tokio::test]
async fn the_document_is_served_at_both_paths_without_a_key() {
    let env = common::env().await;
    let (s1, _, a) = get(&env, "/openapi.json").await;
    let (s2, _, b) = get(&env, "/v1/openapi.json").await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    let a: Value = serde_json::from_str(&a).unwrap();
    let b: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(a, b);
    assert_eq!(a, hearth_control::http::openapi::document());
}

#[tokio::test]
async fn the_docs_page_has_every_operation_and_loads_nothing() {
    let env = common::env().await;
    let (status, headers, page) = get(&env, "/docs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");

    let doc = hearth_control::http::openapi::document();
    let mut ops = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            ops += 1;
            let id = op["operationId"].as_str().unwrap();
            assert!(
                page.contains(&format!("id=\"op-{id}\"")),
                "no section for {id}"
            );
            let heading = format!(
                "<span class=\"m {method}\">{}</span> <code>{}</code>",
                method.to_uppercase(),
                path.replace('&', "&amp;")
            );
            assert!(page.contains(&heading), "no heading {heading}");
            let summary = op["summary"]
                .as_str()
                .expect("every operation has a summary");
            let summary = summary.replace('\'', "&#39;");
            assert!(page.contains(&summary), "no summary of {id}");
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = format!("<code>{}</code>", p["name"].as_str().unwrap());
                assert!(page.contains(&name), "{id}: no parameter {name}");
            }
        }
    }
    assert!(ops >= 29, "only {ops} operations");
    for schema in doc["components"]["schemas"].as_object().unwrap().keys() {
        assert!(
            page.contains(&format!("id=\"schema-{schema}\"")),
            "no schema {schema}"
        );
    }
    assert!(page.contains(r#"{"error": {"code": "invalid_argument""#));

    // Nothing external: no scripts, stylesheets, frames, images, fonts, imports; every
    // link is to the page itself or to this server.
    let lower = page.to_ascii_lowercase();
    for banned in [
        "<script", "<link", "<iframe", "<img", "<object", "<embed", "src=", "@import", "url(",
        "srcset", "http://", "https://", "//cdn",
    ] {
        assert!(!lower.contains(banned), "the page has {banned:?}");
    }
    for href in lower.split("href=\"").skip(1) {
        assert!(
            href.starts_with('#') || (href.starts_with('/') && !href.starts_with("//")),
            "external link {}",
            &href[..href.find('"').unwrap_or(href.len())]
        );
    }
    // The links inside the page land.
    for href in page.split("href=\"#").skip(1) {
        let target = &href[..href.find('"').unwrap()];
        assert!(
            page.contains(&format!("id=\"{target}\"")),
            "dangling link #{target}"
        );
    }
}

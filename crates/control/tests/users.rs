//! Users and sign-in sessions through the real router (a fake host agent stands in for
//! the VMs): admins make and disable users; a sign-in sets an HttpOnly cookie that then
//! authenticates like a key of the user's team; logout and disabling end sessions at
//! once; failed sign-ins are throttled; a bad key is never rescued by a cookie.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::{env, Env};
use serde_json::{json, Value};

const PASSWORD: &str = "correct horse battery";

async fn make_user(e: &Env, email: &str, admin: bool) -> Value {
    let (s, v) = e
        .call(
            "POST",
            "/v1/admin/users",
            Some(&e.key_admin),
            Some(json!({"team_id": e.team_a.to_string(), "email": email, "password": PASSWORD, "is_admin": admin})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

/// Sign in; returns the status, the body and the session cookie's value (if set).
async fn login(e: &Env, email: &str, password: &str) -> (StatusCode, Value, Option<String>) {
    let req = Request::post("/v1/auth/login")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"email": email, "password": password}).to_string(),
        ))
        .unwrap();
    let resp = tower::ServiceExt::oneshot(e.router.clone(), req)
        .await
        .unwrap();
    let status = resp.status();
    let cookie = resp
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let session = cookie.map(|c| {
        assert!(
            c.contains("HttpOnly") && c.contains("SameSite=Strict"),
            "{c}"
        );
        c.split(';')
            .next()
            .unwrap()
            .trim_start_matches("hearth_session=")
            .to_owned()
    });
    (status, v, session)
}

/// A request that carries only the session cookie.
async fn with_cookie(e: &Env, method: &str, uri: &str, session: &str) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(
            header::COOKIE,
            format!("theme=dark; hearth_session={session}"),
        )
        .body(Body::empty())
        .unwrap();
    e.send(req).await
}

#[tokio::test]
async fn only_admins_make_users_and_bad_input_is_refused() {
    let e = env().await;
    let body = |email: &str, password: &str| json!({"team_id": e.team_a.to_string(), "email": email, "password": password});
    let (s, v) = e
        .call(
            "POST",
            "/v1/admin/users",
            Some(&e.key_a),
            Some(body("a@x.io", PASSWORD)),
        )
        .await;
    common::assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden", "admin");
    for (email, password, needle) in [
        ("no-at-sign", PASSWORD, "email"),
        ("two@@x.io", PASSWORD, "email"),
        ("sp ace@x.io", PASSWORD, "email"),
        ("a@x.io", "short", "password"),
        ("a@x.io", &"p".repeat(257), "password"),
        ("a@x.io", "with\nnewline!!", "password"),
    ] {
        let (s, v) = e
            .call(
                "POST",
                "/v1/admin/users",
                Some(&e.key_admin),
                Some(body(email, password)),
            )
            .await;
        common::assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", needle);
    }
    let (s, v) = e
        .call(
            "POST",
            "/v1/admin/users",
            Some(&e.key_admin),
            Some(json!({"team_id": "5a1e2c3d-0000-4000-8000-000000000001", "email": "a@x.io", "password": PASSWORD})),
        )
        .await;
    common::assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "team");
    let u = make_user(&e, "Ann@X.io", false).await;
    assert_eq!(u["email"], "ann@x.io");
    let (s, v) = e
        .call(
            "POST",
            "/v1/admin/users",
            Some(&e.key_admin),
            Some(body("ANN@x.io", PASSWORD)),
        )
        .await;
    common::assert_error(s, &v, StatusCode::CONFLICT, "conflict", "exists");
    // Nothing of the refused ones was stored.
    let (s, v) = e
        .call("GET", "/v1/admin/users", Some(&e.key_admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["users"].as_array().unwrap().len(), 1, "{v}");
    let (s, _) = e.call("GET", "/v1/admin/users", Some(&e.key_a), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_session_cookie_speaks_for_the_users_team_until_logout() {
    let e = env().await;
    make_user(&e, "ann@x.io", false).await;
    let (s, v, cookie) = login(&e, "ann@x.io", "wrong password!").await;
    common::assert_error(
        s,
        &v,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "email or password",
    );
    assert!(cookie.is_none());
    // An unknown email gets the very same answer.
    let (s2, v2, _) = login(&e, "nobody@x.io", PASSWORD).await;
    assert_eq!((s2, &v2), (s, &v));

    let (s, v, cookie) = login(&e, "ANN@x.io", PASSWORD).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        v.get("secret").is_none() && !v.to_string().contains("hk_"),
        "{v}"
    );
    let session = cookie.expect("a session cookie");
    let (s, me) = with_cookie(&e, "GET", "/v1/me", &session).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    assert_eq!(me["team_id"], e.team_a.to_string());
    assert_eq!(me["user"]["email"], "ann@x.io");
    assert_eq!(me["is_admin"], false);
    // Team scoping holds: team b's sandbox is a 404 to this session.
    let b_sandbox = {
        let (s, v) = e
            .call(
                "POST",
                "/v1/sandboxes",
                Some(&e.key_b),
                Some(json!({"template": "minimal"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    };
    let (s, _) = with_cookie(&e, "GET", &format!("/v1/sandboxes/{b_sandbox}"), &session).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = with_cookie(&e, "GET", "/v1/admin/teams", &session).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Sessions are not the team's keys.
    let (_, keys) = e.call("GET", "/v1/keys", Some(&e.key_a), None).await;
    assert!(!keys.to_string().contains("session of"), "{keys}");
    // A request that names a key is judged by it alone.
    let req = Request::get("/v1/me")
        .header(header::AUTHORIZATION, "Bearer hk_not-a-key")
        .header(header::COOKIE, format!("hearth_session={session}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(e.send(req).await.0, StatusCode::UNAUTHORIZED);
    // Logout with an API key is refused; with the session it ends it at once.
    let (s, v) = e
        .call("POST", "/v1/auth/logout", Some(&e.key_a), None)
        .await;
    common::assert_error(
        s,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "session",
    );
    let (s, _) = with_cookie(&e, "POST", "/v1/auth/logout", &session).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = with_cookie(&e, "GET", "/v1/me", &session).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The audit log has the sign-in.
    let (_, audit) = e.call("GET", "/v1/audit", Some(&e.key_a), None).await;
    assert!(audit.to_string().contains("user.login"), "{audit}");
}

#[tokio::test]
async fn disabling_a_user_ends_its_sessions_and_sign_ins() {
    let e = env().await;
    let u = make_user(&e, "adm@x.io", true).await;
    let (_, _, cookie) = login(&e, "adm@x.io", PASSWORD).await;
    let session = cookie.unwrap();
    // An admin user's session has admin rights.
    let (s, _) = with_cookie(&e, "GET", "/v1/admin/teams", &session).await;
    assert_eq!(s, StatusCode::OK);
    let id = u["id"].as_str().unwrap();
    let (s, _) = e
        .call(
            "DELETE",
            &format!("/v1/admin/users/{id}"),
            Some(&e.key_a),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    for bad in ["usr-", "../etc", "usr-UPPERCASE12"] {
        let (s, _) = e
            .call(
                "DELETE",
                &format!("/v1/admin/users/{bad}"),
                Some(&e.key_admin),
                None,
            )
            .await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::NOT_FOUND,
            "{bad}: {s}"
        );
    }
    let (s, v) = e
        .call(
            "DELETE",
            &format!("/v1/admin/users/{id}"),
            Some(&e.key_admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["disabled_at"].is_string());
    let (s, _) = with_cookie(&e, "GET", "/v1/me", &session).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = login(&e, "adm@x.io", PASSWORD).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn failed_sign_ins_are_throttled_per_email() {
    let e = env().await;
    make_user(&e, "ann@x.io", false).await;
    make_user(&e, "bob@x.io", false).await;
    for _ in 0..hearth_control::app::users::MAX_FAILURES {
        let (s, _, _) = login(&e, "ann@x.io", "wrong password!").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // Now even the right password waits; another email does not.
    let (s, v, cookie) = login(&e, "ann@x.io", PASSWORD).await;
    common::assert_error(
        s,
        &v,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "try again",
    );
    assert!(cookie.is_none());
    let (s, _, _) = login(&e, "bob@x.io", PASSWORD).await;
    assert_eq!(s, StatusCode::OK);
    // Malformed sign-ins are bad credentials, not hints.
    for body in [
        json!({"email": "x", "password": "y"}),
        json!({"email": "a@b.c", "password": "p".repeat(300)}),
    ] {
        let (s, _) = e.call("POST", "/v1/auth/login", None, Some(body)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, _) = e
        .call(
            "POST",
            "/v1/auth/login",
            None,
            Some(json!({"email": "a@b.c"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

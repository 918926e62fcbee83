//! Bad input, as a table, over every endpoint that takes input (`/v1` and E2B's API):
//! malformed JSON, wrong types, oversized bodies, bad names (empty, too long, bad
//! characters, `..`, `/`, NUL, unicode), bad IDs, negative and huge numbers, bad query
//! parameters and headers. Each case must be a 4xx (never a 5xx) with the error body
//! in the documented shape, and leave the database (read back through `hearth_db`)
//! and the host agent exactly as they were.

mod common;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use common::{env, Env};
use serde_json::{json, Value};

/// What a request carries.
enum Payload {
    None,
    Json(Value),
    /// A body as is, with a content type.
    Raw(&'static str, Vec<u8>),
}

/// Which error shape the edge answers in.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// `{"error":{"code","message"}}`
    V1,
    /// E2B's `{"code": <status>, "message"}`
    E2b,
}

struct Case {
    method: &'static str,
    uri: String,
    payload: Payload,
    /// Extra headers (the API key is added unless `Authorization` is given).
    headers: Vec<(&'static str, HeaderValue)>,
}

fn case(method: &'static str, uri: impl Into<String>, payload: Payload) -> Case {
    Case {
        method,
        uri: uri.into(),
        payload,
        headers: Vec::new(),
    }
}

/// Everything the store holds that a request could change, read through `hearth_db`.
/// API keys without `last_used_at`: a refused request may still have authenticated.
async fn snapshot(e: &Env) -> String {
    let db = &e.state.app().db;
    let mut out = String::new();
    for team in [e.team_a, e.team_b] {
        let sandboxes = db.list_sandboxes(team).await.unwrap();
        let keys: Vec<_> = db
            .list_api_keys(team)
            .await
            .unwrap()
            .into_iter()
            .map(|k| (k.id, k.name, k.is_admin, k.expires_at, k.revoked_at))
            .collect();
        let audit = db.list_audit(team, None, 100_000).await.unwrap();
        let quota = db
            .team_quota(team, &hearth_types::TeamQuota::default())
            .await
            .unwrap();
        out.push_str(&format!(
            "{sandboxes:?}\n{keys:?}\n{audit:?}\n{quota:?}\n{:?}\n",
            db.list_templates(team).await.unwrap()
        ));
    }
    out.push_str(&format!(
        "{:?}\n{:?}\n{:?}\n{}\n",
        db.list_teams().await.unwrap(),
        db.list_all_templates().await.unwrap(),
        db.list_hosts()
            .await
            .unwrap()
            .iter()
            .map(|h| (&h.id, &h.url))
            .collect::<Vec<_>>(),
        db.count_api_keys().await.unwrap(),
    ));
    out
}

/// What the (fake) host agent was asked to do.
fn host_acts(e: &Env) -> String {
    let st = e.host.st();
    format!(
        "{} {} {} {} {} {:?} {:?} {:?} {:?} {}",
        st.creates,
        st.destroys,
        st.pauses,
        st.resumes,
        st.forks,
        st.uploads,
        st.template_deletes,
        st.signals,
        st.sandboxes.len(),
        st.templates.len()
    )
}

async fn send(e: &Env, c: &Case, key: &str) -> (StatusCode, Value, String) {
    let mut req = Request::builder().method(c.method).uri(c.uri.as_str());
    if !c.headers.iter().any(|(h, _)| *h == "authorization") {
        req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    for (h, v) in &c.headers {
        req = req.header(*h, v.clone());
    }
    let req = match &c.payload {
        Payload::None => req.body(Body::empty()),
        Payload::Json(v) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string())),
        Payload::Raw(ctype, bytes) => req
            .header(header::CONTENT_TYPE, *ctype)
            .body(Body::from(bytes.clone())),
    }
    .unwrap();
    let (status, v) = e.send(req).await;
    let text = v.to_string();
    (status, v, text)
}

fn check_shape(shape: Shape, status: StatusCode, v: &Value) -> Result<(), String> {
    let ok = match shape {
        Shape::V1 => {
            v["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
                && v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
        }
        Shape::E2b => {
            v["code"] == json!(status.as_u16())
                && v["message"].as_str().is_some_and(|m| !m.is_empty())
        }
    };
    if ok {
        Ok(())
    } else {
        Err("not the error shape".into())
    }
}

const JSON: &str = "application/json";

/// Bodies that are not the JSON a route takes, whatever the route.
fn malformed_bodies() -> Vec<Payload> {
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    vec![
        Payload::Raw(JSON, b"{".to_vec()),
        Payload::Raw(JSON, b"{\"template\":".to_vec()),
        Payload::Raw(JSON, b"{\"a\":1}{\"b\":2}".to_vec()),
        Payload::Raw(JSON, b"{'single': 'quotes'}".to_vec()),
        Payload::Raw(JSON, vec![0xff, 0xfe, 0x00, 0x7b]),
        Payload::Raw(JSON, b"\0".to_vec()),
        Payload::Raw(JSON, deep.into_bytes()),
        Payload::Json(json!([])),
        Payload::Json(json!("a string")),
        Payload::Json(json!(12)),
        // Valid JSON of the wrong content type.
        Payload::Raw("text/plain", b"{}".to_vec()),
        Payload::Raw("application/x-www-form-urlencoded", b"a=1".to_vec()),
        // Over the 1 MiB body limit.
        Payload::Raw(
            JSON,
            format!("{{\"name\":\"{}\"}}", "x".repeat(1024 * 1024 + 10)).into_bytes(),
        ),
    ]
}

/// Names that no name field or path segment accepts.
fn bad_names() -> Vec<String> {
    vec![
        String::new(),
        " ".into(),
        "x".repeat(300),
        "..".into(),
        ".".into(),
        "../etc".into(),
        "a/b".into(),
        "/abs".into(),
        "a\0b".into(),
        "a\nb".into(),
        "ünïcødé".into(),
        "名前".into(),
        "a b".into(),
        "UPPER".into(),
        "-leading".into(),
        "x;rm -rf".into(),
    ]
}

/// Path segments that are no ID of any kind (percent-encoded as a client sends them).
fn bad_ids() -> Vec<String> {
    vec![
        "x".into(),
        "sb-".into(),
        "sb-UPPERCASE000000".into(),
        format!("sb-{}", "a".repeat(500)),
        "%00".into(),
        "..".into(),
        "%2e%2e".into(),
        "a%2Fb".into(),
        "%C3%BC".into(),
        "-1".into(),
        "99999999999999999999999".into(),
        "00000000-0000-0000-0000-000000000000x".into(),
    ]
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Numbers out of every range: negative, zero where 1 is the least, fractions,
/// strings, huge, beyond i64 and u64.
fn bad_numbers() -> Vec<Value> {
    vec![
        json!(-1),
        json!(-9_223_372_036_854_775_807i64),
        json!(1.5),
        json!("2"),
        json!(true),
        json!(1e300),
        serde_json::from_str("18446744073709551616").unwrap(),
        serde_json::from_str("-18446744073709551617").unwrap(),
        json!(u32::MAX),
        json!(i64::MAX),
        json!([1]),
        json!({"n": 1}),
    ]
}

fn cases(e: &Env, sb: &str, sb_b: &str) -> Vec<(Shape, Case)> {
    let mut v: Vec<(Shape, Case)> = Vec::new();
    let mut v1 = |c: Case| v.push((Shape::V1, c));
    let team_b = e.team_b;

    // Every JSON route, with every malformed body.
    let json_routes: Vec<(&'static str, String)> = vec![
        ("POST", "/v1/sandboxes".into()),
        ("POST", format!("/v1/sandboxes/{sb}/exec")),
        ("POST", format!("/v1/sandboxes/{sb}/timeout")),
        ("POST", format!("/v1/sandboxes/{sb}/resume")),
        ("POST", format!("/v1/sandboxes/{sb}/snapshots")),
        ("POST", format!("/v1/sandboxes/{sb}/fork")),
        ("POST", "/v1/keys".into()),
        ("POST", "/v1/admin/teams".into()),
        ("POST", format!("/v1/admin/teams/{team_b}/keys")),
    ];
    for (method, uri) in &json_routes {
        for p in malformed_bodies() {
            v1(case(method, uri.clone(), p));
        }
        // Unknown and misspelled fields are refused, not ignored.
        v1(case(
            method,
            uri.clone(),
            Payload::Json(json!({"bogus": 1})),
        ));
    }

    // Create: wrong types, numbers out of range, bad names and maps.
    for n in bad_numbers() {
        for field in ["vcpus", "memory_mb", "disk_size_mb", "timeout_s"] {
            v1(case(
                "POST",
                "/v1/sandboxes",
                Payload::Json(json!({"template": "minimal", field: n})),
            ));
        }
    }
    for field in ["vcpus", "memory_mb", "disk_size_mb", "timeout_s"] {
        v1(case(
            "POST",
            "/v1/sandboxes",
            Payload::Json(json!({"template": "minimal", field: 0})),
        ));
    }
    for name in bad_names() {
        v1(case(
            "POST",
            "/v1/sandboxes",
            Payload::Json(json!({"template": name})),
        ));
    }
    for bad in [
        json!({"template": 1}),
        json!({"template": null}),
        json!({}),
        json!({"template": "minimal", "env": []}),
        json!({"template": "minimal", "env": {"A": 1}}),
        json!({"template": "minimal", "env": {"": "x"}}),
        json!({"template": "minimal", "env": {"1A": "x"}}),
        json!({"template": "minimal", "env": {"A=B": "x"}}),
        json!({"template": "minimal", "env": {"A\u{0}": "x"}}),
        json!({"template": "minimal", "env": {"A": "x".repeat(40_000)}}),
        json!({"template": "minimal", "metadata": "x"}),
        json!({"template": "minimal", "metadata": {"": "x"}}),
        json!({"template": "minimal", "metadata": {"k": "x".repeat(10_000)}}),
        json!({"template": "minimal", "on_timeout": "explode"}),
        json!({"template": "minimal", "on_timeout": 1}),
    ] {
        v1(case("POST", "/v1/sandboxes", Payload::Json(bad)));
    }

    // Exec.
    for bad in [
        json!({"cmd": "ls"}),
        json!({"cmd": []}),
        json!({"cmd": [1]}),
        json!({"cmd": [""]}),
        json!({"cmd": ["ls\u{0}"]}),
        json!({"cmd": vec!["x"; 5000]}),
        json!({"cmd": ["ls"], "cwd": "relative"}),
        json!({"cmd": ["ls"], "cwd": "/a\u{0}b"}),
        json!({"cmd": ["ls"], "cwd": format!("/{}", "a".repeat(10_000))}),
        json!({"cmd": ["ls"], "user": "Root!"}),
        json!({"cmd": ["ls"], "user": "../x"}),
        json!({"cmd": ["ls"], "user": ""}),
        json!({"cmd": ["ls"], "env": {"1": "x"}}),
        json!({"cmd": ["ls"], "timeout_s": 0}),
        json!({"cmd": ["ls"], "pty": {"cols": 80, "rows": 24}}),
    ] {
        v1(case(
            "POST",
            format!("/v1/sandboxes/{sb}/exec"),
            Payload::Json(bad),
        ));
    }
    for n in bad_numbers() {
        v1(case(
            "POST",
            format!("/v1/sandboxes/{sb}/exec"),
            Payload::Json(json!({"cmd": ["ls"], "timeout_s": n})),
        ));
    }

    // Lifecycle bodies: timeout, resume, fork, snapshot.
    for n in bad_numbers().into_iter().chain([json!(0)]) {
        v1(case(
            "POST",
            format!("/v1/sandboxes/{sb}/timeout"),
            Payload::Json(json!({"timeout_s": n})),
        ));
        v1(case(
            "POST",
            format!("/v1/sandboxes/{sb}/fork"),
            Payload::Json(json!({"count": n})),
        ));
        v1(case(
            "POST",
            format!("/v1/sandboxes/{sb}/resume"),
            Payload::Json(json!({"timeout_s": n})),
        ));
    }
    v1(case(
        "POST",
        format!("/v1/sandboxes/{sb}/timeout"),
        Payload::Json(json!({})),
    ));
    for name in bad_names() {
        v1(case(
            "POST",
            format!("/v1/sandboxes/{sb}/snapshots"),
            Payload::Json(json!({"name": name})),
        ));
        v1(case(
            "POST",
            "/v1/admin/teams",
            Payload::Json(json!({"name": name})),
        ));
    }
    v1(case(
        "POST",
        format!("/v1/sandboxes/{sb}/snapshots"),
        Payload::Json(json!({"name": "ok", "memory": "yes"})),
    ));
    v1(case(
        "POST",
        "/v1/admin/teams",
        Payload::Json(json!({"name": e.team_a.to_string()})),
    ));

    // Keys.
    for bad in [
        json!({"name": "\u{0}"}),
        json!({"name": "a\nb"}),
        json!({"name": "x".repeat(65)}),
        json!({"name": 5}),
        json!({"is_admin": "yes"}),
        json!({"expires_in_s": 0}),
        json!({"expires_in_s": 59}),
    ] {
        v1(case("POST", "/v1/keys", Payload::Json(bad.clone())));
        v1(case(
            "POST",
            format!("/v1/admin/teams/{team_b}/keys"),
            Payload::Json(bad),
        ));
    }
    for n in bad_numbers() {
        v1(case(
            "POST",
            "/v1/keys",
            Payload::Json(json!({"expires_in_s": n})),
        ));
    }

    // Bad IDs in every path that takes one.
    for id in bad_ids() {
        for (method, tail) in [
            ("GET", ""),
            ("DELETE", ""),
            ("POST", "/pause"),
            ("GET", "/processes"),
            ("GET", "/metrics"),
            ("GET", "/files?path=/etc/hostname"),
        ] {
            v1(case(
                method,
                format!("/v1/sandboxes/{id}{tail}"),
                Payload::None,
            ));
        }
        for (method, tail, body) in [
            ("POST", "/exec", json!({"cmd": ["ls"]})),
            ("POST", "/timeout", json!({"timeout_s": 60})),
            ("POST", "/snapshots", json!({"name": "ok"})),
            ("POST", "/fork", json!({})),
            ("POST", "/resume", json!({})),
        ] {
            v1(case(
                method,
                format!("/v1/sandboxes/{id}{tail}"),
                Payload::Json(body),
            ));
        }
        v1(case(
            "PUT",
            format!("/v1/sandboxes/{id}/files?path=/tmp/x"),
            Payload::Raw("application/octet-stream", b"data".to_vec()),
        ));
        v1(case(
            "POST",
            format!("/v1/sandboxes/{id}/processes/1/connect"),
            Payload::None,
        ));
        v1(case("DELETE", format!("/v1/keys/{id}"), Payload::None));
        v1(case(
            "DELETE",
            format!("/v1/admin/keys/{id}"),
            Payload::None,
        ));
        v1(case(
            "GET",
            format!("/v1/admin/teams/{id}/keys"),
            Payload::None,
        ));
        v1(case(
            "POST",
            format!("/v1/admin/teams/{id}/keys"),
            Payload::Json(json!({})),
        ));
    }
    // Team b's sandbox is team a's 404.
    v1(case(
        "DELETE",
        format!("/v1/sandboxes/{sb_b}"),
        Payload::None,
    ));
    v1(case(
        "POST",
        format!("/v1/sandboxes/{sb_b}/exec"),
        Payload::Json(json!({"cmd": ["ls"]})),
    ));
    // Template names in the path.
    for name in bad_names() {
        v1(case(
            "DELETE",
            format!("/v1/templates/{}", enc(&name)),
            Payload::None,
        ));
    }

    // Query parameters.
    for q in [
        "limit=0",
        "limit=-1",
        "limit=1001",
        "limit=1.5",
        "limit=abc",
        "limit=99999999999999999999",
        "state=bogus",
        "state=running,",
        "state=%00",
        "all=maybe",
        "next_token=garbage",
        "next_token=%00%01",
        "limit=1&limit=2",
    ] {
        v1(case("GET", format!("/v1/sandboxes?{q}"), Payload::None));
    }
    let long_token = "A".repeat(4000);
    v1(case(
        "GET",
        format!("/v1/sandboxes?next_token={long_token}"),
        Payload::None,
    ));
    for q in [
        "limit=0",
        "limit=501",
        "limit=-5",
        "limit=x",
        "before=0",
        "before=-1",
        "before=abc",
        "before=99999999999999999999",
    ] {
        v1(case("GET", format!("/v1/audit?{q}"), Payload::None));
    }
    for q in [
        "after=-1",
        "after=x",
        "after=1.5",
        "after=99999999999999999999",
    ] {
        v1(case("GET", format!("/v1/events?{q}"), Payload::None));
    }
    let mut last_event = case("GET", "/v1/events", Payload::None);
    last_event
        .headers
        .push(("last-event-id", HeaderValue::from_static("not-a-number")));
    v1(last_event);
    for q in [
        "",
        "path=relative",
        "path=",
        "path=/a%00b",
        "path=/etc/x&user=Root!",
        "path=/etc/x&user=..%2Fx",
        "path=/etc/x&user=",
    ] {
        v1(case(
            "GET",
            format!("/v1/sandboxes/{sb}/files?{q}"),
            Payload::None,
        ));
        v1(case(
            "PUT",
            format!("/v1/sandboxes/{sb}/files?{q}"),
            Payload::Raw("application/octet-stream", b"data".to_vec()),
        ));
    }
    v1(case(
        "GET",
        format!("/v1/sandboxes/{sb}/files?path=/{}", "a".repeat(5000)),
        Payload::None,
    ));
    // Over the upload limit (the test server takes 1 KiB).
    v1(case(
        "PUT",
        format!("/v1/sandboxes/{sb}/files?path=/tmp/big"),
        Payload::Raw("application/octet-stream", vec![b'x'; 4096]),
    ));
    for pid in ["0", "-1", "abc", "99999999999", "1.5", "%00"] {
        v1(case(
            "POST",
            format!("/v1/sandboxes/{sb}/processes/{pid}/connect"),
            Payload::None,
        ));
    }
    for q in [
        "timeout_s=0",
        "timeout_s=-1",
        "timeout_s=x",
        "timeout_s=99999999999",
    ] {
        v1(case(
            "POST",
            format!("/v1/sandboxes/{sb}/processes/42/connect?{q}"),
            Payload::None,
        ));
    }

    // Keys in headers: empty, too long, not a key, not text.
    for value in [
        HeaderValue::from_static("Bearer "),
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        HeaderValue::from_str(&format!("Bearer hk_{}", "a".repeat(300))).unwrap(),
        HeaderValue::from_bytes(b"Bearer hk_\xff\xfe").unwrap(),
        HeaderValue::from_static("Bearer hk_../../etc/passwd"),
    ] {
        let mut c = case(
            "POST",
            "/v1/sandboxes",
            Payload::Json(json!({"template": "minimal"})),
        );
        c.headers.push(("authorization", value));
        v1(c);
    }

    // E2B's API: the same kinds of input, in its own error shape.
    let mut e2b = |c: Case| v.push((Shape::E2b, c));
    for p in malformed_bodies() {
        e2b(case("POST", "/sandboxes", p));
    }
    for bad in [
        json!({"templateID": ""}),
        json!({"templateID": "../x"}),
        json!({"templateID": "a/b"}),
        json!({"templateID": "x".repeat(300)}),
        json!({"templateID": 5}),
        json!({"templateID": "minimal", "timeout": -1}),
        json!({"templateID": "minimal", "timeout": 1e30}),
        json!({"templateID": "minimal", "timeout": "x"}),
        json!({"templateID": "minimal", "envVars": []}),
        json!({"templateID": "minimal", "envVars": {"1A": "x"}}),
        json!({"templateID": "minimal", "metadata": "x"}),
    ] {
        e2b(case("POST", "/sandboxes", Payload::Json(bad)));
    }
    for id in bad_ids() {
        e2b(case("GET", format!("/sandboxes/{id}"), Payload::None));
        e2b(case("DELETE", format!("/sandboxes/{id}"), Payload::None));
        e2b(case(
            "POST",
            format!("/sandboxes/{id}/timeout"),
            Payload::Json(json!({"timeout": 60})),
        ));
        e2b(case(
            "POST",
            format!("/sandboxes/{id}/pause"),
            Payload::None,
        ));
    }
    for n in bad_numbers() {
        e2b(case(
            "POST",
            format!("/sandboxes/{sb}/timeout"),
            Payload::Json(json!({"timeout": n})),
        ));
        e2b(case(
            "POST",
            format!("/sandboxes/{sb}/refreshes"),
            Payload::Json(json!({"duration": n})),
        ));
    }
    for q in [
        "limit=0",
        "limit=-1",
        "limit=x",
        "state=bogus",
        "nextToken=garbage",
    ] {
        e2b(case("GET", format!("/v2/sandboxes?{q}"), Payload::None));
    }
    for q in [
        "limit=-1",
        "limit=x",
        "limit=0",
        "limit=99999999999999999999",
    ] {
        e2b(case(
            "GET",
            format!("/sandboxes/{sb}/logs?{q}"),
            Payload::None,
        ));
    }
    v
}

#[tokio::test]
async fn bad_input_is_a_4xx_in_the_error_shape_and_changes_nothing() {
    let e = env().await;
    let sb = e.create().await;
    let (s, v) = e
        .call(
            "POST",
            "/v1/sandboxes",
            Some(&e.key_b),
            Some(json!({"template": "minimal"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let sb_b = v["id"].as_str().unwrap().to_owned();

    let table = cases(&e, &sb, &sb_b);
    assert!(table.len() > 500, "only {} cases", table.len());
    let db_before = snapshot(&e).await;
    let host_before = host_acts(&e);
    let mut failures = Vec::new();
    for (shape, c) in &table {
        // Admin routes with the admin key, so that the input, not the key, is refused.
        let key = if c.uri.starts_with("/v1/admin/") {
            &e.key_admin
        } else {
            &e.key_a
        };
        let (status, v, text) = send(&e, c, key).await;
        let body = match &c.payload {
            Payload::None => String::new(),
            Payload::Json(v) => v.to_string(),
            Payload::Raw(ctype, b) => format!("({ctype}) {}", String::from_utf8_lossy(b)),
        };
        let what = format!(
            "{} {} {}",
            c.method,
            c.uri.chars().take(120).collect::<String>(),
            body.chars().take(80).collect::<String>()
        );
        if !status.is_client_error() {
            failures.push(format!("{what}: {status} {}", &text[..text.len().min(200)]));
            continue;
        }
        if let Err(why) = check_shape(*shape, status, &v) {
            failures.push(format!(
                "{what}: {status} {why}: {}",
                &text[..text.len().min(200)]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
    assert_eq!(snapshot(&e).await, db_before, "the database changed");
    assert_eq!(host_acts(&e), host_before, "the host was asked to act");
}

/// The snapshot is not blind: a request that does change something shows up in it.
#[tokio::test]
async fn the_snapshot_sees_a_change() {
    let e = env().await;
    let before = snapshot(&e).await;
    let (s, v) = e
        .call(
            "POST",
            "/v1/keys",
            Some(&e.key_a),
            Some(json!({"name": "ci"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_ne!(snapshot(&e).await, before);
}

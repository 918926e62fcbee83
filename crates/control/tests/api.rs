//! Handler tests: the real router, auth and a real (in-memory) SQLite, in-process via
//! `tower::ServiceExt::oneshot`. Host-agent-dependent paths use [`FakeHost`].

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use hearth_control::app::hosts::{HostError, ProcEvent, Signal};
use hearth_control::app::Policy;
use hearth_db::{Db, SandboxState};
use hearth_types::{SandboxId, TeamId, TeamQuota};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;
use common::*;

#[tokio::test]
async fn health_needs_no_key_and_everything_else_does() {
    let e = env().await;
    let (s, v) = e.call("GET", "/v1/health", None, None).await;
    assert_eq!((s, v), (StatusCode::OK, json!({"status": "ok"})));

    for key in [None, Some("hk_wrong"), Some("")] {
        let (s, v) = e.call("GET", "/v1/sandboxes", key, None).await;
        assert_error(
            s,
            &v,
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "API key",
        );
    }
    let req = |k: &str| {
        Request::get("/v1/sandboxes")
            .header("x-api-key", k)
            .body(Body::empty())
            .unwrap()
    };
    let (s, v) = e.send(req("hk_wrong")).await;
    assert_error(
        s,
        &v,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "API key",
    );
    expect(StatusCode::OK, e.send(req(&e.key_a)).await);
    let req = Request::get("/v1/sandboxes")
        .header("authorization", format!("Basic {}", e.key_a))
        .body(Body::empty())
        .unwrap();
    assert_eq!(e.send(req).await.0, StatusCode::UNAUTHORIZED);
    // Unauthenticated requests learn nothing, not even whether a sandbox exists.
    let (s, _) = e
        .call(
            "POST",
            "/v1/sandboxes",
            None,
            Some(json!({"template": "minimal"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(e.row_count().await, 0);
}

#[tokio::test]
async fn bad_create_requests_are_rejected_and_create_nothing() {
    let e = env().await;
    let big = "x".repeat(40 * 1024);
    let cases = [
        (
            json!({"template": "no-such"}),
            StatusCode::NOT_FOUND,
            "template 'no-such' not found",
        ),
        (
            json!({"template": "../etc"}),
            StatusCode::BAD_REQUEST,
            "template name",
        ),
        (
            json!({"template": "a/b"}),
            StatusCode::BAD_REQUEST,
            "template name",
        ),
        (
            json!({"template": ""}),
            StatusCode::BAD_REQUEST,
            "template name",
        ),
        (json!({}), StatusCode::BAD_REQUEST, "template"),
        (
            json!({"template": "minimal", "vcpus": 0}),
            StatusCode::BAD_REQUEST,
            "vcpus",
        ),
        (
            json!({"template": "minimal", "vcpus": 1000}),
            StatusCode::BAD_REQUEST,
            "vcpus",
        ),
        (
            json!({"template": "minimal", "vcpus": -1}),
            StatusCode::BAD_REQUEST,
            "vcpus must be between 1 and 8, got -1",
        ),
        (
            json!({"template": "minimal", "memory_mb": 1}),
            StatusCode::BAD_REQUEST,
            "memory_mb",
        ),
        (
            json!({"template": "minimal", "memory_mb": 10_000_000_000u64}),
            StatusCode::BAD_REQUEST,
            "got 10000000000",
        ),
        (
            json!({"template": "minimal", "disk_size_mb": 1}),
            StatusCode::BAD_REQUEST,
            "disk_size_mb",
        ),
        (
            json!({"template": "minimal", "timeout_s": 0}),
            StatusCode::BAD_REQUEST,
            "timeout_s",
        ),
        (
            json!({"template": "minimal", "env": {"1BAD": "x"}}),
            StatusCode::BAD_REQUEST,
            "env key",
        ),
        (
            json!({"template": "minimal", "env": {"A": big}}),
            StatusCode::BAD_REQUEST,
            "env value",
        ),
        (
            json!({"template": "minimal", "metadata": {"k": "v".repeat(2000)}}),
            StatusCode::BAD_REQUEST,
            "metadata value",
        ),
        (
            json!({"template": "minimal", "vcpus": "two"}),
            StatusCode::BAD_REQUEST,
            "vcpus",
        ),
    ];
    for (body, want, needle) in cases {
        let (s, v) = e.post(&e.key_a, "/v1/sandboxes", body.clone()).await;
        assert_eq!(s, want, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
    }
    // Not JSON at all.
    let req = Request::post("/v1/sandboxes")
        .header("authorization", format!("Bearer {}", e.key_a))
        .header("content-type", "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let (s, v) = e.send(req).await;
    assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", "");
    // Oversized body.
    let req = Request::post("/v1/sandboxes")
        .header("authorization", format!("Bearer {}", e.key_a))
        .header("content-type", "application/json")
        .body(Body::from(vec![b' '; 4 * 1024 * 1024]))
        .unwrap();
    let (s, v) = e.send(req).await;
    assert_error(
        s,
        &v,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "larger than",
    );

    assert_eq!(e.row_count().await, 0);
    assert_eq!(e.host.st().creates, 0);
}

#[tokio::test]
async fn create_get_list_and_team_isolation() {
    let e = env().await;
    let v = expect(
        StatusCode::CREATED,
        e.post(
            &e.key_a,
            "/v1/sandboxes",
            json!({"template": "minimal", "vcpus": 2, "timeout_s": 600, "metadata": {"k": "v"}}),
        )
        .await,
    );
    assert_eq!(v["state"], "running");
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["memory_mb"], 256);
    assert_eq!(v["metadata"]["k"], "v");
    assert_eq!(v["team_id"], e.team_a.to_string());
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("sb-"));
    assert!(e.host.st().sandboxes.contains(&id.parse().unwrap()));

    let (s, got) = e.get(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["id"], id);
    let (_, list) = e.get(&e.key_a, "/v1/sandboxes").await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);

    // Team B sees nothing of team A's sandbox.
    let path = format!("/v1/sandboxes/{id}");
    for (m, p, b) in [
        ("GET", path.clone(), None),
        ("DELETE", path.clone(), None),
        (
            "POST",
            format!("{path}/exec"),
            Some(json!({"cmd": ["true"]})),
        ),
        ("GET", format!("{path}/files?path=/etc/hostname"), None),
    ] {
        let (s, v) = e.call(m, &p, Some(&e.key_b), b).await;
        assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "not found");
    }
    let (_, list) = e.get(&e.key_b, "/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]));
    assert!(
        e.host.st().sandboxes.contains(&id.parse().unwrap()),
        "B's delete reached the host"
    );

    // Malformed and unknown IDs.
    for bad in ["not-an-id", "sb-short", "sb-ABCDEFGHIJKLMNOP"] {
        let (s, v) = e.get(&e.key_a, &format!("/v1/sandboxes/{bad}")).await;
        assert_error(
            s,
            &v,
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "sandbox ID",
        );
    }
    let unknown = SandboxId::generate();
    let (s, v) = e.get(&e.key_a, &format!("/v1/sandboxes/{unknown}")).await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "not found");

    let (s, v) = e.get(&e.key_b, "/v1/templates").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["templates"][0]["name"], "minimal");
    assert_eq!(v["templates"][0]["team_id"], TeamId::PLATFORM.to_string());
}

#[tokio::test]
async fn host_out_of_capacity_is_409_and_leaves_no_row() {
    let e = env().await;
    e.host.st().fail_create = Some(HostError::Rpc {
        code: connectrpc::ErrorCode::ResourceExhausted,
        message: "host capacity: at most 4096 MiB of guest memory (3900 in use)".into(),
    });
    let (s, v) = e
        .post(&e.key_a, "/v1/sandboxes", json!({"template": "minimal"}))
        .await;
    assert_error(
        s,
        &v,
        StatusCode::CONFLICT,
        "capacity_exceeded",
        "host capacity: at most 4096 MiB of guest memory",
    );
    assert_eq!(e.row_count().await, 0);
}

#[tokio::test]
async fn failed_host_create_marks_the_row_error_and_frees_the_host() {
    let e = env().await;
    e.host.st().fail_create = Some(HostError::Rpc {
        code: connectrpc::ErrorCode::Internal,
        message: "the VM did not boot".into(),
    });
    let (s, v) = e
        .post(&e.key_a, "/v1/sandboxes", json!({"template": "minimal"}))
        .await;
    assert_error(
        s,
        &v,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the VM did not boot",
    );
    let rows = e.state.app().db.list_sandboxes(e.team_a).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, SandboxState::Error);
    assert!(rows[0]
        .error
        .as_deref()
        .unwrap()
        .contains("the VM did not boot"));
    // What the host may hold of it is released at once, and again on delete.
    assert_eq!(e.host.st().destroys, 1);
    // Not in the default listing; in ?all=true and ?state=error.
    let (_, list) = e.get(&e.key_a, "/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]));
    for q in ["all=true", "state=error", "state=stopped,error"] {
        let (s, list) = e.get(&e.key_a, &format!("/v1/sandboxes?{q}")).await;
        assert_eq!(s, StatusCode::OK, "{list}");
        assert_eq!(list["sandboxes"][0]["state"], "error", "{q}: {list}");
    }
    let id = rows[0].id.to_string();
    let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(e.host.st().destroys, 2);
}

#[tokio::test]
async fn twenty_concurrent_creates_against_a_quota_of_five_give_five() {
    let e = env_with(Policy {
        team_quota: TeamQuota {
            max_sandboxes: 5,
            ..TeamQuota::default()
        },
        ..Policy::default()
    })
    .await;
    e.host.st().create_delay = Some(std::time::Duration::from_millis(50));
    let calls = (0..20).map(|_| e.post(&e.key_a, "/v1/sandboxes", json!({"template": "minimal"})));
    let results = futures::future::join_all(calls).await;
    let mut created = 0;
    for (s, v) in results {
        if s == StatusCode::CREATED {
            created += 1;
        } else {
            assert_error(
                s,
                &v,
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                "team quota: at most 5 concurrent sandboxes",
            );
        }
    }
    assert_eq!(created, 5);
    assert_eq!(e.row_count().await, 5, "a refused create left a row");
    assert_eq!(e.host.st().creates, 5);
    // Another team has its own quota.
    expect(
        StatusCode::CREATED,
        e.post(&e.key_b, "/v1/sandboxes", json!({"template": "minimal"}))
            .await,
    );
    // Resources count too (here from the team's own quota row), and the message says
    // which and how much.
    let team_b = e
        .state
        .app()
        .db
        .authenticate(&e.key_b)
        .await
        .unwrap()
        .unwrap()
        .team_id;
    let own = TeamQuota {
        max_vcpus: 10,
        ..TeamQuota::default()
    };
    e.state
        .app()
        .db
        .set_team_quota(team_b, Some(&own))
        .await
        .unwrap();
    expect(
        StatusCode::CREATED,
        e.post(
            &e.key_b,
            "/v1/sandboxes",
            json!({"template": "minimal", "vcpus": 8}),
        )
        .await,
    );
    let (s, v) = e
        .post(
            &e.key_b,
            "/v1/sandboxes",
            json!({"template": "minimal", "vcpus": 8}),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
        "team quota: at most 10 vCPUs in total (9 in use, 8 asked)",
    );
}

#[tokio::test]
async fn a_short_lifetime_starts_when_the_sandbox_runs() {
    let e = env().await;
    // A boot longer than the lifetime asked for.
    e.host.st().create_delay = Some(std::time::Duration::from_millis(1500));
    let v = expect(
        StatusCode::CREATED,
        e.post(
            &e.key_a,
            "/v1/sandboxes",
            json!({"template": "minimal", "timeout_s": 1}),
        )
        .await,
    );
    assert_eq!(v["state"], "running");
    let created = chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    assert!(
        expires - created >= chrono::Duration::milliseconds(2400),
        "expiry counted from the request, not from running: {v}"
    );
}

#[tokio::test]
async fn listing_pages_and_filters() {
    let e = env().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(e.create().await);
    }
    for id in &ids[..2] {
        let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    let (_, v) = e.get(&e.key_a, "/v1/sandboxes").await;
    assert_eq!(v["sandboxes"].as_array().unwrap().len(), 3, "{v}");
    assert!(v["next_token"].is_null());
    let (_, v) = e.get(&e.key_a, "/v1/sandboxes?state=stopped").await;
    assert_eq!(v["sandboxes"].as_array().unwrap().len(), 2, "{v}");

    // Pages of 2 over all 5, each once.
    let mut seen = Vec::new();
    let mut uri = "/v1/sandboxes?all=true&limit=2".to_string();
    loop {
        let v = expect(StatusCode::OK, e.get(&e.key_a, &uri).await);
        let page = v["sandboxes"].as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|s| s["id"].as_str().unwrap().to_owned()));
        match v["next_token"].as_str() {
            Some(t) => uri = format!("/v1/sandboxes?all=true&limit=2&next_token={t}"),
            None => break,
        }
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);

    for (q, needle) in [
        ("limit=0", "limit must be between 1 and 1000, got 0"),
        ("limit=-1", "got -1"),
        ("limit=1001", "got 1001"),
        ("state=bogus", "state must be"),
        ("next_token=garbage", "next_token"),
    ] {
        let (s, v) = e.get(&e.key_a, &format!("/v1/sandboxes?{q}")).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", needle);
    }
}

#[tokio::test]
async fn a_team_has_a_cap_on_concurrent_exec_streams_and_transfers() {
    let e = env_with(Policy {
        streams: hearth_control::app::concurrency::StreamCaps {
            exec_streams: 2,
            transfers: 0,
            ..Default::default()
        },
        ..Policy::default()
    })
    .await;
    let id = e.create().await;
    let sid: SandboxId = id.parse().unwrap();
    let plan = hearth_control::app::exec::ExecParams {
        cmd: vec!["sleep".into(), "60".into()],
        ..Default::default()
    }
    .check()
    .unwrap();
    let (_, first) = e
        .state
        .app()
        .exec_start(e.team_a, &sid, &plan)
        .await
        .unwrap();
    let (_, _second) = e
        .state
        .app()
        .exec_start(e.team_a, &sid, &plan)
        .await
        .unwrap();
    // A third stream, streaming or one-shot, is refused before any host call.
    let processes = e.host.st().killers.len();
    let (s, v) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
        "at most 2 concurrent exec streams",
    );
    assert_eq!(e.host.st().killers.len(), processes);
    // A stream that ends gives its slot back.
    drop(first);
    expect(
        StatusCode::OK,
        e.post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await,
    );
    // Transfers have their own cap (here none at all).
    let (s, v) = e
        .get(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/files?path=/etc/hostname"),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
        "at most 0 concurrent file transfers",
    );
}

#[tokio::test]
async fn deleting_a_sandbox_ends_its_exec_streams_at_once() {
    let e = env().await;
    let id = e.create().await;
    // A one-shot exec of a command that runs for a minute.
    let router = e.router.clone();
    let key = e.key_a.clone();
    let path = format!("/v1/sandboxes/{id}/exec");
    let exec = tokio::spawn(async move {
        let req = Request::post(path)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"cmd": ["sleep", "60"], "timeout_s": 60}).to_string(),
            ))
            .unwrap();
        let resp = router.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice::<Value>(&bytes).unwrap())
    });
    // And a streaming one, as the WebSocket uses.
    let sid: SandboxId = id.parse().unwrap();
    let plan = hearth_control::app::exec::ExecParams {
        cmd: vec!["sleep".into(), "60".into()],
        ..Default::default()
    }
    .check()
    .unwrap();
    let (_, mut events) = e
        .state
        .app()
        .exec_start(e.team_a, &sid, &plan)
        .await
        .unwrap();
    assert!(matches!(
        events.next().await,
        Some(Ok(ProcEvent::Started { .. }))
    ));
    // Wait until the one-shot exec runs (the fake host has two sleepers).
    while e.host.st().killers.len() < 2 {
        tokio::task::yield_now().await;
    }
    let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = tokio::time::timeout(std::time::Duration::from_secs(5), exec)
        .await
        .expect("exec ended promptly")
        .unwrap();
    assert_error(
        s,
        &v,
        StatusCode::CONFLICT,
        "conflict",
        "sandbox was deleted",
    );
    let next = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
        .await
        .expect("stream ended promptly");
    match next {
        Some(Err(err)) => assert!(err.to_string().contains("sandbox was deleted"), "{err}"),
        other => panic!("expected the deleted error, got {other:?}"),
    }
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn exec_gathers_output_and_encodes_non_utf8() {
    let e = env().await;
    let id = e.create().await;
    let v = expect(
        StatusCode::OK,
        e.post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["sh", "-c", "x"]}),
        )
        .await,
    );
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["stdout"], "hi\n");
    assert_eq!(v["stdout_encoding"], "utf8");
    assert_eq!(v["stderr"], "//4=");
    assert_eq!(v["stderr_encoding"], "base64");
    assert_eq!(v["timed_out"], false);

    let v = expect(
        StatusCode::OK,
        e.post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["cat"], "stdin": "abc"}),
        )
        .await,
    );
    assert_eq!(v["stdout"], "abc");
    assert_eq!(v["exit_code"], 0);
}

#[tokio::test]
async fn exec_timeout_kills_the_process() {
    let e = env().await;
    let id = e.create().await;
    let v = expect(
        StatusCode::OK,
        e.post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["sleep", "30"], "timeout_s": 1}),
        )
        .await,
    );
    assert_eq!(v["timed_out"], true);
    assert_eq!(v["exit_code"], 137);
    assert_eq!(e.host.st().signals, vec![(42, Signal::Kill)]);
}

#[tokio::test]
async fn bad_exec_requests_are_rejected() {
    let e = env().await;
    let id = e.create().await;
    let p = format!("/v1/sandboxes/{id}/exec");
    let cases = [
        (json!({"cmd": []}), "cmd must not be empty"),
        (json!({"cmd": [""]}), "cmd[0]"),
        (json!({}), "cmd"),
        (
            json!({"cmd": ["ls"], "cwd": "tmp"}),
            "cwd must be an absolute path",
        ),
        (json!({"cmd": ["ls"], "timeout_s": 0}), "timeout_s"),
        (json!({"cmd": ["ls"], "timeout_s": 3601}), "timeout_s"),
        (json!({"cmd": ["ls"], "timeout_s": -1}), "got -1"),
        (
            json!({"cmd": ["ls"], "cwd": format!("/{}", "d".repeat(300))}),
            "cwd has a name longer than 255 bytes",
        ),
        (json!({"cmd": ["ls"], "user": "../root"}), "user"),
        (json!({"cmd": ["ls"], "env": {"A=B": "x"}}), "env key"),
    ];
    for (body, needle) in cases {
        let (s, v) = e.post(&e.key_a, &p, body.clone()).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", needle);
    }
    assert!(e.host.st().signals.is_empty());
}

#[tokio::test]
async fn delete_stops_the_sandbox_and_exec_then_conflicts() {
    let e = env().await;
    let id = e.create().await;
    let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(e.host.st().sandboxes.is_empty());
    let (s, v) = e.get(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["state"], "stopped");
    let (s, v) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::CONFLICT,
        "conflict",
        "sandbox is stopped",
    );
    // Deleting again is fine.
    let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn files_round_trip_and_limits() {
    let e = env().await;
    let id = e.create().await;
    let put = |path: &str, body: Vec<u8>| {
        Request::put(format!("/v1/sandboxes/{id}/files?path={path}"))
            .header("authorization", format!("Bearer {}", e.key_a))
            .header("content-type", "application/octet-stream")
            .body(Body::from(body))
            .unwrap()
    };
    let v = expect(
        StatusCode::OK,
        e.send(put("/tmp/a.bin", vec![7; 1000])).await,
    );
    assert_eq!(v, json!({"path": "/tmp/a.bin", "size": 1000}));

    let resp = e
        .router
        .clone()
        .oneshot(
            Request::get(format!("/v1/sandboxes/{id}/files?path=/tmp/a.bin"))
                .header("authorization", format!("Bearer {}", e.key_a))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .as_ref(),
        &[7u8; 1000][..]
    );

    let (s, v) = e
        .get(&e.key_a, &format!("/v1/sandboxes/{id}/files?path=/no/such"))
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "no such file");

    // Over max_upload_bytes (1024 in these tests).
    let (s, v) = e.send(put("/tmp/big", vec![0; 2000])).await;
    assert_error(
        s,
        &v,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "1024",
    );
    // Over the limit without a Content-Length: cut while streaming.
    let chunks =
        futures::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 600]))));
    let req = Request::put(format!("/v1/sandboxes/{id}/files?path=/tmp/big2"))
        .header("authorization", format!("Bearer {}", e.key_a))
        .body(Body::from_stream(chunks))
        .unwrap();
    let (s, v) = e.send(req).await;
    assert_error(
        s,
        &v,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "1024",
    );

    let long_name = format!("/tmp/{}", "a".repeat(256));
    for (path, needle) in [
        ("tmp/rel", "absolute"),
        ("/a%00b", "NUL"),
        ("", "absolute"),
        (long_name.as_str(), "longer than 255 bytes"),
    ] {
        let (s, v) = e.send(put(path, vec![1])).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", needle);
    }
    let req = Request::put(format!("/v1/sandboxes/{id}/files"))
        .header("authorization", format!("Bearer {}", e.key_a))
        .body(Body::from("x"))
        .unwrap();
    let (s, v) = e.send(req).await;
    assert_error(
        s,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "path is required",
    );
    assert_eq!(e.host.st().uploads, vec![("/tmp/a.bin".to_string(), 1000)]);
}

#[tokio::test]
async fn reconciler_marks_lost_sandboxes_stopped_and_destroys_expired_ones() {
    let e = env().await;
    let lost = e.create().await;
    let kept = e.create().await;
    // The host lost one sandbox (e.g. reaped or crashed).
    e.host.st().sandboxes.remove(&lost.parse().unwrap());
    let report = e.state.app().reconcile_once().await.unwrap();
    assert_eq!(report.lost, vec![lost.parse::<SandboxId>().unwrap()]);
    assert!(report.expired.is_empty());
    let (_, v) = e.get(&e.key_a, &format!("/v1/sandboxes/{lost}")).await;
    assert_eq!(v["state"], "stopped");
    let (_, v) = e.get(&e.key_a, &format!("/v1/sandboxes/{kept}")).await;
    assert_eq!(v["state"], "running");
    // A second pass changes nothing.
    let report = e.state.app().reconcile_once().await.unwrap();
    assert!(!report.changed(), "{report:?}");
}

#[tokio::test]
async fn reconciler_marks_sandboxes_failed_on_their_host_error() {
    let e = env().await;
    let id = e.create().await;
    let sid: SandboxId = id.parse().unwrap();
    // The VM rebooted itself: the host keeps it, in error.
    e.host
        .st()
        .failed
        .insert(sid.clone(), "the VM shut down or rebooted itself".into());
    let report = e.state.app().reconcile_once().await.unwrap();
    assert_eq!(report.failed, vec![sid]);
    let (_, v) = e.get(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(v["state"], "error", "{v}");
    assert_eq!(v["error"], "the VM shut down or rebooted itself", "{v}");
    // No exec on it; delete still asks the host to free what it holds.
    let (status, _) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/exec"),
            serde_json::json!({"cmd": ["true"]}),
        )
        .await;
    assert_eq!(status, 409);
    let destroys = e.host.st().destroys;
    let (status, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    assert_eq!(status, 204);
    assert_eq!(e.host.st().destroys, destroys + 1);
    assert!(!e.state.app().reconcile_once().await.unwrap().changed());
}

#[tokio::test]
async fn reconciler_gives_up_on_stuck_starts() {
    let e = env_with(Policy {
        create_timeout: std::time::Duration::from_secs(60),
        ..Policy::default()
    })
    .await;
    // A row a control plane wrote before it died mid-create, ten minutes ago.
    let host_id = e.host.host_id.clone().unwrap();
    let then = chrono::Utc::now() - chrono::Duration::minutes(10);
    let stuck = hearth_db::NewSandbox {
        id: SandboxId::generate(),
        team_id: e.team_a,
        template: "minimal".parse().unwrap(),
        state: SandboxState::Starting,
        vcpus: 1,
        memory_mb: 256,
        disk_size_mb: 1024,
        timeout_s: 3600,
        on_timeout: Default::default(),
        env: Default::default(),
        metadata: Default::default(),
        host_id: Some(host_id),
        created_at: then,
        expires_at: then + chrono::Duration::hours(2),
        secure: true,
        auto_resume: false,
    };
    e.state.app().db.insert_sandbox(&stuck).await.unwrap();
    let fresh = e.create().await;
    let report = e.state.app().reconcile_once().await.unwrap();
    assert_eq!(report.stale, vec![stuck.id.clone()]);
    assert_eq!(report.pruned, 0);
    assert_eq!(e.host.st().destroys, 1, "the host was not asked to free it");
    let row = e
        .state
        .app()
        .db
        .get_sandbox(e.team_a, &stuck.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, SandboxState::Error);
    assert!(row.error.unwrap().contains("did not finish starting"));
    let (_, v) = e.get(&e.key_a, &format!("/v1/sandboxes/{fresh}")).await;
    assert_eq!(v["state"], "running");
    // Nothing more to do on the next pass.
    assert!(!e.state.app().reconcile_once().await.unwrap().changed());
}

#[tokio::test]
async fn reconciler_prunes_finished_rows_after_the_retention() {
    let e = env_with(Policy {
        retention: std::time::Duration::ZERO,
        ..Policy::default()
    })
    .await;
    let gone = e.create().await;
    let kept = e.create().await;
    let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{gone}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let report = e.state.app().reconcile_once().await.unwrap();
    assert_eq!(report.pruned, 1, "{report:?}");
    let (_, v) = e.get(&e.key_a, "/v1/sandboxes?all=true").await;
    let ids: Vec<&str> = v["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, vec![kept.as_str()]);
}

#[tokio::test]
async fn bootstrap_creates_one_admin_key_once() {
    let db = Db::connect_in_memory().await.unwrap();
    let key = hearth_control::bootstrap(&db)
        .await
        .unwrap()
        .expect("first start");
    assert!(key.starts_with("hk_"));
    let p = db.authenticate(&key).await.unwrap().unwrap();
    assert!(p.is_admin);
    assert!(hearth_control::bootstrap(&db).await.unwrap().is_none());
}

#[tokio::test]
async fn start_serves_over_tcp_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("hearth.db").display()
    );
    let cfg = hearth_control::ControlConfig::new("127.0.0.1:0".parse().unwrap(), url.clone());
    let c = hearth_control::start(cfg).await.unwrap();
    assert!(c.bootstrap_key().is_some());
    let key = c.bootstrap_key().unwrap().to_owned();
    let client = reqwest::Client::new();
    let r = client
        .get(format!("http://{}/v1/sandboxes", c.local_addr()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    c.shutdown().await;
    // Second start on the same database: no new key.
    let cfg = hearth_control::ControlConfig::new("127.0.0.1:0".parse().unwrap(), url);
    let c = hearth_control::start(cfg).await.unwrap();
    assert!(c.bootstrap_key().is_none());
    c.shutdown().await;
}

#[test]
fn openapi_document_is_checked_in() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let spec = hearth_control::http::openapi::spec_json() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &spec).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == spec,
        "docs/openapi.json is stale: run UPDATE_OPENAPI=1 cargo test -p hearth-control --test api"
    );
}

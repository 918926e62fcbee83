//! Pause, resume, set-timeout, fork, snapshots and the templates catalogue through the
//! real router and database, against [`FakeHost`]; and what the reconciler does with
//! paused sandboxes and `on_timeout: pause`.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use connectrpc::ErrorCode;
use hearth_control::app::hosts::HostError;
use hearth_control::app::Policy;
use hearth_db::SandboxState;
use hearth_types::{SandboxId, TeamId, TeamQuota};
use serde_json::json;

use common::*;

fn host_failure() -> HostError {
    HostError::Rpc {
        code: ErrorCode::Internal,
        message: "injected".into(),
    }
}

async fn state_of(e: &Env, id: &str) -> SandboxState {
    e.state
        .app()
        .db
        .get_sandbox(e.team_a, &id.parse().unwrap())
        .await
        .unwrap()
        .unwrap()
        .state
}

#[tokio::test]
async fn pause_and_resume_round_trip_with_a_new_deadline() {
    let e = env().await;
    let id = e.create().await;
    let v = expect(
        StatusCode::OK,
        e.post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
            .await,
    );
    assert_eq!(v["state"], "paused");
    assert!(e.host.st().paused.contains(&id.parse().unwrap()));
    // Idempotent, and the host is not asked again.
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
        .await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("paused")));
    assert_eq!(e.host.st().pauses, 1);
    // Exec and files on a paused sandbox say to resume it.
    let (s, v) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/exec"),
            json!({"cmd": ["true"]}),
        )
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "resume it first");

    let before = chrono::Utc::now();
    let v = expect(
        StatusCode::OK,
        e.post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/resume"),
            json!({"timeout_s": 7200}),
        )
        .await,
    );
    assert_eq!(
        (v["state"].as_str(), v["timeout_s"].as_u64()),
        (Some("running"), Some(7200))
    );
    let exp = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let left = exp.signed_duration_since(before).num_seconds();
    assert!(
        (7199..=7210).contains(&left),
        "deadline {left} s from the resume"
    );
    assert!(!e.host.st().paused.contains(&id.parse().unwrap()));
    // The host never gets a deadline of its own: the control plane owns it.
    assert!(e.host.st().deadlines.iter().all(|d| *d == 0));

    // Resume without a body keeps the lifetime.
    e.post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
        .await;
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/resume"))
        .await;
    assert_eq!(
        (s, v["timeout_s"].as_u64()),
        (StatusCode::OK, Some(7200)),
        "{v}"
    );
}

#[tokio::test]
async fn lifecycle_calls_in_the_wrong_state_or_with_bad_input_are_refused() {
    let e = env().await;
    let id = e.create().await;
    let p = |op: &str| format!("/v1/sandboxes/{id}/{op}");
    // Resume a running one; set a bad timeout; fork bad counts; snapshot bad names.
    let (s, v) = e.post_empty(&e.key_a, &p("resume")).await;
    assert_error(
        s,
        &v,
        StatusCode::CONFLICT,
        "conflict",
        "sandbox is running: only a paused sandbox",
    );
    for (op, body, needle) in [
        ("timeout", json!({}), "timeout_s is required"),
        (
            "timeout",
            json!({"timeout_s": 0}),
            "timeout_s must be between 1",
        ),
        ("timeout", json!({"timeout_s": -5}), "got -5"),
        ("resume", json!({"timeout_s": 0}), "timeout_s"),
        (
            "fork",
            json!({"count": 0}),
            "count must be between 1 and 16, got 0",
        ),
        ("fork", json!({"count": 17}), "got 17"),
        ("fork", json!({"count": "two"}), "count"),
        ("snapshots", json!({"name": "Bad Name"}), "template name"),
        ("snapshots", json!({"name": "../x"}), "template name"),
        ("snapshots", json!({"name": "snap-mine"}), "reserved"),
        ("snapshots", json!({}), "name"),
    ] {
        let (s, v) = e.post(&e.key_a, &p(op), body.clone()).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST, "invalid_argument", needle);
    }
    // Snapshot names the platform or the team already has.
    let (s, v) = e
        .post(&e.key_a, &p("snapshots"), json!({"name": "minimal"}))
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "platform template");
    // Bad and unknown IDs, another team's sandbox.
    for op in ["pause", "resume", "timeout", "fork", "snapshots"] {
        // Each its own valid body (bodies take no field they do not define).
        let body = Some(match op {
            "resume" | "timeout" => json!({"timeout_s": 10}),
            "snapshots" => json!({"name": "x"}),
            _ => json!({}),
        });
        let (s, v) = e
            .call(
                "POST",
                &format!("/v1/sandboxes/sb-bad/{op}"),
                Some(&e.key_a),
                body.clone(),
            )
            .await;
        assert_error(
            s,
            &v,
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "sandbox ID",
        );
        let unknown = SandboxId::generate();
        let (s, v) = e
            .call(
                "POST",
                &format!("/v1/sandboxes/{unknown}/{op}"),
                Some(&e.key_a),
                body.clone(),
            )
            .await;
        assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "not found");
        let (s, v) = e.call("POST", &p(op), Some(&e.key_b), body).await;
        assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "not found");
    }
    assert_eq!(state_of(&e, &id).await, SandboxState::Running);
    // Paused: no fork, no new timeout (it says where the timeout goes).
    e.post_empty(&e.key_a, &p("pause")).await;
    let (s, v) = e.post_empty(&e.key_a, &p("fork")).await;
    assert_error(
        s,
        &v,
        StatusCode::CONFLICT,
        "conflict",
        "only a running sandbox can be forked",
    );
    let (s, v) = e
        .post(&e.key_a, &p("timeout"), json!({"timeout_s": 60}))
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "resume");
    // Stopped: nothing.
    e.delete(&e.key_a, &format!("/v1/sandboxes/{id}")).await;
    for op in ["pause", "resume", "fork"] {
        let (s, v) = e.post_empty(&e.key_a, &p(op)).await;
        assert_error(
            s,
            &v,
            StatusCode::CONFLICT,
            "conflict",
            "sandbox is stopped",
        );
    }
    let (s, v) = e
        .post(&e.key_a, &p("snapshots"), json!({"name": "late"}))
        .await;
    assert_error(
        s,
        &v,
        StatusCode::CONFLICT,
        "conflict",
        "sandbox is stopped",
    );
    assert_eq!(e.host.st().forks, 0);
    assert!(e.host.st().templates.is_empty());
}

#[tokio::test]
async fn failed_pause_leaves_it_running_and_failed_resume_leaves_it_paused() {
    let e = env().await;
    let id = e.create().await;
    e.host.st().fail_pause = Some(host_failure());
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
        .await;
    assert_error(
        s,
        &v,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "still running",
    );
    assert_eq!(state_of(&e, &id).await, SandboxState::Running);
    e.host.st().fail_pause = None;
    let (s, _) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
        .await;
    assert_eq!(s, StatusCode::OK);

    e.host.st().fail_resume = Some(HostError::Rpc {
        code: ErrorCode::Unavailable,
        message: "restore failed".into(),
    });
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/resume"))
        .await;
    assert_error(
        s,
        &v,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "retry",
    );
    assert_eq!(state_of(&e, &id).await, SandboxState::Paused);
    // Its quota is as a paused one's (no vCPUs), and a retry works.
    let usage = e.state.app().db.team_usage(e.team_a).await.unwrap();
    assert_eq!((usage.sandboxes, usage.vcpus), (1, 0));
    e.host.st().fail_resume = None;
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/resume"))
        .await;
    assert_eq!(
        (s, v["state"].as_str()),
        (StatusCode::OK, Some("running")),
        "{v}"
    );
}

#[tokio::test]
async fn resume_passes_the_vcpu_quota_like_a_create() {
    let e = env().await;
    e.state
        .app()
        .db
        .set_team_quota(
            e.team_a,
            Some(&TeamQuota {
                max_sandboxes: 5,
                max_vcpus: 1,
                ..TeamQuota::default()
            }),
        )
        .await
        .unwrap();
    let first = e.create().await;
    e.post_empty(&e.key_a, &format!("/v1/sandboxes/{first}/pause"))
        .await;
    // The paused one holds no vCPU: a second fits.
    let second = e.create().await;
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{first}/resume"))
        .await;
    assert_error(
        s,
        &v,
        StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
        "vCPUs",
    );
    assert_eq!(state_of(&e, &first).await, SandboxState::Paused);
    assert_eq!(e.host.st().resumes, 0, "refused before the host was asked");
    e.delete(&e.key_a, &format!("/v1/sandboxes/{second}")).await;
    let (s, _) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{first}/resume"))
        .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn set_timeout_moves_the_deadline_of_a_running_sandbox() {
    let e = env().await;
    let id = e.create().await;
    let before = chrono::Utc::now();
    let v = expect(
        StatusCode::OK,
        e.post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/timeout"),
            json!({"timeout_s": 5}),
        )
        .await,
    );
    assert_eq!(v["timeout_s"], 5);
    let exp = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    assert!((4..=6).contains(&exp.signed_duration_since(before).num_seconds()));
}

#[tokio::test]
async fn fork_makes_running_copies_counted_against_the_quota() {
    let e = env().await;
    let v = expect(StatusCode::CREATED, e
        .post(&e.key_a, "/v1/sandboxes", json!({"template": "minimal", "vcpus": 2, "env": {"A": "1"}, "metadata": {"k": "v"}, "on_timeout": "pause"}))
        .await);
    let id = v["id"].as_str().unwrap().to_owned();
    let v = expect(
        StatusCode::CREATED,
        e.post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/fork"),
            json!({"count": 3}),
        )
        .await,
    );
    let copies = v["sandboxes"].as_array().unwrap();
    assert_eq!(copies.len(), 3);
    let mut ids: Vec<&str> = copies.iter().map(|c| c["id"].as_str().unwrap()).collect();
    for c in copies {
        assert_eq!(c["state"], "running");
        assert_eq!(
            (c["vcpus"].as_u64(), c["on_timeout"].as_str()),
            (Some(2), Some("pause"))
        );
        assert_eq!(c["metadata"]["k"], "v");
        assert_eq!(c["host_id"], v["sandboxes"][0]["host_id"]);
        assert!(e
            .host
            .st()
            .sandboxes
            .contains(&c["id"].as_str().unwrap().parse().unwrap()));
    }
    ids.push(&id);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "fresh IDs");
    assert_eq!(state_of(&e, &id).await, SandboxState::Running);
    // No body: one copy.
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/fork"))
        .await;
    assert_eq!(
        (s, v["sandboxes"].as_array().map(Vec::len)),
        (StatusCode::CREATED, Some(1))
    );

    // Quota: 5 sandboxes now, at most 6: a fork of 2 is refused whole.
    e.state
        .app()
        .db
        .set_team_quota(
            e.team_a,
            Some(&TeamQuota {
                max_sandboxes: 6,
                ..TeamQuota::default()
            }),
        )
        .await
        .unwrap();
    let forks = e.host.st().forks;
    let (s, v) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/fork"),
            json!({"count": 2}),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
        "6 concurrent",
    );
    assert_eq!(e.host.st().forks, forks);
    assert_eq!(e.row_count().await, 5);
}

#[tokio::test]
async fn a_failed_fork_leaves_no_rows_and_gives_the_quota_back() {
    let e = env().await;
    let id = e.create().await;
    e.host.st().fail_fork = Some(host_failure());
    let (s, v) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/fork"),
            json!({"count": 4}),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "original is unchanged",
    );
    assert_eq!(e.row_count().await, 1);
    assert_eq!(
        e.state
            .app()
            .db
            .team_usage(e.team_a)
            .await
            .unwrap()
            .sandboxes,
        1
    );
    assert_eq!(e.host.st().sandboxes.len(), 1);
    assert_eq!(state_of(&e, &id).await, SandboxState::Running);
    // Out of host capacity is a 409 naming it, and leaves nothing either.
    e.host.st().fail_fork = Some(HostError::Rpc {
        code: ErrorCode::ResourceExhausted,
        message: "host memory: this sandbox needs 256 MiB".into(),
    });
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/fork"))
        .await;
    assert_error(
        s,
        &v,
        StatusCode::CONFLICT,
        "capacity_exceeded",
        "host memory",
    );
    assert_eq!(e.row_count().await, 1);
}

#[tokio::test]
async fn snapshots_become_team_templates_that_create_sandboxes_on_their_host() {
    let e = env().await;
    let id = e.create().await;
    let (s, t) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "prepared", "memory": true}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(
        (t["name"].as_str(), t["has_memory"].as_bool()),
        (Some("prepared"), Some(true))
    );
    assert_eq!(t["source_sandbox_id"], id.as_str());
    assert_eq!(t["team_id"], e.team_a.to_string());
    assert_eq!(
        (t["allocated_bytes"].as_u64(), t["size_bytes"].as_u64()),
        (Some(3 << 20), Some(64 << 20))
    );
    // On the host under a host-level name, never the team's.
    let host_names: Vec<String> = e
        .host
        .st()
        .templates
        .keys()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(host_names.len(), 1);
    let hn = &host_names[0];
    assert!(hn.starts_with("snap-") && hn.len() == 21, "{hn}");
    // The source keeps running; the name is taken now.
    assert_eq!(state_of(&e, &id).await, SandboxState::Running);
    let (s, v) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "prepared"}),
        )
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "already exists");

    // Listed for team A beside the platform's, invisible to team B.
    let (_, list) = e.get(&e.key_a, "/v1/templates").await;
    let names: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["minimal", "prepared"]);
    let (_, list) = e.get(&e.key_b, "/v1/templates").await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);
    // The reconciler does not turn the host-level name into a platform template.
    e.state.app().reconcile_once().await.unwrap();
    let (_, list) = e.get(&e.key_b, "/v1/templates").await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1, "{list}");

    // A create from it: the host is asked for the host-level name; the disk defaults to
    // the template's and may not be smaller.
    let v = expect(
        StatusCode::CREATED,
        e.post(&e.key_a, "/v1/sandboxes", json!({"template": "prepared"}))
            .await,
    );
    assert_eq!(
        (v["template"].as_str(), v["disk_size_mb"].as_u64()),
        (Some("prepared"), Some(512))
    );
    let child: SandboxId = v["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(e.host.st().made_from[&child].as_str(), hn);
    let (s, v) = e
        .post(
            &e.key_a,
            "/v1/sandboxes",
            json!({"template": "prepared", "disk_size_mb": 256}),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "at least 512",
    );
    let (s, v) = e
        .post(&e.key_b, "/v1/sandboxes", json!({"template": "prepared"}))
        .await;
    assert_error(
        s,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "template 'prepared' not found",
    );

    // Delete: refused while in use, another team's is a 404, then gone everywhere.
    let (s, v) = e.delete(&e.key_a, "/v1/templates/prepared").await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "used by 1 active");
    let (s, v) = e.delete(&e.key_b, "/v1/templates/prepared").await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "not found");
    let (s, v) = e.delete(&e.key_a, "/v1/templates/minimal").await;
    assert_error(s, &v, StatusCode::FORBIDDEN, "forbidden", "only an admin");
    let (s, v) = e.delete(&e.key_a, "/v1/templates/Bad.Name").await;
    assert_error(
        s,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "template name",
    );
    e.delete(&e.key_a, &format!("/v1/sandboxes/{child}")).await;
    let (s, _) = e.delete(&e.key_a, "/v1/templates/prepared").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(e.host.st().templates.is_empty());
    let (_, list) = e.get(&e.key_a, "/v1/templates").await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_snapshot_records_nothing_and_a_paused_one_can_be_snapshotted() {
    let e = env().await;
    let id = e.create().await;
    e.host.st().fail_snapshot = Some(host_failure());
    let (s, v) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "x1"}),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "snapshotting the sandbox failed",
    );
    let (_, list) = e.get(&e.key_a, "/v1/templates").await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 1);
    e.host.st().fail_snapshot = None;
    e.post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
        .await;
    let (s, v) = e
        .post(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/snapshots"),
            json!({"name": "x1"}),
        )
        .await;
    assert_eq!(
        (s, v["has_memory"].as_bool()),
        (StatusCode::CREATED, Some(false)),
        "{v}"
    );
    assert_eq!(state_of(&e, &id).await, SandboxState::Paused);
}

#[tokio::test]
async fn on_timeout_pause_pauses_at_expiry_and_paused_retention_destroys() {
    let e = env_with(Policy {
        transition_grace: Duration::ZERO,
        paused_retention: Duration::from_secs(3600),
        ..Policy::default()
    })
    .await;
    let (s, v) = e
        .post(
            &e.key_a,
            "/v1/sandboxes",
            json!({"template": "minimal", "timeout_s": 1, "on_timeout": "pause"}),
        )
        .await;
    assert_eq!(
        (s, v["on_timeout"].as_str()),
        (StatusCode::CREATED, Some("pause")),
        "{v}"
    );
    let pausing = v["id"].as_str().unwrap().to_owned();
    let (s, v) = e
        .post(
            &e.key_a,
            "/v1/sandboxes",
            json!({"template": "minimal", "timeout_s": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let destroying = v["id"].as_str().unwrap().to_owned();
    let (s, v) = e
        .post(
            &e.key_a,
            "/v1/sandboxes",
            json!({"template": "minimal", "on_timeout": "sleep"}),
        )
        .await;
    assert_error(
        s,
        &v,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "on_timeout must be",
    );
    // Past both deadlines.
    let past = chrono::Utc::now() - chrono::Duration::seconds(5);
    for id in [&pausing, &destroying] {
        e.state
            .app()
            .db
            .set_sandbox_deadline(e.team_a, &id.parse().unwrap(), past, 1)
            .await
            .unwrap();
    }
    let r = e.state.app().reconcile_once().await.unwrap();
    assert_eq!(r.paused, vec![pausing.parse::<SandboxId>().unwrap()]);
    assert_eq!(r.expired, vec![destroying.parse::<SandboxId>().unwrap()]);
    assert_eq!(state_of(&e, &pausing).await, SandboxState::Paused);
    assert!(e.host.st().paused.contains(&pausing.parse().unwrap()));
    // A second pass leaves the fresh paused one alone.
    let r = e.state.app().reconcile_once().await.unwrap();
    assert!(!r.changed(), "{r:?}");
    // Retention over (seen from an hour later): destroyed.
    let e2 = e.state.app().clone();
    let app = std::sync::Arc::new(
        hearth_control::App::new(
            e2.db.clone(),
            vec![e.host.clone() as std::sync::Arc<dyn hearth_control::HostClient>],
            hearth_types::SandboxLimits::default(),
            1024,
        )
        .with_policy(Policy {
            transition_grace: Duration::ZERO,
            paused_retention: Duration::ZERO,
            ..Policy::default()
        }),
    );
    let r = app.reconcile_once().await.unwrap();
    assert_eq!(r.retired, vec![pausing.parse::<SandboxId>().unwrap()]);
    assert_eq!(state_of(&e, &pausing).await, SandboxState::Stopped);
    assert!(e.host.st().sandboxes.is_empty());
}

#[tokio::test]
async fn the_reconciler_settles_pauses_cut_off_between_host_and_database() {
    let e = env_with(Policy {
        transition_grace: Duration::from_secs(3600),
        ..Policy::default()
    })
    .await;
    let a = e.create().await;
    let b = e.create().await;
    let c = e.create().await;
    // a: the host paused it, the database never heard (crash in between).
    e.host.st().paused.insert(a.parse().unwrap());
    // b: marked paused, the host call never happened.
    e.state
        .app()
        .db
        .transition_sandbox(
            &b.parse().unwrap(),
            SandboxState::Running,
            SandboxState::Paused,
            None,
        )
        .await
        .unwrap();
    // c: paused properly, then lost on its host.
    e.post_empty(&e.key_a, &format!("/v1/sandboxes/{c}/pause"))
        .await;
    e.host.st().sandboxes.remove(&c.parse().unwrap());
    // Within the grace period nothing is touched.
    let r = e.state.app().reconcile_once().await.unwrap();
    assert!(!r.changed(), "{r:?}");
    // Once settled, the host is right.
    let app = std::sync::Arc::new(
        hearth_control::App::new(
            e.state.app().db.clone(),
            vec![e.host.clone() as std::sync::Arc<dyn hearth_control::HostClient>],
            hearth_types::SandboxLimits::default(),
            1024,
        )
        .with_policy(Policy {
            transition_grace: Duration::ZERO,
            ..Policy::default()
        }),
    );
    let r = app.reconcile_once().await.unwrap();
    let mut corrected = r.corrected.clone();
    corrected.sort();
    let mut want: Vec<SandboxId> = vec![a.parse().unwrap(), b.parse().unwrap()];
    want.sort();
    assert_eq!(corrected, want);
    assert_eq!(r.lost, vec![c.parse::<SandboxId>().unwrap()]);
    assert_eq!(state_of(&e, &a).await, SandboxState::Paused);
    assert_eq!(state_of(&e, &b).await, SandboxState::Running);
    assert_eq!(state_of(&e, &c).await, SandboxState::Error);
}

#[tokio::test]
async fn processes_can_be_listed_and_reattached_after_a_resume() {
    let e = env().await;
    let id = e.create().await;
    e.host
        .st()
        .procs
        .push(hearth_control::app::hosts::ProcInfo {
            pid: 7,
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), "while true; do date; sleep 1; done".into()],
            cwd: Some("/".into()),
            tag: None,
        });
    e.post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
        .await;
    let (s, v) = e
        .get(&e.key_a, &format!("/v1/sandboxes/{id}/processes"))
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "resume it first");
    let (s, v) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/processes/7/connect"))
        .await;
    assert_error(s, &v, StatusCode::CONFLICT, "conflict", "paused");
    e.post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/resume"))
        .await;
    let v = expect(
        StatusCode::OK,
        e.get(&e.key_a, &format!("/v1/sandboxes/{id}/processes"))
            .await,
    );
    assert_eq!(v["processes"][0]["pid"], 7);
    assert_eq!(v["processes"][0]["args"][0], "-c");
    // Connect: NDJSON events until the process ends.
    let (s, v) = e
        .post_empty(
            &e.key_a,
            &format!("/v1/sandboxes/{id}/processes/7/connect?timeout_s=30"),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let text = v.as_str().unwrap().to_owned();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "stdout");
    assert_eq!(lines[0]["data"], "c3RpbGwgY291bnRpbmcK"); // "still counting\n"
    assert_eq!(lines.last().unwrap()["type"], "exit");
    assert_eq!(lines.last().unwrap()["exit_code"], 0);
    // Bad and unknown pids, bad timeouts, another team.
    for (path, want, needle) in [
        (
            "processes/0/connect",
            StatusCode::BAD_REQUEST,
            "pid must be",
        ),
        (
            "processes/x/connect",
            StatusCode::BAD_REQUEST,
            "pid must be",
        ),
        ("processes/8/connect", StatusCode::NOT_FOUND, "pid 8"),
        (
            "processes/7/connect?timeout_s=0",
            StatusCode::BAD_REQUEST,
            "timeout_s",
        ),
        (
            "processes/7/connect?timeout_s=99999",
            StatusCode::BAD_REQUEST,
            "timeout_s",
        ),
    ] {
        let (s, v) = e
            .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/{path}"))
            .await;
        assert_eq!(s, want, "{path}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{path}: {v}"
        );
    }
    let (s, v) = e
        .get(&e.key_b, &format!("/v1/sandboxes/{id}/processes"))
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "not found");
}

#[tokio::test]
async fn a_template_is_read_by_name_with_its_source_and_hosts_and_only_by_its_team() {
    let e = env().await;
    let host_id = e.host.host_id.clone().unwrap().to_string();
    let id = e.create().await;
    let (s, t) = e
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/snapshots"),
            Some(&e.key_a),
            Some(json!({"name": "prepared"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["hosts"], json!([host_id]), "{t}");
    let (s, t) = e
        .call("GET", "/v1/templates/prepared", Some(&e.key_a), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(
        (t["name"].as_str(), t["source"].as_str()),
        (Some("prepared"), Some("snapshot"))
    );
    assert_eq!(t["source_sandbox_id"], id.as_str());
    assert_eq!(t["team_id"], e.team_a.to_string());
    assert_eq!(t["hosts"], json!([host_id]));
    // Another team: as if it did not exist.
    let (s, v) = e
        .call("GET", "/v1/templates/prepared", Some(&e.key_b), None)
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "prepared");
    let (s, v) = e
        .call("DELETE", "/v1/templates/prepared", Some(&e.key_b), None)
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND, "not_found", "prepared");
    // A platform template: every team reads it, built in, on the host that lists it.
    for key in [&e.key_a, &e.key_b] {
        let (s, t) = e
            .call("GET", "/v1/templates/minimal", Some(key), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{t}");
        assert_eq!(t["source"], "built-in");
        assert_eq!(t["team_id"], TeamId::PLATFORM.to_string());
        assert_eq!(t["hosts"], json!([host_id]), "{t}");
    }
    // Bad names are 400, unknown ones 404, no key 401.
    for bad in ["..", "a%2Fb", "UPPER", &"x".repeat(200)] {
        let (s, v) = e
            .call("GET", &format!("/v1/templates/{bad}"), Some(&e.key_a), None)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let (s, _) = e
        .call("GET", "/v1/templates/nothing-here", Some(&e.key_a), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e.call("GET", "/v1/templates/minimal", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Deleted by its team: gone from its host and from the catalogue.
    let (s, v) = e
        .call("DELETE", "/v1/templates/prepared", Some(&e.key_a), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert!(e.host.st().templates.is_empty());
    let (s, _) = e
        .call("GET", "/v1/templates/prepared", Some(&e.key_a), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

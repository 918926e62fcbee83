//! Placement through the real router over several fake hosts with capacities: fit,
//! placements in flight between reports, warmth, a team's spread, and refusals that
//! name the shortage and leave no row.

mod common;

use axum::http::StatusCode;
use common::{assert_error, env_hosts, Env, FakeHost};
use hearth_control::app::hosts::WarmShape;
use hearth_control::app::Policy;
use hearth_db::NewApiKey;
use hearth_types::{HostId, TeamId};
use serde_json::{json, Value};

fn id_of(h: &FakeHost) -> HostId {
    h.host_id.clone().unwrap()
}

/// Which host the API says sandbox `v` is on.
fn host_of(e: &Env, v: &Value) -> usize {
    let id = v["host_id"].as_str().expect("a host_id");
    e.hosts
        .iter()
        .position(|h| id_of(h).as_str() == id)
        .unwrap_or_else(|| panic!("unknown host {id}"))
}

/// A key of a new team of its own.
async fn new_team(e: &Env, name: &str) -> (TeamId, String) {
    let db = &e.state.app().db;
    let team = db.create_team(name).await.unwrap().id;
    let (_, key) = db
        .create_api_key(&NewApiKey::new(team, "k", false))
        .await
        .unwrap();
    (team, key)
}

async fn create(e: &Env, key: &str, body: Value) -> (StatusCode, Value) {
    e.call("POST", "/v1/sandboxes", Some(key), Some(body)).await
}

fn minimal() -> Value {
    json!({"template": "minimal"})
}

/// The default shape's warm variant of `minimal` on `h`, with `pooled` ready VMs.
fn make_warm(h: &FakeHost, pooled: u32) {
    h.st().warm = vec![WarmShape {
        template: "minimal".parse().unwrap(),
        vcpus: 1,
        memory_mb: 256,
        disk_size_mb: 1024,
        pooled,
    }];
}

#[tokio::test]
async fn a_teams_sandboxes_spread_over_hosts() {
    let hosts = vec![FakeHost::new(), FakeHost::new(), FakeHost::new()];
    let e = env_hosts(Policy::default(), hosts).await;
    let mut per_host = [0; 3];
    for _ in 0..6 {
        let (s, v) = create(&e, &e.key_a, minimal()).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        per_host[host_of(&e, &v)] += 1;
    }
    assert_eq!(
        per_host,
        [2, 2, 2],
        "reports were never refreshed in between"
    );
    // Another team starts its own spread: the host the reconciler now reports
    // lightest (all equal) with the fewest of team b's, i.e. any; then the next.
    e.state.app().reconcile_once().await.unwrap();
    let (_, v1) = create(&e, &e.key_b, minimal()).await;
    let (_, v2) = create(&e, &e.key_b, minimal()).await;
    assert_ne!(host_of(&e, &v1), host_of(&e, &v2));
}

#[tokio::test]
async fn creates_between_reports_count_against_the_host_they_went_to() {
    // Host 0 is warm (preferred) but has room for one default sandbox; host 1 for many.
    let small = FakeHost::with_capacity(8, 256, 100_000);
    let big = FakeHost::new();
    make_warm(&small, 0);
    let e = env_hosts(Policy::default(), vec![small.clone(), big.clone()]).await;
    for h in [&small, &big] {
        h.st().create_delay = Some(std::time::Duration::from_millis(200));
    }
    // Three teams at once (no spread among them): each pick sees the others' placements.
    let keys = [
        new_team(&e, "t1").await.1,
        new_team(&e, "t2").await.1,
        new_team(&e, "t3").await.1,
    ];
    let (r1, r2, r3) = tokio::join!(
        create(&e, &keys[0], minimal()),
        create(&e, &keys[1], minimal()),
        create(&e, &keys[2], minimal())
    );
    let mut on = [0; 2];
    let mut on_small = None;
    for (n, (s, v)) in [r1, r2, r3].into_iter().enumerate() {
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let h = host_of(&e, &v);
        on[h] += 1;
        if h == 0 {
            on_small = Some((n, v["id"].as_str().unwrap().to_owned()));
        }
    }
    assert_eq!(on, [1, 2], "one on the warm host, the rest where they fit");
    assert_eq!(small.st().creates, 1, "the full host was never asked");

    // Landed placements stay counted until the next report, which counts them itself.
    let (_, k4) = new_team(&e, "t4").await;
    let (s, v) = create(&e, &k4, minimal()).await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 1), "{v}");
    e.state.app().reconcile_once().await.unwrap();
    let (_, k5) = new_team(&e, "t5").await;
    let (s, v) = create(&e, &k5, minimal()).await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 1), "{v}");

    // Once the warm host's sandbox is gone and reported, it is first again.
    let (n, id) = on_small.expect("one sandbox on the warm host");
    let (s, v) = e
        .call(
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            Some(&keys[n]),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    e.state.app().reconcile_once().await.unwrap();
    let (_, k6) = new_team(&e, "t6").await;
    let (s, v) = create(&e, &k6, minimal()).await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 0), "{v}");
}

#[tokio::test]
async fn a_failed_create_gives_its_reservation_back() {
    let small = FakeHost::with_capacity(8, 256, 100_000);
    let big = FakeHost::new();
    make_warm(&small, 1);
    let e = env_hosts(Policy::default(), vec![small.clone(), big.clone()]).await;
    small.st().fail_create = Some(hearth_control::app::hosts::HostError::Rpc {
        code: connectrpc::ErrorCode::Internal,
        message: "the VM did not boot".into(),
    });
    let (s, v) = create(&e, &e.key_a, minimal()).await;
    assert!(s.is_server_error(), "{s} {v}");
    small.st().fail_create = None;
    // No report in between: had the failed placement stayed held, this would go to
    // the other host. (Team b: team a's error row does not count, but be plain.)
    let (s, v) = create(&e, &e.key_b, minimal()).await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 0), "{v}");
}

#[tokio::test]
async fn warm_hosts_and_pooled_vms_are_preferred_for_their_shape_only() {
    let cold = FakeHost::new();
    let warm = FakeHost::new();
    let pooled = FakeHost::new();
    make_warm(&warm, 0);
    make_warm(&pooled, 2);
    let e = env_hosts(
        Policy::default(),
        vec![cold.clone(), warm.clone(), pooled.clone()],
    )
    .await;
    let (s, v) = create(&e, &e.key_a, minimal()).await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 2), "{v}");
    let (s, v) = create(&e, &e.key_b, minimal()).await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 2), "{v}");
    // Another shape restores nowhere: the least loaded (not the pooled host, which
    // now holds two sandboxes; the other two are equal, so the lower host ID).
    let (s, v) = create(
        &e,
        &e.key_a,
        json!({"template": "minimal", "memory_mb": 512}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_ne!(host_of(&e, &v), 2, "{v}");
}

#[tokio::test]
async fn no_fit_is_a_409_naming_the_shortage_and_the_most_free_host() {
    let a = FakeHost::with_capacity(1, 3000, 100_000);
    let b = FakeHost::with_capacity(2, 2000, 100_000);
    let e = env_hosts(Policy::default(), vec![a.clone(), b.clone()]).await;
    let (s, v) = create(
        &e,
        &e.key_a,
        json!({"template": "minimal", "vcpus": 2, "memory_mb": 4096}),
    )
    .await;
    let want = format!(
        "no host can take 2 vCPUs, 4096 MiB of memory and 1024 MiB of disk: the most free is {} \
         with 1 vCPU, 3000 MiB of memory, 100000 MiB of disk and 64 free sandbox slots (short of \
         vCPUs and memory)",
        id_of(&a)
    );
    assert_error(s, &v, StatusCode::CONFLICT, "capacity_exceeded", &want);
    assert_eq!(e.row_count().await, 0, "a refusal leaves no row");
    assert_eq!(a.st().creates + b.st().creates, 0, "no host was asked");
    // What does fit goes where it fits.
    let (s, v) = create(
        &e,
        &e.key_a,
        json!({"template": "minimal", "vcpus": 2, "memory_mb": 1024}),
    )
    .await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 1), "{v}");
}

#[tokio::test]
async fn a_template_no_host_holds_and_no_host_at_all_are_told_apart() {
    let e = env_hosts(Policy::default(), vec![FakeHost::new()]).await;
    let db = &e.state.app().db;
    // In the catalogue (a host that held it is away), on no answering host.
    db.upsert_template(TeamId::PLATFORM, &"python".parse().unwrap(), 0)
        .await
        .unwrap();
    let (s, v) = create(&e, &e.key_a, json!({"template": "python"})).await;
    assert_error(
        s,
        &v,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "no reachable host holds template 'python'",
    );
    assert_eq!(e.row_count().await, 0);

    // A control plane whose only host never answered.
    let away = FakeHost::new();
    away.st().fail_info = true;
    let e = env_hosts(Policy::default(), vec![away]).await;
    e.state
        .app()
        .db
        .upsert_template(TeamId::PLATFORM, &"minimal".parse().unwrap(), 0)
        .await
        .unwrap();
    let (s, v) = create(&e, &e.key_a, minimal()).await;
    assert_error(
        s,
        &v,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "no host agent is reachable",
    );
}

#[tokio::test]
async fn a_snapshot_goes_to_its_host_only_and_is_refused_when_that_host_is_full() {
    // Host a is warm (so the source goes there) and has room for two 256 MiB sandboxes.
    let a = FakeHost::with_capacity(8, 512, 100_000);
    let b = FakeHost::new();
    make_warm(&a, 0);
    let e = env_hosts(Policy::default(), vec![a.clone(), b.clone()]).await;
    let (s, v) = create(&e, &e.key_a, minimal()).await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 0), "{v}");
    let src = v["id"].as_str().unwrap().to_owned();
    let (s, t) = e
        .call(
            "POST",
            &format!("/v1/sandboxes/{src}/snapshots"),
            Some(&e.key_a),
            Some(json!({"name": "mine", "memory": true})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    e.state.app().reconcile_once().await.unwrap();
    // Team a's spread would send it to host b; the snapshot lives on host a.
    let (s, v) = create(&e, &e.key_a, json!({"template": "mine"})).await;
    assert_eq!((s, host_of(&e, &v)), (StatusCode::CREATED, 0), "{v}");
    // Host a is full now: refused, although host b has room, and the message never
    // names the snapshot's host-level name.
    let (s, v) = create(&e, &e.key_a, json!({"template": "mine"})).await;
    assert_error(
        s,
        &v,
        StatusCode::CONFLICT,
        "capacity_exceeded",
        "short of memory",
    );
    assert!(!v.to_string().contains("snap-"), "{v}");
    assert_eq!(b.st().creates, 0);
}

#[tokio::test]
async fn creates_over_the_teams_quota_never_hold_host_capacity() {
    // Room for exactly two default sandboxes; a quota of two; six at once.
    let host = FakeHost::with_capacity(8, 512, 100_000);
    host.st().create_delay = Some(std::time::Duration::from_millis(200));
    let mut policy = Policy::default();
    policy.team_quota.max_sandboxes = 2;
    let e = env_hosts(policy, vec![host.clone()]).await;
    let burst = (0..6).map(|_| create(&e, &e.key_a, minimal()));
    let mut statuses: Vec<u16> = futures::future::join_all(burst)
        .await
        .into_iter()
        .map(|(s, _)| s.as_u16())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [201, 201, 429, 429, 429, 429], "never a 409");
    assert_eq!(host.st().creates, 2);
    assert_eq!(e.row_count().await, 2);
}

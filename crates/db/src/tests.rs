use std::collections::BTreeMap;

use chrono::{Duration, Utc};
use hearth_types::{HostId, SandboxId, TeamId, TeamQuota, TemplateName};

use crate::{Db, DbError, NewApiKey, NewSandbox, SandboxState, LAST_USED_GRANULARITY_MS};

fn new_sandbox(team: TeamId, host: Option<HostId>) -> NewSandbox {
    let now = Utc::now();
    NewSandbox {
        id: SandboxId::generate(),
        team_id: team,
        template: "minimal".parse().unwrap(),
        state: SandboxState::Starting,
        vcpus: 1,
        memory_mb: 256,
        disk_size_mb: 1024,
        timeout_s: 300,
        on_timeout: crate::OnTimeout::Destroy,
        env: BTreeMap::from([("A".into(), "1".into())]),
        metadata: BTreeMap::from([("owner".into(), "me".into())]),
        host_id: host,
        created_at: now,
        expires_at: now + Duration::seconds(300),
        secure: true,
        auto_resume: false,
    }
}

#[tokio::test]
async fn migrations_apply_to_a_file_database_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("hearth.db").display()
    );
    let db = Db::connect(&url).await.unwrap();
    let team = db.create_team("t").await.unwrap();
    db.close().await;
    // Reopening runs the (already applied) migrations again without error and keeps data.
    let db = Db::connect(&url).await.unwrap();
    assert_eq!(db.list_teams().await.unwrap(), vec![team]);
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn unsupported_url_is_rejected() {
    let err = Db::connect("mysql://u:secret@h/db").await.unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[tokio::test]
async fn api_keys_are_stored_hashed_and_authenticate() {
    api_keys_are_stored_hashed_and_authenticate_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn api_keys_are_stored_hashed_and_authenticate_on(db: Db) {
    let team = db.create_team("a").await.unwrap();
    let (key, plaintext) = db
        .create_api_key(&NewApiKey::new(team.id, "admin", true))
        .await
        .unwrap();
    let key_id = key.id.clone();
    assert!(plaintext.starts_with("hk_"));
    assert_eq!(key.prefix.as_deref(), Some(&plaintext[..3 + 8]));
    assert_eq!(plaintext.len(), 3 + 32);
    assert!(plaintext[3..].chars().all(|c| c.is_ascii_alphanumeric()));

    let stored: Vec<String> = sqlx::query_scalar("SELECT secret_sha256 FROM api_keys")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], plaintext);
    assert!(!stored[0].contains(&plaintext[3..]));
    assert_eq!(stored[0].len(), 64);

    let p = db
        .authenticate(&plaintext)
        .await
        .unwrap()
        .expect("key valid");
    assert_eq!(p.team_id, team.id);
    assert_eq!(p.key_id, key_id);
    assert!(p.is_admin);
    let used: Option<i64> = sqlx::query_scalar("SELECT last_used_at FROM api_keys")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(used.is_some());

    assert!(db.authenticate("hk_wrong").await.unwrap().is_none());
    assert!(db.authenticate(&stored[0]).await.unwrap().is_none());
    assert_eq!(db.count_api_keys().await.unwrap(), 1);
}

#[tokio::test]
async fn revoked_and_expired_keys_stop_authenticating_and_stay_listed() {
    revoked_and_expired_keys_stop_authenticating_and_stay_listed_on(
        Db::connect_in_memory().await.unwrap(),
    )
    .await;
}

async fn revoked_and_expired_keys_stop_authenticating_and_stay_listed_on(db: Db) {
    let team = db.create_team("a").await.unwrap().id;
    let (live, live_secret) = db
        .create_api_key(&NewApiKey::new(team, "live", false))
        .await
        .unwrap();
    let (revoked, revoked_secret) = db
        .create_api_key(&NewApiKey::new(team, "revoked", true))
        .await
        .unwrap();
    let mut soon = NewApiKey::new(team, "expired", false);
    soon.expires_at = Some(Utc::now() - Duration::seconds(1));
    soon.created_by = Some(live.id.clone());
    let (expired, expired_secret) = db.create_api_key(&soon).await.unwrap();

    assert!(db.authenticate(&revoked_secret).await.unwrap().is_some());
    assert_eq!(db.count_active_admin_keys().await.unwrap(), 1);
    assert!(db.revoke_api_key(&revoked.id).await.unwrap());
    assert!(!db.revoke_api_key(&revoked.id).await.unwrap(), "only once");
    assert!(db.authenticate(&revoked_secret).await.unwrap().is_none());
    assert!(db.authenticate(&expired_secret).await.unwrap().is_none());
    assert!(db.authenticate(&live_secret).await.unwrap().is_some());
    assert_eq!(db.count_active_admin_keys().await.unwrap(), 0);

    let mut listed = db.list_api_keys(team).await.unwrap();
    // Made in the same millisecond: order by name to compare.
    listed.sort_by_key(|k| match k.name.as_str() {
        "live" => 0,
        "revoked" => 1,
        _ => 2,
    });
    let names: Vec<_> = listed.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["live", "revoked", "expired"]);
    let now = Utc::now();
    assert!(listed[0].is_active(now));
    assert!(!listed[1].is_active(now) && listed[1].revoked_at.is_some());
    assert!(!listed[2].is_active(now) && listed[2].revoked_at.is_none());
    assert_eq!(listed[2].created_by.as_ref(), Some(&live.id));
    assert_eq!(
        db.get_api_key(&expired.id).await.unwrap().unwrap(),
        listed[2]
    );
    let other = db.create_team("b").await.unwrap().id;
    assert!(db.list_api_keys(other).await.unwrap().is_empty());
}

#[tokio::test]
async fn last_use_is_written_at_most_once_per_granularity() {
    last_use_is_written_at_most_once_per_granularity_on(Db::connect_in_memory().await.unwrap())
        .await;
}

async fn last_use_is_written_at_most_once_per_granularity_on(db: Db) {
    let team = db.create_team("a").await.unwrap().id;
    let (key, secret) = db
        .create_api_key(&NewApiKey::new(team, "k", false))
        .await
        .unwrap();
    db.authenticate(&secret).await.unwrap().unwrap();
    let first = db.get_api_key(&key.id).await.unwrap().unwrap().last_used_at;
    assert!(first.is_some());
    // Pretend the last use was just under the granularity ago: no write.
    let almost = Utc::now().timestamp_millis() - LAST_USED_GRANULARITY_MS + 5_000;
    sqlx::query("UPDATE api_keys SET last_used_at = $1")
        .bind(almost)
        .execute(&db.pool)
        .await
        .unwrap();
    db.authenticate(&secret).await.unwrap().unwrap();
    let kept = db.get_api_key(&key.id).await.unwrap().unwrap().last_used_at;
    assert_eq!(kept.map(|t| t.timestamp_millis()), Some(almost));
    // Older than the granularity: refreshed.
    sqlx::query("UPDATE api_keys SET last_used_at = $1")
        .bind(almost - 10_000)
        .execute(&db.pool)
        .await
        .unwrap();
    db.authenticate(&secret).await.unwrap().unwrap();
    let fresh = db.get_api_key(&key.id).await.unwrap().unwrap().last_used_at;
    assert!(fresh.unwrap().timestamp_millis() > almost);
}

#[tokio::test]
async fn team_names_are_unique_and_teams_are_found_by_name() {
    team_names_are_unique_and_teams_are_found_by_name_on(Db::connect_in_memory().await.unwrap())
        .await;
}

async fn team_names_are_unique_and_teams_are_found_by_name_on(db: Db) {
    let a = db.create_team("acme").await.unwrap();
    let err = db.create_team("acme").await.unwrap_err();
    assert!(matches!(err, DbError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(db.get_team_by_name("acme").await.unwrap(), Some(a.clone()));
    assert_eq!(db.get_team(a.id).await.unwrap(), Some(a));
    assert!(db.get_team_by_name("nope").await.unwrap().is_none());
    assert_eq!(db.list_teams().await.unwrap().len(), 1);
}

#[tokio::test]
async fn teams_do_not_see_each_others_sandboxes() {
    teams_do_not_see_each_others_sandboxes_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn teams_do_not_see_each_others_sandboxes_on(db: Db) {
    let a = db.create_team("a").await.unwrap().id;
    let b = db.create_team("b").await.unwrap().id;
    let sa = new_sandbox(a, None);
    db.insert_sandbox(&sa).await.unwrap();

    let got = db
        .get_sandbox(a, &sa.id)
        .await
        .unwrap()
        .expect("own sandbox");
    assert_eq!(got.id, sa.id);
    assert_eq!(got.env, sa.env);
    assert_eq!(got.metadata, sa.metadata);
    assert_eq!(got.state, SandboxState::Starting);
    assert_eq!(
        got.expires_at.timestamp_millis(),
        sa.expires_at.timestamp_millis()
    );

    assert!(db.get_sandbox(b, &sa.id).await.unwrap().is_none());
    assert!(db.list_sandboxes(b).await.unwrap().is_empty());
    assert_eq!(db.list_sandboxes(a).await.unwrap().len(), 1);
    assert!(!db.delete_sandbox(b, &sa.id).await.unwrap());
    assert!(db.get_sandbox(a, &sa.id).await.unwrap().is_some());
}

#[tokio::test]
async fn state_updates_honour_the_from_guard() {
    state_updates_honour_the_from_guard_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn state_updates_honour_the_from_guard_on(db: Db) {
    let team = db.create_team("a").await.unwrap().id;
    let host = HostId::generate();
    db.upsert_host(&host, "http://127.0.0.1:1", "qemu", "tcg")
        .await
        .unwrap();
    let s = new_sandbox(team, Some(host.clone()));
    db.insert_sandbox(&s).await.unwrap();

    assert!(db
        .update_sandbox_state(
            &s.id,
            &[SandboxState::Starting],
            SandboxState::Running,
            None
        )
        .await
        .unwrap());
    // Guard no longer matches: nothing changes.
    assert!(!db
        .update_sandbox_state(
            &s.id,
            &[SandboxState::Starting],
            SandboxState::Error,
            Some("x")
        )
        .await
        .unwrap());
    assert_eq!(db.list_running_sandboxes().await.unwrap().len(), 1);
    assert_eq!(
        db.count_active_by_host().await.unwrap().get(&host),
        Some(&1)
    );
    assert_eq!(
        db.count_team_active_by_host(team).await.unwrap().get(&host),
        Some(&1)
    );
    let other = db.create_team("b").await.unwrap().id;
    assert!(db
        .count_team_active_by_host(other)
        .await
        .unwrap()
        .is_empty());

    assert!(db.mark_sandbox_stopped(&s.id).await.unwrap());
    assert!(!db.mark_sandbox_stopped(&s.id).await.unwrap(), "idempotent");
    let row = db.get_sandbox(team, &s.id).await.unwrap().unwrap();
    assert_eq!(row.state, SandboxState::Stopped);
    assert!(db.list_running_sandboxes().await.unwrap().is_empty());

    // The state table has the last word: a stopped sandbox never changes again.
    let err = db
        .update_sandbox_state(
            &s.id,
            &[SandboxState::Stopped],
            SandboxState::Error,
            Some("boom"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, crate::DbError::BadTransition(_)), "{err}");
    let row = db.get_sandbox(team, &s.id).await.unwrap().unwrap();
    assert_eq!(row.state, SandboxState::Stopped);
    assert_eq!(row.error, None);
}

#[tokio::test]
async fn duplicate_sandbox_id_is_reported() {
    duplicate_sandbox_id_is_reported_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn duplicate_sandbox_id_is_reported_on(db: Db) {
    let team = db.create_team("a").await.unwrap().id;
    let s = new_sandbox(team, None);
    db.insert_sandbox(&s).await.unwrap();
    let err = db.insert_sandbox(&s).await.unwrap_err();
    assert!(matches!(err, crate::DbError::AlreadyExists { .. }), "{err}");
}

#[tokio::test]
async fn templates_are_team_scoped_plus_platform() {
    templates_are_team_scoped_plus_platform_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn templates_are_team_scoped_plus_platform_on(db: Db) {
    let a = db.create_team("a").await.unwrap().id;
    let b = db.create_team("b").await.unwrap().id;
    let minimal: TemplateName = "minimal".parse().unwrap();
    let mine: TemplateName = "mine".parse().unwrap();
    db.upsert_template(TeamId::PLATFORM, &minimal, 10)
        .await
        .unwrap();
    db.upsert_template(TeamId::PLATFORM, &minimal, 20)
        .await
        .unwrap();
    db.upsert_template(a, &mine, 5).await.unwrap();

    let la = db.list_templates(a).await.unwrap();
    assert_eq!(la.len(), 2);
    let lb = db.list_templates(b).await.unwrap();
    assert_eq!(lb.len(), 1);
    assert_eq!(lb[0].name, minimal);
    assert_eq!(lb[0].size_bytes, 20);
    assert!(lb[0].team_id.is_platform());
    assert!(db.get_template(b, &mine).await.unwrap().is_none());
    assert!(db.get_template(a, &mine).await.unwrap().is_some());
    assert!(db.get_template(b, &minimal).await.unwrap().is_some());
}

#[tokio::test]
async fn hosts_upsert() {
    hosts_upsert_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn hosts_upsert_on(db: Db) {
    let h = HostId::generate();
    db.upsert_host(&h, "http://a", "qemu", "tcg").await.unwrap();
    db.upsert_host(&h, "http://b", "qemu", "kvm").await.unwrap();
    let hosts = db.list_hosts().await.unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0].url, "http://b");
    assert_eq!(hosts[0].accel, "kvm");
}

#[tokio::test]
async fn host_enrollment_lifecycle() {
    host_enrollment_lifecycle_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn host_enrollment_lifecycle_on(db: Db) {
    use crate::{HostLoad, HostStatus};
    let id = HostId::generate();
    let later = Utc::now() + Duration::hours(1);
    let h = db
        .create_host(&id, "h1", "https://10.0.0.2:7421", "hash1", later)
        .await
        .unwrap();
    assert_eq!(
        (h.status, h.name.as_deref()),
        (HostStatus::Pending, Some("h1"))
    );
    // Names are unique.
    let dup = db
        .create_host(&HostId::generate(), "h1", "https://x:1", "hash2", later)
        .await;
    assert!(matches!(dup, Err(DbError::AlreadyExists { .. })));
    // An expired token finds nothing.
    let old = HostId::generate();
    db.create_host(
        &old,
        "h2",
        "https://x:1",
        "hash3",
        Utc::now() - Duration::seconds(1),
    )
    .await
    .unwrap();
    assert!(db.host_for_enrollment("hash3").await.unwrap().is_none());
    assert!(!db.complete_enrollment(&old, "hash3", "fp").await.unwrap());
    // The right token works once.
    assert_eq!(
        db.host_for_enrollment("hash1").await.unwrap().unwrap().id,
        id
    );
    assert!(!db.complete_enrollment(&id, "wrong", "fp").await.unwrap());
    assert!(db.complete_enrollment(&id, "hash1", "fp1").await.unwrap());
    assert!(!db.complete_enrollment(&id, "hash1", "fp2").await.unwrap());
    assert!(db.host_for_enrollment("hash1").await.unwrap().is_none());
    let h = db.get_host(&id).await.unwrap().unwrap();
    assert_eq!(h.status, HostStatus::Active);
    assert_eq!(h.cert_fingerprint.as_deref(), Some("fp1"));
    // Drain, unreachable, back (still draining), undrain.
    assert!(db.set_host_drain(&id, true).await.unwrap());
    assert!(db
        .mark_host_unreachable(&id, Utc::now() + Duration::seconds(1))
        .await
        .unwrap());
    assert_eq!(
        db.get_host(&id).await.unwrap().unwrap().status,
        HostStatus::Unreachable
    );
    let load = HostLoad {
        memory_capacity_mb: 4096,
        running: 2,
        ..Default::default()
    };
    db.record_heartbeat(&id, "qemu", "tcg", &load)
        .await
        .unwrap();
    let h = db.get_host(&id).await.unwrap().unwrap();
    assert_eq!((h.status, h.load), (HostStatus::Draining, load));
    assert!(h.last_heartbeat_at.is_some());
    // A fresh heartbeat is not older than a minute ago: stays.
    assert!(!db
        .mark_host_unreachable(&id, Utc::now() - Duration::seconds(60))
        .await
        .unwrap());
    assert!(db.set_host_drain(&id, false).await.unwrap());
    assert_eq!(
        db.get_host(&id).await.unwrap().unwrap().status,
        HostStatus::Active
    );
    // Revoked is final: no drain, no heartbeat brings it back.
    assert!(db.revoke_host(&id).await.unwrap());
    assert!(!db.revoke_host(&id).await.unwrap());
    assert!(!db.set_host_drain(&id, false).await.unwrap());
    db.record_heartbeat(&id, "qemu", "tcg", &load)
        .await
        .unwrap();
    assert_eq!(
        db.get_host(&id).await.unwrap().unwrap().status,
        HostStatus::Revoked
    );
}

fn file_url(dir: &tempfile::TempDir) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("hearth.db").display()
    )
}

#[tokio::test]
async fn concurrent_admissions_never_pass_the_quota_together() {
    // A file database with a pool of 8: admissions really run in parallel.
    let dir = tempfile::tempdir().unwrap();
    concurrent_admissions_never_pass_the_quota_together_on(
        Db::connect(&file_url(&dir)).await.unwrap(),
    )
    .await;
}

async fn concurrent_admissions_never_pass_the_quota_together_on(db: Db) {
    use hearth_types::{QuotaExceeded, TeamQuota};
    let team = db.create_team("t").await.unwrap().id;
    let quota = TeamQuota {
        max_sandboxes: 5,
        ..TeamQuota::default()
    };
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                db.insert_sandbox_within_quota(&new_sandbox(team, None), &quota)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap() {
            crate::Admission::Admitted => admitted += 1,
            crate::Admission::Refused(r) => {
                assert_eq!(r, QuotaExceeded::Sandboxes { max: 5 })
            }
        }
    }
    assert_eq!(admitted, 5);
    assert_eq!(db.list_sandboxes(team).await.unwrap().len(), 5);
    assert_eq!(db.team_usage(team).await.unwrap().sandboxes, 5);

    // Finished sandboxes do not count; other teams are not affected.
    let rows = db.list_sandboxes(team).await.unwrap();
    db.mark_sandbox_stopped(&rows[0].id).await.unwrap();
    assert_eq!(
        db.insert_sandbox_within_quota(&new_sandbox(team, None), &quota)
            .await
            .unwrap(),
        crate::Admission::Admitted
    );
    let other = db.create_team("u").await.unwrap().id;
    assert_eq!(
        db.insert_sandbox_within_quota(&new_sandbox(other, None), &quota)
            .await
            .unwrap(),
        crate::Admission::Admitted
    );
}

#[tokio::test]
async fn a_team_quota_row_overrides_the_defaults() {
    a_team_quota_row_overrides_the_defaults_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn a_team_quota_row_overrides_the_defaults_on(db: Db) {
    use hearth_types::{QuotaExceeded, TeamQuota};
    let team = db.create_team("t").await.unwrap().id;
    let default = TeamQuota::default();
    assert_eq!(db.team_quota(team, &default).await.unwrap(), default);
    let own = TeamQuota {
        max_sandboxes: 9,
        max_vcpus: 1,
        max_memory_mb: 100_000,
        max_disk_mb: 100_000,
    };
    db.set_team_quota(team, Some(&own)).await.unwrap();
    assert_eq!(db.team_quota(team, &default).await.unwrap(), own);
    let mut two = new_sandbox(team, None);
    two.vcpus = 2;
    assert_eq!(
        db.insert_sandbox_within_quota(&two, &default)
            .await
            .unwrap(),
        crate::Admission::Refused(QuotaExceeded::Vcpus {
            max: 1,
            used: 0,
            asked: 2
        })
    );
    assert!(db.list_sandboxes(team).await.unwrap().is_empty());
    db.set_team_quota(team, None).await.unwrap();
    assert_eq!(db.team_quota(team, &default).await.unwrap(), default);
}

#[tokio::test]
async fn pages_filter_by_state_and_cover_every_row_once() {
    pages_filter_by_state_and_cover_every_row_once_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn pages_filter_by_state_and_cover_every_row_once_on(db: Db) {
    let team = db.create_team("t").await.unwrap().id;
    let base = Utc::now();
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut s = new_sandbox(team, None);
        // Two rows share each creation time: the cursor must break ties by ID.
        s.created_at = base + Duration::milliseconds(i / 2);
        if i % 3 == 0 {
            s.state = SandboxState::Stopped;
        }
        db.insert_sandbox(&s).await.unwrap();
        ids.push(s.id);
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = db
            .list_sandboxes_page(team, &[], 3, after.as_ref())
            .await
            .unwrap();
        assert!(page.rows.len() <= 3);
        seen.extend(page.rows.iter().map(|r| r.id.clone()));
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 7, "a row came twice");
    let active = db
        .list_sandboxes_page(team, &[SandboxState::Starting], 100, None)
        .await
        .unwrap();
    assert_eq!(active.rows.len(), 4);
    assert!(active.next.is_none());
    let other = db.create_team("u").await.unwrap().id;
    let none = db.list_sandboxes_page(other, &[], 100, None).await.unwrap();
    assert!(none.rows.is_empty());
}

#[tokio::test]
async fn pruning_removes_only_old_finished_rows() {
    pruning_removes_only_old_finished_rows_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn pruning_removes_only_old_finished_rows_on(db: Db) {
    let team = db.create_team("t").await.unwrap().id;
    let running = new_sandbox(team, None);
    let stopped = new_sandbox(team, None);
    db.insert_sandbox(&running).await.unwrap();
    db.insert_sandbox(&stopped).await.unwrap();
    db.mark_sandbox_stopped(&stopped.id).await.unwrap();
    // Nothing is older than an hour ago.
    let hour_ago = Utc::now() - Duration::hours(1);
    assert_eq!(db.prune_finished_sandboxes(hour_ago).await.unwrap(), 0);
    let later = Utc::now() + Duration::seconds(1);
    assert_eq!(db.prune_finished_sandboxes(later).await.unwrap(), 1);
    let left = db.list_sandboxes(team).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, running.id);
}

#[tokio::test]
async fn running_sets_the_expiry_from_then() {
    running_sets_the_expiry_from_then_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn running_sets_the_expiry_from_then_on(db: Db) {
    let team = db.create_team("t").await.unwrap().id;
    let s = new_sandbox(team, None);
    db.insert_sandbox(&s).await.unwrap();
    let exp = Utc::now() + Duration::seconds(1000);
    assert!(db.mark_sandbox_running(&s.id, exp).await.unwrap());
    let row = db.get_sandbox(team, &s.id).await.unwrap().unwrap();
    assert_eq!(row.state, SandboxState::Running);
    assert_eq!(row.expires_at.timestamp_millis(), exp.timestamp_millis());
    // Only from starting.
    assert!(!db.mark_sandbox_running(&s.id, exp).await.unwrap());
    assert!(!db.delete_starting_sandbox(&s.id).await.unwrap());
    let t = new_sandbox(team, None);
    db.insert_sandbox(&t).await.unwrap();
    assert!(db.delete_starting_sandbox(&t.id).await.unwrap());
    assert!(db.get_sandbox(team, &t.id).await.unwrap().is_none());
    assert!(db.get_sandbox(team, &s.id).await.unwrap().is_some());
}

#[tokio::test]
async fn pause_and_resume_are_compare_and_set_and_follow_the_table() {
    pause_and_resume_are_compare_and_set_and_follow_the_table_on(
        Db::connect_in_memory().await.unwrap(),
    )
    .await;
}

async fn pause_and_resume_are_compare_and_set_and_follow_the_table_on(db: Db) {
    let team = db.create_team("a").await.unwrap().id;
    let s = new_sandbox(team, None);
    db.insert_sandbox(&s).await.unwrap();
    let exp = Utc::now() + Duration::seconds(100);
    // starting -> paused is not in the table.
    assert!(db
        .transition_sandbox(&s.id, SandboxState::Starting, SandboxState::Paused, None)
        .await
        .is_err());
    assert!(db.mark_sandbox_running(&s.id, exp).await.unwrap());
    // Two writers race to pause: exactly one wins.
    let (a, b) = tokio::join!(
        db.transition_sandbox(&s.id, SandboxState::Running, SandboxState::Paused, None),
        db.transition_sandbox(&s.id, SandboxState::Running, SandboxState::Paused, None),
    );
    assert_eq!(u8::from(a.unwrap()) + u8::from(b.unwrap()), 1);
    // Agent-only states are never written.
    let err = db
        .transition_sandbox(&s.id, SandboxState::Paused, SandboxState::Resuming, None)
        .await
        .unwrap_err();
    assert!(matches!(err, crate::DbError::NotStored { .. }), "{err}");
    // Revert of a failed pause, then the deadline of a running one.
    assert!(db
        .transition_sandbox(&s.id, SandboxState::Paused, SandboxState::Running, None)
        .await
        .unwrap());
    let later = Utc::now() + Duration::seconds(5000);
    assert!(db
        .set_sandbox_deadline(team, &s.id, later, 5000)
        .await
        .unwrap());
    let row = db.get_sandbox(team, &s.id).await.unwrap().unwrap();
    assert_eq!(
        (row.timeout_s, row.expires_at.timestamp_millis()),
        (5000, later.timestamp_millis())
    );
    // Another team cannot touch it.
    let other = db.create_team("b").await.unwrap().id;
    assert!(!db
        .set_sandbox_deadline(other, &s.id, later, 1)
        .await
        .unwrap());
    // Not running: no deadline change.
    assert!(db
        .transition_sandbox(&s.id, SandboxState::Running, SandboxState::Paused, None)
        .await
        .unwrap());
    assert!(!db
        .set_sandbox_deadline(team, &s.id, later, 1)
        .await
        .unwrap());
}

#[tokio::test]
async fn paused_sandboxes_hold_no_vcpus_or_memory_and_resume_checks_the_quota() {
    paused_sandboxes_hold_no_vcpus_or_memory_and_resume_checks_the_quota_on(
        Db::connect_in_memory().await.unwrap(),
    )
    .await;
}

async fn paused_sandboxes_hold_no_vcpus_or_memory_and_resume_checks_the_quota_on(db: Db) {
    let team = db.create_team("a").await.unwrap().id;
    let quota = TeamQuota {
        max_sandboxes: 3,
        max_vcpus: 2,
        max_memory_mb: 100_000,
        max_disk_mb: 100_000,
    };
    let mut one = new_sandbox(team, None);
    one.vcpus = 2;
    assert_eq!(
        db.insert_sandbox_within_quota(&one, &quota).await.unwrap(),
        crate::Admission::Admitted
    );
    db.mark_sandbox_running(&one.id, Utc::now()).await.unwrap();
    db.transition_sandbox(&one.id, SandboxState::Running, SandboxState::Paused, None)
        .await
        .unwrap();
    let usage = db.team_usage(team).await.unwrap();
    assert_eq!((usage.sandboxes, usage.vcpus, usage.disk_mb), (1, 0, 1024));
    // The paused one's vCPUs are free for another sandbox...
    let mut two = new_sandbox(team, None);
    two.vcpus = 2;
    assert_eq!(
        db.insert_sandbox_within_quota(&two, &quota).await.unwrap(),
        crate::Admission::Admitted
    );
    // ...so it cannot resume beside it.
    let exp = Utc::now() + Duration::seconds(60);
    match db
        .resume_within_quota(team, &one.id, exp, Some(60), &quota)
        .await
        .unwrap()
    {
        crate::ResumeAdmission::Refused(q) => assert!(q.to_string().contains("vCPUs"), "{q}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        db.get_sandbox(team, &one.id).await.unwrap().unwrap().state,
        SandboxState::Paused
    );
    db.mark_sandbox_stopped(&two.id).await.unwrap();
    assert_eq!(
        db.resume_within_quota(team, &one.id, exp, Some(60), &quota)
            .await
            .unwrap(),
        crate::ResumeAdmission::Admitted
    );
    let row = db.get_sandbox(team, &one.id).await.unwrap().unwrap();
    assert_eq!((row.state, row.timeout_s), (SandboxState::Running, 60));
    // Not paused any more, or not the team's: nothing to resume.
    assert_eq!(
        db.resume_within_quota(team, &one.id, exp, None, &quota)
            .await
            .unwrap(),
        crate::ResumeAdmission::NotPaused
    );
}

#[tokio::test]
async fn a_fork_is_admitted_whole_or_not_at_all() {
    a_fork_is_admitted_whole_or_not_at_all_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn a_fork_is_admitted_whole_or_not_at_all_on(db: Db) {
    let team = db.create_team("a").await.unwrap().id;
    let quota = TeamQuota {
        max_sandboxes: 4,
        ..TeamQuota::default()
    };
    db.insert_sandbox(&new_sandbox(team, None)).await.unwrap();
    let four: Vec<_> = (0..4).map(|_| new_sandbox(team, None)).collect();
    match db
        .insert_sandboxes_within_quota(&four, &quota)
        .await
        .unwrap()
    {
        crate::Admission::Refused(q) => assert!(q.to_string().contains("4 concurrent"), "{q}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(db.list_sandboxes(team).await.unwrap().len(), 1);
    assert_eq!(
        db.insert_sandboxes_within_quota(&four[..3], &quota)
            .await
            .unwrap(),
        crate::Admission::Admitted
    );
    assert_eq!(db.list_sandboxes(team).await.unwrap().len(), 4);
    let ids: Vec<_> = four[..3].iter().map(|s| s.id.clone()).collect();
    assert_eq!(db.delete_starting_sandboxes(&ids).await.unwrap(), 3);
    assert_eq!(db.team_usage(team).await.unwrap().sandboxes, 1);
}

#[tokio::test]
async fn the_catalogue_maps_team_names_to_host_templates() {
    the_catalogue_maps_team_names_to_host_templates_on(Db::connect_in_memory().await.unwrap())
        .await;
}

async fn the_catalogue_maps_team_names_to_host_templates_on(db: Db) {
    let a = db.create_team("a").await.unwrap().id;
    let b = db.create_team("b").await.unwrap().id;
    let host = HostId::generate();
    db.upsert_host(&host, "http://h", "qemu", "tcg")
        .await
        .unwrap();
    let name: TemplateName = "prepared".parse().unwrap();
    let t = crate::NewTemplate {
        name: name.clone(),
        team_id: a,
        location: crate::TemplateLocation {
            host_id: host.clone(),
            host_name: "snap-0123456789abcdef".parse().unwrap(),
        },
        has_memory: true,
        allocated_bytes: 10,
        apparent_bytes: 1000,
        source_sandbox_id: SandboxId::generate(),
        vcpus: 1,
        memory_mb: 256,
        disk_size_mb: 64,
    };
    let got = db.insert_template(&t).await.unwrap();
    assert_eq!(db.get_template(a, &name).await.unwrap(), Some(got.clone()));
    assert_eq!(
        got.location.as_ref().unwrap().host_name.as_str(),
        "snap-0123456789abcdef"
    );
    assert!(got.has_memory && got.allocated_bytes == 10 && got.size_bytes == 1000);
    // Same name again in the same team: refused; another team may use it.
    let err = db.insert_template(&t).await.unwrap_err();
    assert!(matches!(err, crate::DbError::AlreadyExists { .. }), "{err}");
    let mut for_b = t.clone();
    for_b.team_id = b;
    for_b.location.host_name = "snap-fedcba9876543210".parse().unwrap();
    db.insert_template(&for_b).await.unwrap();
    assert!(db.get_template(b, &name).await.unwrap().unwrap().team_id == b);
    // In use by an active sandbox of the team only.
    let mut s = new_sandbox(a, Some(host));
    s.template = name.clone();
    db.insert_sandbox(&s).await.unwrap();
    assert_eq!(db.count_active_using_template(a, &name).await.unwrap(), 1);
    assert_eq!(db.count_active_using_template(b, &name).await.unwrap(), 0);
    db.mark_sandbox_stopped(&s.id).await.unwrap();
    assert_eq!(db.count_active_using_template(a, &name).await.unwrap(), 0);
    // Delete: only the team's own, never the platform's.
    db.upsert_template(TeamId::PLATFORM, &"minimal".parse().unwrap(), 1)
        .await
        .unwrap();
    assert!(!db
        .delete_team_template(TeamId::PLATFORM, &"minimal".parse().unwrap())
        .await
        .unwrap());
    assert!(!db
        .delete_team_template(a, &"minimal".parse().unwrap())
        .await
        .unwrap());
    assert!(db.delete_team_template(a, &name).await.unwrap());
    assert!(db.get_template(a, &name).await.unwrap().is_none());
    assert!(db.get_template(b, &name).await.unwrap().is_some());
}

#[tokio::test]
async fn the_catalogue_records_which_hosts_hold_each_template() {
    the_catalogue_records_which_hosts_hold_each_template_on(Db::connect_in_memory().await.unwrap())
        .await;
}

async fn the_catalogue_records_which_hosts_hold_each_template_on(db: Db) {
    let a = db.create_team("a").await.unwrap().id;
    let b = db.create_team("b").await.unwrap().id;
    let (h1, h2) = (HostId::generate(), HostId::generate());
    for h in [&h1, &h2] {
        db.upsert_host(h, "http://h", "qemu", "tcg").await.unwrap();
    }
    let minimal: TemplateName = "minimal".parse().unwrap();
    let snap: TemplateName = "snap-0123456789abcdef".parse().unwrap();
    let name: TemplateName = "mine".parse().unwrap();
    db.upsert_template(TeamId::PLATFORM, &minimal, 1)
        .await
        .unwrap();
    let made = db
        .insert_template(&crate::NewTemplate {
            name: name.clone(),
            team_id: a,
            location: crate::TemplateLocation {
                host_id: h1.clone(),
                host_name: snap.clone(),
            },
            has_memory: false,
            allocated_bytes: 1,
            apparent_bytes: 2,
            source_sandbox_id: SandboxId::generate(),
            vcpus: 1,
            memory_mb: 256,
            disk_size_mb: 64,
        })
        .await
        .unwrap();
    assert_eq!(made.hosts, vec![h1.clone()], "held where it was made");
    // Hosts' listings: h1 has both, h2 only the platform's and a name nobody knows.
    let stranger: TemplateName = "snap-zzzzzzzzzzzzzzzz".parse().unwrap();
    db.record_host_templates(&h1, &[minimal.clone(), snap.clone()])
        .await
        .unwrap();
    db.record_host_templates(&h2, &[minimal.clone(), stranger])
        .await
        .unwrap();
    let hosts_of = |team, n: TemplateName| {
        let db = db.clone();
        async move {
            let mut h = db.get_template(team, &n).await.unwrap().unwrap().hosts;
            h.sort();
            h
        }
    };
    let mut both = vec![h1.clone(), h2.clone()];
    both.sort();
    assert_eq!(hosts_of(b, minimal.clone()).await, both);
    assert_eq!(hosts_of(a, name.clone()).await, vec![h1.clone()]);
    assert!(
        db.get_template(b, &name).await.unwrap().is_none(),
        "team-scoped"
    );
    // A copy to h2, then h1 loses its copy: the catalogue follows.
    assert!(db.add_template_host(a, &name, &h2, &snap).await.unwrap());
    db.record_host_templates(&h1, std::slice::from_ref(&minimal))
        .await
        .unwrap();
    assert_eq!(hosts_of(a, name.clone()).await, vec![h2.clone()]);
    let listed = db.list_templates(a).await.unwrap();
    let mine = listed.iter().find(|t| t.name == name).unwrap();
    assert_eq!(mine.hosts, vec![h2.clone()]);
    // A copy of a template that is gone records nothing; deleting one drops its rows.
    assert!(!db.add_template_host(b, &name, &h2, &snap).await.unwrap());
    assert!(db.delete_team_template(a, &name).await.unwrap());
    assert!(db
        .add_template_host(a, &name, &h1, &snap)
        .await
        .is_ok_and(|added| !added));
    // A host that lists nothing holds nothing.
    db.record_host_templates(&h2, &[]).await.unwrap();
    assert_eq!(hosts_of(b, minimal).await, vec![h1]);
}

#[tokio::test]
async fn a_transition_from_an_old_read_is_refused() {
    a_transition_from_an_old_read_is_refused_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn a_transition_from_an_old_read_is_refused_on(db: Db) {
    let team = db.create_team("t").await.unwrap().id;
    let s = new_sandbox(team, None);
    db.insert_sandbox(&s).await.unwrap();
    db.mark_sandbox_running(&s.id, Utc::now()).await.unwrap();
    let old = db.get_sandbox(team, &s.id).await.unwrap().unwrap();
    // A pause and a resume since: same state, newer row.
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    assert!(db
        .transition_sandbox(&s.id, SandboxState::Running, SandboxState::Paused, None)
        .await
        .unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    assert!(db
        .transition_sandbox(&s.id, SandboxState::Paused, SandboxState::Running, None)
        .await
        .unwrap());
    assert!(!db
        .transition_sandbox_unchanged(
            &s.id,
            SandboxState::Running,
            old.updated_at,
            SandboxState::Paused,
            None
        )
        .await
        .unwrap());
    let now = db.get_sandbox(team, &s.id).await.unwrap().unwrap();
    assert_eq!(now.state, SandboxState::Running);
    assert!(db
        .transition_sandbox_unchanged(
            &s.id,
            SandboxState::Running,
            now.updated_at,
            SandboxState::Paused,
            None
        )
        .await
        .unwrap());
}

#[tokio::test]
async fn a_secret_is_made_once_and_kept() {
    a_secret_is_made_once_and_kept_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn a_secret_is_made_once_and_kept_on(db: Db) {
    let a = db
        .get_or_create_secret("k", || vec![1, 2, 3])
        .await
        .unwrap();
    let b = db.get_or_create_secret("k", || vec![9]).await.unwrap();
    assert_eq!(a, vec![1, 2, 3]);
    assert_eq!(b, a, "a second call must not replace the secret");
    let other = db.get_or_create_secret("other", || vec![7]).await.unwrap();
    assert_eq!(other, vec![7]);
}

#[tokio::test]
async fn secure_and_auto_resume_round_trip() {
    secure_and_auto_resume_round_trip_on(Db::connect_in_memory().await.unwrap()).await;
}

async fn secure_and_auto_resume_round_trip_on(db: Db) {
    let team = db.create_team("t").await.unwrap().id;
    let mut s = new_sandbox(team, None);
    s.secure = false;
    s.auto_resume = true;
    db.insert_sandbox(&s).await.unwrap();
    let row = db.get_sandbox(team, &s.id).await.unwrap().unwrap();
    assert!(!row.secure && row.auto_resume);
}

#[tokio::test]
async fn users_sign_in_to_sessions_that_end_at_logout_and_when_disabled() {
    users_sign_in_to_sessions_that_end_at_logout_and_when_disabled_on(
        Db::connect_in_memory().await.unwrap(),
    )
    .await;
}

async fn users_sign_in_to_sessions_that_end_at_logout_and_when_disabled_on(db: Db) {
    use crate::{Login, NewUser};
    let team = db.create_team("t").await.unwrap().id;
    let new = |email: &str, admin| NewUser {
        team,
        email: email.into(),
        password: "correct horse battery".into(),
        is_admin: admin,
    };
    let u = db.create_user(&new("Ann@Example.com", true)).await.unwrap();
    assert_eq!(u.email, "ann@example.com");
    // One account per email, whatever its case.
    assert!(matches!(
        db.create_user(&new("ANN@example.com", false)).await,
        Err(DbError::AlreadyExists { .. })
    ));
    let ttl = Duration::hours(1);
    for (email, password) in [
        ("ann@example.com", "wrong password!"),
        ("nobody@example.com", "correct horse battery"),
    ] {
        assert_eq!(
            db.login(email, password, ttl).await.unwrap(),
            Login::Refused
        );
    }
    let Login::Ok(ok) = db
        .login("ANN@example.com", "correct horse battery", ttl)
        .await
        .unwrap()
    else {
        panic!("login refused");
    };
    let crate::Session {
        user,
        key: session,
        secret,
    } = *ok;
    assert_eq!(user.id, u.id);
    assert!(session.expires_at.is_some());
    // A session speaks for the user's team with the user's rights ...
    let p = db.authenticate(&secret).await.unwrap().unwrap();
    assert_eq!((p.team_id, p.is_admin), (team, true));
    assert_eq!(db.user_of_key(&p.key_id).await.unwrap().unwrap().id, u.id);
    // ... is not one of the team's keys, nor its last admin key.
    assert!(db.list_api_keys(team).await.unwrap().is_empty());
    assert_eq!(db.count_active_admin_keys().await.unwrap(), 0);
    // Logout ends it.
    assert!(db.revoke_api_key(&p.key_id).await.unwrap());
    assert!(db.authenticate(&secret).await.unwrap().is_none());
    // Disabling ends every session at once, and no new one opens.
    let Login::Ok(again) = db
        .login("ann@example.com", "correct horse battery", ttl)
        .await
        .unwrap()
    else {
        panic!("login refused");
    };
    assert!(db.disable_user(&u.id).await.unwrap());
    assert!(!db.disable_user(&u.id).await.unwrap());
    assert!(db.authenticate(&again.secret).await.unwrap().is_none());
    assert_eq!(
        db.login("ann@example.com", "correct horse battery", ttl)
            .await
            .unwrap(),
        Login::Refused
    );
    assert!(db.list_users(Some(team)).await.unwrap()[0]
        .disabled_at
        .is_some());
    assert_eq!(db.list_users(None).await.unwrap().len(), 1);
}

/// Every test above again on PostgreSQL (a scratch database on the test cluster of
/// scripts/test-postgres.sh; skipped without one unless CI requires it).
mod on_postgres {
    use crate::testing::scratch_postgres;

    macro_rules! on_postgres {
        ($($name:ident => $body:path),* $(,)?) => {$(
            #[tokio::test]
            async fn $name() {
                if let Some((db, _)) = scratch_postgres().await {
                    $body(db).await;
                }
            }
        )*};
    }

    on_postgres! {
        api_keys_are_stored_hashed_and_authenticate => super::api_keys_are_stored_hashed_and_authenticate_on,
        revoked_and_expired_keys_stop_authenticating_and_stay_listed => super::revoked_and_expired_keys_stop_authenticating_and_stay_listed_on,
        last_use_is_written_at_most_once_per_granularity => super::last_use_is_written_at_most_once_per_granularity_on,
        team_names_are_unique_and_teams_are_found_by_name => super::team_names_are_unique_and_teams_are_found_by_name_on,
        teams_do_not_see_each_others_sandboxes => super::teams_do_not_see_each_others_sandboxes_on,
        state_updates_honour_the_from_guard => super::state_updates_honour_the_from_guard_on,
        duplicate_sandbox_id_is_reported => super::duplicate_sandbox_id_is_reported_on,
        templates_are_team_scoped_plus_platform => super::templates_are_team_scoped_plus_platform_on,
        hosts_upsert => super::hosts_upsert_on,
        a_team_quota_row_overrides_the_defaults => super::a_team_quota_row_overrides_the_defaults_on,
        pages_filter_by_state_and_cover_every_row_once => super::pages_filter_by_state_and_cover_every_row_once_on,
        pruning_removes_only_old_finished_rows => super::pruning_removes_only_old_finished_rows_on,
        running_sets_the_expiry_from_then => super::running_sets_the_expiry_from_then_on,
        pause_and_resume_are_compare_and_set_and_follow_the_table => super::pause_and_resume_are_compare_and_set_and_follow_the_table_on,
        paused_sandboxes_hold_no_vcpus_or_memory_and_resume_checks_the_quota => super::paused_sandboxes_hold_no_vcpus_or_memory_and_resume_checks_the_quota_on,
        a_fork_is_admitted_whole_or_not_at_all => super::a_fork_is_admitted_whole_or_not_at_all_on,
        the_catalogue_maps_team_names_to_host_templates => super::the_catalogue_maps_team_names_to_host_templates_on,
        the_catalogue_records_which_hosts_hold_each_template => super::the_catalogue_records_which_hosts_hold_each_template_on,
        a_transition_from_an_old_read_is_refused => super::a_transition_from_an_old_read_is_refused_on,
        a_secret_is_made_once_and_kept => super::a_secret_is_made_once_and_kept_on,
        secure_and_auto_resume_round_trip => super::secure_and_auto_resume_round_trip_on,
        concurrent_admissions_never_pass_the_quota_together => super::concurrent_admissions_never_pass_the_quota_together_on,
        users_sign_in_to_sessions_that_end_at_logout_and_when_disabled => super::users_sign_in_to_sessions_that_end_at_logout_and_when_disabled_on,
        host_enrollment_lifecycle => super::host_enrollment_lifecycle_on,
    }
}

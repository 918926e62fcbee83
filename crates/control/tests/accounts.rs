//! Teams, API keys and admin rights through the real router over an in-memory
//! database (a fake host agent stands in for the VMs).

mod common;

use axum::http::StatusCode;
use common::{env, expect, Env};
use hearth_control::app::hosts::HostTemplate;
use hearth_db::NewApiKey;
use serde_json::{json, Value};

async fn make_key(e: &Env, by: &str, body: Value) -> (String, String) {
    let v = expect(StatusCode::CREATED, e.post(by, "/v1/keys", body).await);
    (
        v["key"]["id"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

async fn works(e: &Env, key: &str) -> bool {
    let (s, v) = e.get(key, "/v1/sandboxes").await;
    assert!(
        s == StatusCode::OK || s == StatusCode::UNAUTHORIZED,
        "{s} {v}"
    );
    s == StatusCode::OK
}

async fn team_count(e: &Env) -> usize {
    e.state.app().db.list_teams().await.unwrap().len()
}

#[tokio::test]
async fn a_team_makes_lists_and_revokes_its_own_keys_and_revocation_is_immediate() {
    let e = env().await;
    let v = expect(
        StatusCode::CREATED,
        e.post(
            &e.key_a,
            "/v1/keys",
            json!({"name": "CI runner", "expires_in_s": 3600}),
        )
        .await,
    );
    let secret = v["secret"].as_str().unwrap().to_owned();
    let id = v["key"]["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("hk_") && secret.len() == 35, "{secret}");
    assert_eq!(v["key"]["prefix"], json!(&secret[..11]));
    assert_eq!(v["key"]["name"], "CI runner");
    assert_eq!(v["key"]["is_admin"], false);
    assert_eq!(v["key"]["active"], true);
    assert_eq!(v["key"]["team_id"], json!(e.team_a.to_string()));
    assert!(v["key"]["expires_at"].is_string(), "{v}");
    assert!(works(&e, &secret).await);

    // Listed without any secret or hash, with its last use.
    let (s, list) = e.get(&e.key_a, "/v1/keys").await;
    assert_eq!(s, StatusCode::OK);
    let text = list.to_string();
    assert!(!text.contains(&secret[3..]), "secret listed: {text}");
    assert!(
        !text.contains("sha256") && !text.contains("secret"),
        "{text}"
    );
    let mine = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == json!(id))
        .expect("new key listed")
        .clone();
    assert!(mine["last_used_at"].is_string(), "{mine}");
    // Team b lists only its own.
    let (_, other) = e.get(&e.key_b, "/v1/keys").await;
    assert!(!other.to_string().contains(&id), "{other}");

    // Revoked: the very next request with it fails.
    let v = expect(
        StatusCode::OK,
        e.delete(&e.key_a, &format!("/v1/keys/{id}")).await,
    );
    assert_eq!(v["active"], false);
    assert!(v["revoked_at"].is_string());
    assert!(!works(&e, &secret).await);
    let (s, v) = e.get(&secret, "/v1/sandboxes").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["error"]["message"].as_str().unwrap().contains("revoked"));
    // Again: still revoked, not an error; and a revoked key cannot revoke anything.
    let (s, _) = e.delete(&e.key_a, &format!("/v1/keys/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = e.post(&secret, "/v1/keys", json!({})).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A key with no body at all gets the default name.
    let v = expect(
        StatusCode::CREATED,
        e.post_empty(&e.key_a, "/v1/keys").await,
    );
    assert_eq!(v["key"]["name"], "key");
    assert_eq!(v["key"]["expires_at"], Value::Null);
}

#[tokio::test]
async fn another_teams_key_is_not_found_and_keeps_working() {
    let e = env().await;
    let (id_a, secret_a) = make_key(&e, &e.key_a, json!({"name": "a's"})).await;
    for key in [&e.key_b] {
        expect(
            StatusCode::NOT_FOUND,
            e.delete(key, &format!("/v1/keys/{id_a}")).await,
        );
    }
    assert!(works(&e, &secret_a).await);
    // A body cannot name another team: a field the request does not have is refused,
    // and the key is made in no team.
    let keys_a = e
        .state
        .app()
        .db
        .list_api_keys(e.team_a)
        .await
        .unwrap()
        .len();
    let v = expect(
        StatusCode::BAD_REQUEST,
        e.post(
            &e.key_b,
            "/v1/keys",
            json!({"team_id": e.team_a.to_string()}),
        )
        .await,
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("team_id"),
        "{v}"
    );
    assert_eq!(
        e.state
            .app()
            .db
            .list_api_keys(e.team_a)
            .await
            .unwrap()
            .len(),
        keys_a
    );
    let v = expect(
        StatusCode::CREATED,
        e.post_empty(&e.key_b, "/v1/keys").await,
    );
    assert_eq!(v["key"]["team_id"], json!(e.team_b.to_string()));
}

#[tokio::test]
async fn expired_keys_fail_and_bad_key_requests_are_400_and_make_nothing() {
    let e = env().await;
    let (_, secret) = make_key(&e, &e.key_a, json!({"expires_in_s": 60})).await;
    assert!(works(&e, &secret).await);
    // A key whose time is up (made with an expiry in the past, as time would make it).
    let mut old = NewApiKey::new(e.team_a, "old", false);
    old.expires_at = Some(chrono::Utc::now() - chrono::Duration::milliseconds(1));
    let (_, expired) = e.state.app().db.create_api_key(&old).await.unwrap();
    let v = expect(
        StatusCode::UNAUTHORIZED,
        e.get(&expired, "/v1/sandboxes").await,
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("expired"));
    let before = e
        .state
        .app()
        .db
        .list_api_keys(e.team_a)
        .await
        .unwrap()
        .len();

    let cases = [
        json!({"expires_in_s": 0}),
        json!({"expires_in_s": 59}),
        json!({"expires_in_s": -5}),
        json!({"expires_in_s": 1e30}),
        json!({"expires_in_s": 1.5}),
        json!({"expires_in_s": "3600"}),
        json!({"expires_in_s": 315_360_001_i64}),
        json!({"name": "x".repeat(65)}),
        json!({"name": "line\nbreak"}),
        json!({"is_admin": "yes"}),
        json!("key"),
    ];
    for body in cases {
        let (s, v) = e.post(&e.key_a, "/v1/keys", body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], "invalid_argument", "{body}: {v}");
    }
    for bad in ["nope", "key-", "key-UPPERCASE123", "..%2f..%2fetc"] {
        let (s, v) = e.delete(&e.key_a, &format!("/v1/keys/{bad}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let after = e
        .state
        .app()
        .db
        .list_api_keys(e.team_a)
        .await
        .unwrap()
        .len();
    assert_eq!(before, after, "a refused request made a key");
}

#[tokio::test]
async fn a_non_admin_gets_403_on_every_admin_endpoint_and_changes_nothing() {
    let e = env().await;
    let team_b = e.team_b.to_string();
    let (key_b_id, _) = {
        let keys = e.state.app().db.list_api_keys(e.team_b).await.unwrap();
        (keys[0].id.to_string(), ())
    };
    let teams = team_count(&e).await;
    let calls: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", "/v1/admin/teams".into(), None),
        (
            "POST",
            "/v1/admin/teams".into(),
            Some(json!({"name": "evil"})),
        ),
        ("GET", format!("/v1/admin/teams/{team_b}/keys"), None),
        (
            "POST",
            format!("/v1/admin/teams/{team_b}/keys"),
            Some(json!({"is_admin": true})),
        ),
        ("DELETE", format!("/v1/admin/keys/{key_b_id}"), None),
        ("GET", "/v1/admin/templates".into(), None),
        // Malformed IDs too: the rights are checked first.
        ("GET", "/v1/admin/teams/not-a-uuid/keys".into(), None),
        ("DELETE", "/v1/admin/keys/bad".into(), None),
    ];
    for (method, uri, body) in calls {
        let (s, v) = e.call(method, &uri, Some(&e.key_a), body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{method} {uri}: {v}");
        assert_eq!(v["error"]["code"], "forbidden", "{method} {uri}: {v}");
    }
    // Nor may a non-admin make itself an admin key.
    expect(
        StatusCode::FORBIDDEN,
        e.post(&e.key_a, "/v1/keys", json!({"is_admin": true}))
            .await,
    );
    assert_eq!(team_count(&e).await, teams);
    assert_eq!(
        e.state
            .app()
            .db
            .list_api_keys(e.team_b)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(works(&e, &e.key_b).await);
}

#[tokio::test]
async fn an_admin_makes_teams_and_their_keys_and_revokes_any_key_but_the_last_admin_one() {
    let e = env().await;
    let v = expect(
        StatusCode::CREATED,
        e.post(&e.key_admin, "/v1/admin/teams", json!({"name": "acme"}))
            .await,
    );
    let acme = v["id"].as_str().unwrap().to_owned();
    expect(
        StatusCode::CONFLICT,
        e.post(&e.key_admin, "/v1/admin/teams", json!({"name": "acme"}))
            .await,
    );
    let teams = team_count(&e).await;
    for bad in [
        json!({"name": ""}),
        json!({"name": "Acme"}),
        json!({"name": "../x"}),
        json!({"name": "a/b"}),
        json!({"name": "x".repeat(64)}),
        json!({"name": "platform"}),
        json!({"name": "00000000-0000-0000-0000-000000000001"}),
        json!({"name": 7}),
        json!({}),
    ] {
        let (s, v) = e.post(&e.key_admin, "/v1/admin/teams", bad.clone()).await;
        assert!(s.is_client_error(), "{bad}: {s} {v}");
    }
    assert_eq!(team_count(&e).await, teams, "a refused team was made");
    let (s, v) = e.get(&e.key_admin, "/v1/admin/teams").await;
    assert_eq!(s, StatusCode::OK);
    let mut names: Vec<_> = v["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "acme", "b"], "the platform team is not listed");

    // A key for acme sees acme's (empty) world, not team a's.
    e.create().await;
    let v = expect(
        StatusCode::CREATED,
        e.post(
            &e.key_admin,
            &format!("/v1/admin/teams/{acme}/keys"),
            json!({"name": "acme-ci"}),
        )
        .await,
    );
    let acme_key = v["secret"].as_str().unwrap().to_owned();
    let acme_key_id = v["key"]["id"].as_str().unwrap().to_owned();
    let (_, list) = e.get(&acme_key, "/v1/sandboxes").await;
    assert_eq!(list["sandboxes"], json!([]));
    let (s, v) = e
        .get(&e.key_admin, &format!("/v1/admin/teams/{acme}/keys"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["keys"].as_array().unwrap().len(), 1);
    // Unknown and platform teams are 404s.
    for team in [
        "00000000-0000-0000-0000-000000000000",
        "6c1f7a52-0000-4000-8000-000000000000",
    ] {
        let (s, v) = e
            .post_empty(&e.key_admin, &format!("/v1/admin/teams/{team}/keys"))
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{team}: {v}");
    }
    // Any key can be revoked by an admin, and stops at once.
    expect(
        StatusCode::OK,
        e.delete(&e.key_admin, &format!("/v1/admin/keys/{acme_key_id}"))
            .await,
    );
    assert!(!works(&e, &acme_key).await);

    // The only working admin key cannot be revoked, through either route.
    let admin_id = e
        .state
        .app()
        .db
        .authenticate(&e.key_admin)
        .await
        .unwrap()
        .unwrap()
        .key_id
        .to_string();
    for uri in [
        format!("/v1/admin/keys/{admin_id}"),
        format!("/v1/keys/{admin_id}"),
    ] {
        let (s, v) = e.delete(&e.key_admin, &uri).await;
        assert_eq!(s, StatusCode::CONFLICT, "{uri}: {v}");
    }
    assert!(works(&e, &e.key_admin).await);
    // With a second admin key, it can.
    let (_, second) = make_key(&e, &e.key_admin, json!({"is_admin": true})).await;
    expect(
        StatusCode::OK,
        e.delete(&second, &format!("/v1/keys/{admin_id}")).await,
    );
    assert!(!works(&e, &e.key_admin).await);
    assert!(works(&e, &second).await);
}

fn platform_template(name: &str) -> HostTemplate {
    HostTemplate {
        name: name.parse().unwrap(),
        allocated_bytes: 1 << 20,
        apparent_bytes: 8 << 20,
        has_memory: false,
        source_sandbox_id: None,
        vcpus: 0,
        memory_mb: 0,
        disk_size_mb: 0,
        in_use: 0,
    }
}

async fn template_names(e: &Env, key: &str, uri: &str) -> Vec<String> {
    let v = expect(StatusCode::OK, e.get(key, uri).await);
    v["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn only_admins_delete_platform_templates_and_a_refusal_touches_no_host() {
    let e = env().await;
    e.host
        .st()
        .templates
        .insert("extra".parse().unwrap(), platform_template("extra"));
    e.state.app().reconcile_once().await.unwrap();
    assert!(template_names(&e, &e.key_b, "/v1/templates")
        .await
        .contains(&"extra".to_owned()));

    for name in ["minimal", "extra"] {
        let (s, v) = e.delete(&e.key_a, &format!("/v1/templates/{name}")).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{name}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("admin"));
    }
    assert!(e.host.st().template_deletes.is_empty(), "a host was asked");
    assert!(e
        .host
        .st()
        .templates
        .contains_key(&"extra".parse().unwrap()));

    // In use by a sandbox of any team: refused before the host is asked.
    let v = expect(
        StatusCode::CREATED,
        e.post(&e.key_b, "/v1/sandboxes", json!({"template": "extra"}))
            .await,
    );
    let sb = v["id"].as_str().unwrap().to_owned();
    expect(
        StatusCode::CONFLICT,
        e.delete(&e.key_admin, "/v1/templates/extra").await,
    );
    assert!(e.host.st().template_deletes.is_empty());
    let (s, _) = e.delete(&e.key_b, &format!("/v1/sandboxes/{sb}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // An admin's delete reaches the host; one built into the host's images stays.
    expect(
        StatusCode::NO_CONTENT,
        e.delete(&e.key_admin, "/v1/templates/extra").await,
    );
    assert!(!e
        .host
        .st()
        .templates
        .contains_key(&"extra".parse().unwrap()));
    let (s, v) = e.delete(&e.key_admin, "/v1/templates/minimal").await;
    assert!(s.is_client_error(), "{s} {v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("built in"),
        "{v}"
    );
    e.state.app().reconcile_once().await.unwrap();
    let names = template_names(&e, &e.key_a, "/v1/templates").await;
    assert!(names.contains(&"minimal".to_owned()), "{names:?}");
    assert!(!names.contains(&"extra".to_owned()), "{names:?}");
}

#[tokio::test]
async fn admins_list_every_teams_templates_and_teams_only_their_own() {
    let e = env().await;
    let v = expect(
        StatusCode::CREATED,
        e.post(&e.key_b, "/v1/sandboxes", json!({"template": "minimal"}))
            .await,
    );
    let sb = v["id"].as_str().unwrap().to_owned();
    expect(
        StatusCode::CREATED,
        e.post(
            &e.key_b,
            &format!("/v1/sandboxes/{sb}/snapshots"),
            json!({"name": "b-secret"}),
        )
        .await,
    );
    assert!(!template_names(&e, &e.key_a, "/v1/templates")
        .await
        .contains(&"b-secret".to_owned()));
    let all = template_names(&e, &e.key_admin, "/v1/admin/templates").await;
    assert!(all.contains(&"b-secret".to_owned()) && all.contains(&"minimal".to_owned()));
    // Team a (even its admin) cannot delete team b's template through the team API.
    let (s, _) = e.delete(&e.key_admin, "/v1/templates/b-secret").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sandbox_metrics_are_the_teams_own_and_need_a_running_sandbox() {
    let e = env().await;
    let id = e.create().await;
    let uri = format!("/v1/sandboxes/{id}/metrics");
    let v = expect(StatusCode::OK, e.get(&e.key_a, &uri).await);
    assert_eq!(v["cpu_count"], 1);
    assert_eq!(v["mem_total_bytes"], 256 << 20);
    assert_eq!(v["disk_used_bytes"], 100 << 20);
    assert_eq!(v["timestamp"], "2023-11-14T22:13:20+00:00");
    let (s, _) = e.get(&e.key_b, &uri).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
        .await;
    assert_eq!(s, StatusCode::OK);
    expect(StatusCode::CONFLICT, e.get(&e.key_a, &uri).await);
}

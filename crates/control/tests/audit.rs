//! The audit log through the real router: what a team's keys did, in order, with who
//! did it; another team sees none of it; hearth's own acts (timeouts) have no key.

mod common;

use axum::http::StatusCode;
use common::{env, expect, Env};
use serde_json::{json, Value};

async fn audit(e: &Env, key: &str, query: &str) -> Value {
    let v = expect(
        StatusCode::OK,
        e.get(key, &format!("/v1/audit{query}")).await,
    );
    v
}

fn actions(page: &Value) -> Vec<(String, String)> {
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_teams_acts_are_recorded_with_their_key_newest_first_and_only_for_that_team() {
    let e = env().await;
    let id = e.create().await;
    let post = |path: String, body: Option<Value>| {
        let e = &e;
        async move {
            let (s, v) = e.call("POST", &path, Some(&e.key_a), body).await;
            assert!(s.is_success(), "{path}: {s} {v}");
            v
        }
    };
    post(format!("/v1/sandboxes/{id}/pause"), None).await;
    post(format!("/v1/sandboxes/{id}/resume"), None).await;
    post(
        format!("/v1/sandboxes/{id}/snapshots"),
        Some(json!({"name": "prepared"})),
    )
    .await;
    let forked = post(format!("/v1/sandboxes/{id}/fork"), None).await;
    let copy = forked["sandboxes"][0]["id"].as_str().unwrap().to_owned();
    let key = post("/v1/keys".into(), Some(json!({"name": "ci"}))).await;
    let key_id = key["key"]["id"].as_str().unwrap().to_owned();
    let (s, _) = e.delete(&e.key_a, &format!("/v1/keys/{key_id}")).await;
    assert_eq!(s, StatusCode::OK);
    for sb in [&copy, &id] {
        let (s, _) = e.delete(&e.key_a, &format!("/v1/sandboxes/{sb}")).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    let (s, _) = e.delete(&e.key_a, "/v1/templates/prepared").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Refused acts are not recorded.
    let (s, _) = e
        .post_empty(&e.key_a, &format!("/v1/sandboxes/{id}/pause"))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    let page = audit(&e, &e.key_a, "").await;
    let want: Vec<(String, String)> = [
        ("template.delete", "prepared"),
        ("sandbox.delete", id.as_str()),
        ("sandbox.delete", copy.as_str()),
        ("key.revoke", key_id.as_str()),
        ("key.create", key_id.as_str()),
        ("sandbox.fork", id.as_str()),
        ("sandbox.snapshot", id.as_str()),
        ("sandbox.resume", id.as_str()),
        ("sandbox.pause", id.as_str()),
        ("sandbox.create", id.as_str()),
    ]
    .iter()
    .map(|(a, t)| (a.to_string(), t.to_string()))
    .collect();
    assert_eq!(actions(&page), want);
    let key_a_id = e
        .state
        .app()
        .db
        .authenticate(&e.key_a)
        .await
        .unwrap()
        .unwrap()
        .key_id
        .to_string();
    for entry in page["entries"].as_array().unwrap() {
        assert_eq!(entry["actor_key_id"], json!(key_a_id), "{entry}");
        assert_eq!(entry["team_id"], json!(e.team_a.to_string()));
    }
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries[9]["detail"]["template"], "minimal");
    assert_eq!(entries[4]["detail"]["name"], "ci");
    assert_eq!(page["next_before"], Value::Null);
    for entry in entries {
        assert!(entry["detail"].is_object(), "{entry}");
    }

    // Pages.
    let first = audit(&e, &e.key_a, "?limit=4").await;
    assert_eq!(actions(&first), want[..4]);
    let before = first["next_before"].as_i64().expect("more pages");
    let second = audit(&e, &e.key_a, &format!("?limit=4&before={before}")).await;
    assert_eq!(actions(&second), want[4..8]);
    // A page that ends exactly at the oldest entry says there is no other.
    let exact = audit(&e, &e.key_a, &format!("?limit={}", want.len())).await;
    assert_eq!(actions(&exact), want);
    assert_eq!(exact["next_before"], Value::Null, "{exact}");

    // Team b sees nothing of team a's.
    let other = audit(&e, &e.key_b, "").await;
    assert_eq!(other["entries"], json!([]), "{other}");

    for bad in [
        "?limit=0",
        "?limit=501",
        "?limit=-1",
        "?before=0",
        "?before=x",
        "?limit=1.5",
    ] {
        let (s, v) = e.get(&e.key_a, &format!("/v1/audit{bad}")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
}

#[tokio::test]
async fn hearths_own_acts_are_recorded_without_a_key() {
    let e = env().await;
    let v = expect(
        StatusCode::CREATED,
        e.post(
            &e.key_a,
            "/v1/sandboxes",
            json!({"template": "minimal", "timeout_s": 1}),
        )
        .await,
    );
    let id = v["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let report = e.state.app().reconcile_once().await.unwrap();
    assert_eq!(report.expired.len(), 1, "{report:?}");
    let page = audit(&e, &e.key_a, "").await;
    let newest = &page["entries"][0];
    assert_eq!(newest["action"], "sandbox.timeout");
    assert_eq!(newest["target"], json!(id));
    assert_eq!(newest["actor_key_id"], Value::Null);
    assert_eq!(newest["detail"]["then"], "destroyed");

    // A sandbox its host lost: the change hearth made is recorded with from/to/reason.
    let lost = e.create().await;
    e.host.st().sandboxes.remove(&lost.parse().unwrap());
    let report = e.state.app().reconcile_once().await.unwrap();
    assert_eq!(report.lost.len(), 1, "{report:?}");
    let page = audit(&e, &e.key_a, "?limit=1").await;
    let newest = &page["entries"][0];
    assert_eq!(newest["action"], "sandbox.state");
    assert_eq!(newest["target"], json!(lost));
    assert_eq!(newest["actor_key_id"], Value::Null);
    assert_eq!(newest["detail"]["from"], "running");
    assert_eq!(newest["detail"]["to"], "stopped");
}

#[tokio::test]
async fn an_admins_acts_on_another_team_are_in_that_teams_log() {
    let e = env().await;
    let team_b = e.team_b.to_string();
    let v = expect(
        StatusCode::CREATED,
        e.post_empty(&e.key_admin, &format!("/v1/admin/teams/{team_b}/keys"))
            .await,
    );
    let made = v["key"]["id"].as_str().unwrap().to_owned();
    let page = audit(&e, &e.key_b, "").await;
    assert_eq!(actions(&page), [("key.create".to_owned(), made)]);
    assert!(page["entries"][0]["actor_key_id"].is_string());
    assert_eq!(audit(&e, &e.key_a, "").await["entries"], json!([]));
}

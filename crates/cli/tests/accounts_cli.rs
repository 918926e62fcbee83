//! `hearth admin …` and `hearth key …` against a real `hearth server` (SQLite, no
//! VMs): an operator makes a team and its key, the team makes and revokes its own
//! keys, a revoked key stops at once, and a non-admin is refused the admin commands.

mod common;

use std::process::Output;

use common::Stack;
use serde_json::Value;

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "succeeded: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn last_line(s: &str) -> String {
    s.lines().last().unwrap_or("").trim().to_owned()
}

#[test]
fn an_operator_makes_a_team_and_its_keys_and_a_revoked_key_stops_at_once() {
    let stack = Stack::start_server_only();
    let team_id = last_line(&ok(&stack.cli(&["admin", "team", "create", "acme"])));
    assert!(team_id.parse::<hearth_types::TeamId>().is_ok(), "{team_id}");
    let err = failed(&stack.cli(&["admin", "team", "create", "acme"]));
    assert!(err.contains("already exists"), "{err}");
    let err = failed(&stack.cli(&["admin", "team", "create", "Not/Valid"]));
    assert!(err.contains("team name"), "{err}");
    let list = ok(&stack.cli(&["admin", "team", "list"]));
    assert!(list.contains("acme") && list.contains(&team_id), "{list}");

    // The key alone on the last line, what it is on stderr.
    let out = stack.cli(&["admin", "key", "create", "--team", "acme", "--name", "ops"]);
    let acme_key = last_line(&ok(&out));
    assert!(
        acme_key.starts_with("hk_") && acme_key.len() == 35,
        "{acme_key}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not shown again"));
    let err = failed(&stack.cli(&["admin", "key", "create", "--team", "nosuch"]));
    assert!(err.contains("hearth admin team list"), "{err}");

    // The team makes its own key, lists its keys by prefix, never their secrets.
    let own = last_line(&ok(&stack.cli_as(
        &acme_key,
        &["key", "create", "--name", "ci", "--expires-in-days", "30"],
    )));
    let listed: Value =
        serde_json::from_str(&ok(&stack.cli_as(&own, &["--json", "key", "list"]))).unwrap();
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{listed}");
    assert!(!listed.to_string().contains(&own[3..]), "secret listed");
    let ci = keys.iter().find(|k| k["name"] == "ci").unwrap();
    assert_eq!(ci["prefix"], Value::String(own[..11].to_owned()));
    assert!(ci["expires_at"].is_string());
    let ci_id = ci["id"].as_str().unwrap().to_owned();
    let ops_id = keys.iter().find(|k| k["name"] == "ops").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A team's key is no admin's.
    for args in [
        vec!["admin", "team", "list"],
        vec!["admin", "templates"],
        vec!["admin", "key", "revoke", &ops_id],
    ] {
        let err = failed(&stack.cli_as(&own, &args));
        assert!(err.contains("admin"), "{args:?}: {err}");
    }

    // Revoked by the operator: the next command with it fails, the other key works.
    ok(&stack.cli(&["admin", "key", "revoke", &ci_id]));
    let err = failed(&stack.cli_as(&own, &["key", "list"]));
    assert!(err.contains("revoked"), "{err}");
    let list = ok(&stack.cli_as(&acme_key, &["key", "list"]));
    assert!(
        list.contains("false"),
        "the revoked key is listed inactive: {list}"
    );
    // Acme's audit log tells what was done to its keys, and by which key.
    let log: Value =
        serde_json::from_str(&ok(&stack.cli_as(&acme_key, &["--json", "audit"]))).unwrap();
    let acts: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        acts,
        ["key.revoke", "key.create", "key.create", "team.create"],
        "{log}"
    );
    let table = ok(&stack.cli_as(&acme_key, &["audit", "--limit", "1"]));
    assert!(
        table.contains("key.revoke") && !table.contains("team.create"),
        "{table}"
    );
    // The team revokes its own key.
    ok(&stack.cli_as(&acme_key, &["key", "revoke", &ops_id]));
    failed(&stack.cli_as(&acme_key, &["key", "list"]));
}

/// `hearth admin user create` with the password on stdin, then `list`, `whoami`,
/// `disable`; a sign-in through the API works until the user is disabled.
#[test]
fn an_operator_makes_lists_and_disables_users() {
    use std::io::Write;
    let stack = Stack::start_server_only();
    ok(&stack.cli(&["admin", "team", "create", "acme"]));
    let create = |email: &str, password: &str| {
        let mut child = std::process::Command::new(common::hearth_bin())
            .args([
                "admin", "user", "create", "--team", "acme", "--email", email,
            ])
            .env("HEARTH_URL", &stack.url)
            .env("HEARTH_API_KEY", &stack.api_key)
            .env("HEARTH_CREDENTIALS", stack.dir.path().join("no-such-file"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let id = last_line(&ok(&create("Ann@Acme.io", "a long enough password")));
    assert!(id.starts_with("usr-"), "{id}");
    let err = failed(&create("bob@acme.io", "short"));
    assert!(err.contains("password must be"), "{err}");
    let err = failed(&create("bob@acme.io", ""));
    assert!(err.contains("standard input"), "{err}");
    let list = ok(&stack.cli(&["admin", "user", "list", "--team", "acme"]));
    assert!(
        list.contains("ann@acme.io") && !list.contains("bob@"),
        "{list}"
    );

    let who = ok(&stack.cli(&["whoami"]));
    assert!(
        who.contains("admin     true") && who.contains("default"),
        "{who}"
    );

    let login = |password: &str| {
        reqwest::blocking::Client::new()
            .post(format!("{}/v1/auth/login", stack.url))
            .json(&serde_json::json!({"email": "ann@acme.io", "password": password}))
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(login("a long enough password"), 200);
    ok(&stack.cli(&["admin", "user", "disable", &id]));
    assert_eq!(login("a long enough password"), 401);
    let listed: Value =
        serde_json::from_str(&ok(&stack.cli(&["--json", "admin", "user", "list"]))).unwrap();
    assert!(listed["users"][0]["disabled_at"].is_string(), "{listed}");
}

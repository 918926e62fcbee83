//! End-to-end tests: real VMs (QEMU microvm under TCG here), the real guest agent,
//! real network namespaces and nftables, real SQLite, through the REST API and the CLI.

mod common;

use common::{e2e_available, images_dir, leftovers, Stack};
use rand::RngCore;
use reqwest::Method;
use serde_json::json;

fn guest_kernel_release() -> String {
    std::fs::read_to_string(images_dir().join("kernel/release"))
        .expect("kernel/release in the images dir")
        .trim()
        .to_string()
}

#[test]
fn sandbox_lifecycle_exec_files_isolation_and_cleanup() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();

    let a = stack
        .create(json!({"template": "minimal", "timeout_s": 600, "env": {"GREETING": "hello"}}));
    let b = stack.create(json!({"template": "minimal", "timeout_s": 600}));
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_eq!(a["state"], "running", "{a}");
    assert!(a_id.starts_with("sb-"));

    // The guest runs its own kernel, not the host's.
    let r = stack.exec(a_id, json!({"cmd": ["uname", "-r"]}));
    assert_eq!(r["exit_code"], 0, "{r}");
    let release = r["stdout"].as_str().unwrap().trim().to_string();
    assert_eq!(release, guest_kernel_release());
    let host = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    assert_ne!(release, String::from_utf8_lossy(&host.stdout).trim());

    // Exit codes, stderr apart from stdout, env from create and from exec, cwd.
    let r = stack.sh(a_id, "echo out; echo err >&2; exit 3");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["stdout"], "out\n");
    assert_eq!(r["stderr"], "err\n");
    let r = stack.exec(
        a_id,
        json!({"cmd": ["sh", "-c", "echo $GREETING $EXTRA; pwd"], "env": {"EXTRA": "world"}, "cwd": "/tmp"}),
    );
    assert_eq!(r["stdout"], "hello world\n/tmp\n", "{r}");

    // Non-UTF-8 output comes back base64-encoded, byte-exact.
    let r = stack.sh(a_id, "printf '\\377\\376ok'");
    assert_eq!(r["stdout_encoding"], "base64", "{r}");
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(r["stdout"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, b"\xff\xfeok");

    // A command past its timeout is killed and reported, and the sandbox lives on.
    let t = std::time::Instant::now();
    let r = stack.exec(a_id, json!({"cmd": ["sleep", "30"], "timeout_s": 2}));
    assert_eq!(r["timed_out"], true, "{r}");
    assert!(
        t.elapsed().as_secs() < 20,
        "timeout not enforced: {:?}",
        t.elapsed()
    );
    let r = stack.sh(
        a_id,
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -cx 'sleep 30 ' || true",
    );
    assert_eq!(
        r["stdout"].as_str().unwrap().trim(),
        "0",
        "sleep survived its timeout: {r}"
    );

    // 10 MB file round trip, byte-exact.
    let mut data = vec![0u8; 10 * 1024 * 1024];
    rand::thread_rng().fill_bytes(&mut data);
    let up = stack.put_file(a_id, &[("path", "/tmp/big/blob.bin")], data.clone());
    assert_eq!(up.status().as_u16(), 200, "{:?}", up.text());
    let r = stack.sh(a_id, "wc -c < /tmp/big/blob.bin");
    assert_eq!(r["stdout"].as_str().unwrap().trim(), data.len().to_string());
    let down = stack.get_file(a_id, &[("path", "/tmp/big/blob.bin")]);
    assert_eq!(down.status().as_u16(), 200);
    let got = down.bytes().unwrap();
    assert!(got.as_ref() == data.as_slice(), "10 MB round trip differs");

    // Files written as another user belong to that user.
    let up = stack.put_file(
        a_id,
        &[("path", "/home/user/mine.txt"), ("user", "user")],
        "mine",
    );
    assert_eq!(up.status().as_u16(), 200, "{:?}", up.text());
    let r = stack.sh(a_id, "stat -c '%U %s' /home/user/mine.txt");
    assert_eq!(r["stdout"], "user 4\n", "{r}");

    // Missing file -> 404.
    let r = stack.get_file(a_id, &[("path", "/no/such/file")]);
    assert_eq!(r.status().as_u16(), 404);

    // Two sandboxes do not see each other's files.
    stack.sh(a_id, "echo secret-a > /root/only-a");
    let r = stack.sh(b_id, "cat /root/only-a; ls /tmp/big 2>&1; true");
    assert!(!r["stdout"].as_str().unwrap().contains("secret-a"), "{r}");
    let r = stack.sh(b_id, "test -e /root/only-a");
    assert_eq!(r["exit_code"], 1);

    // The CLI: exec streams and exits with the command's code; cp both ways.
    let out = stack.cli(&["exec", a_id, "--", "uname", "-r"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), release);
    assert!(out.status.success());
    let out = stack.cli(&["exec", a_id, "--", "sh", "-c", "echo e >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "e\n");
    let local = stack.dir.path().join("cp-src.txt");
    std::fs::write(&local, "from the host\n").unwrap();
    let dst = format!("{a_id}:/tmp/cp.txt");
    let out = stack.cli(&["cp", local.to_str().unwrap(), &dst]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = stack.dir.path().join("cp-back.txt");
    let out = stack.cli(&["cp", &dst, back.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "from the host\n");
    let out = stack.cli(&["sandbox", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list --json");
    let ids: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert!(ids.contains(&a_id) && ids.contains(&b_id), "{listed}");
    let out = stack.cli(&["sandbox", "get", a_id, "--json"]);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("get --json");
    assert_eq!(got["id"], a_id);
    assert_eq!(got["state"], "running");
    let out = stack.cli(&["template", "list", "--json"]);
    let templates: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("template list --json");
    assert!(
        templates["templates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "minimal"),
        "{templates}"
    );
    // A CLI error says what is wrong and exits non-zero.
    let out = stack.cli(&["sandbox", "get", "sb-zzzzzzzzzzzzzzzz"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{out:?}"
    );

    // Destroy: nothing of the sandbox remains on the host.
    for id in [a_id, b_id] {
        stack.delete(id);
        let left = leftovers(id, &stack.run_dir());
        assert!(left.is_empty(), "after destroy of {id}: {left:?}");
        let v: serde_json::Value = stack
            .req(Method::GET, &format!("/v1/sandboxes/{id}"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(v["state"], "stopped", "{v}");
    }
    // Exec on a destroyed sandbox is refused with a clear error.
    let r = stack
        .req(Method::POST, &format!("/v1/sandboxes/{a_id}/exec"))
        .json(&json!({"cmd": ["true"]}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
}

#[test]
fn agent_killed_with_sandboxes_running_leaves_nothing_orphaned() {
    if !e2e_available() {
        return;
    }
    let mut stack = Stack::start();
    let a = stack.create(json!({"template": "minimal", "timeout_s": 600}));
    let id = a["id"].as_str().unwrap().to_string();
    stack.sh(&id, "echo kept > /root/state");

    stack.kill9_agent();
    stack.start_agent();

    // The restarted agent re-adopted the running VM: its memory and disk are intact.
    let r = stack.sh(&id, "cat /root/state");
    assert_eq!(r["stdout"], "kept\n", "{r}");

    stack.delete(&id);
    let left = leftovers(&id, &stack.run_dir());
    assert!(left.is_empty(), "after restart + destroy: {left:?}");
}

#[test]
fn bad_input_is_rejected_and_creates_nothing() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let cases = [
        (
            json!({"template": "no-such-template"}),
            404,
            "no-such-template",
        ),
        (json!({"template": "../etc"}), 400, "template name"),
        (json!({"template": "a/b"}), 400, "template name"),
        (json!({"template": "minimal", "vcpus": 0}), 400, "vcpus"),
        (json!({"template": "minimal", "vcpus": 1000}), 400, "vcpus"),
        (
            json!({"template": "minimal", "memory_mb": 1}),
            400,
            "memory_mb",
        ),
        (
            json!({"template": "minimal", "memory_mb": 10_000_000}),
            400,
            "memory_mb",
        ),
        (
            json!({"template": "minimal", "timeout_s": 0}),
            400,
            "timeout_s",
        ),
    ];
    for (body, status, needle) in cases {
        let r = stack
            .req(Method::POST, "/v1/sandboxes")
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: serde_json::Value = r.json().unwrap();
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{body}: {v}");
    }
    // Malformed ID, missing and wrong API key.
    let r = stack
        .req(Method::GET, "/v1/sandboxes/not-an-id")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = stack
        .http()
        .get(format!("{}/v1/sandboxes", stack.url))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = stack
        .http()
        .get(format!("{}/v1/sandboxes", stack.url))
        .header("x-api-key", "hk_wrong")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Bad file requests: relative path, missing path, bad user name.
    let some_id = "sb-0000000000000000";
    for (query, needle) in [
        (vec![("path", "relative/file")], "path"),
        (vec![], "path"),
        (vec![("path", "/tmp/x"), ("user", "../root")], "user"),
    ] {
        let r = stack.get_file(some_id, &query);
        assert_eq!(r.status().as_u16(), 400, "{query:?}");
        let v: serde_json::Value = r.json().unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{query:?}: {v}"
        );
    }
    // The host agent refuses anyone without its token: RPC and guest proxy alike.
    let agent = format!("http://127.0.0.1:{}", stack.agent_port);
    for (path, token) in [
        ("/hearth.agent.v1.HostAgent/ListSandboxes", None),
        ("/hearth.agent.v1.HostAgent/ListSandboxes", Some("wrong")),
        ("/sandboxes/sb-0000000000000000/envd/health", None),
    ] {
        let mut req = stack
            .http()
            .post(format!("{agent}{path}"))
            .header("content-type", "application/json")
            .body("{}");
        if let Some(t) = token {
            req = req.header("x-hearth-agent-token", t);
        }
        assert_eq!(
            req.send().unwrap().status().as_u16(),
            401,
            "{path} {token:?}"
        );
    }
    let ok = stack
        .http()
        .post(format!("{agent}/hearth.agent.v1.HostAgent/ListSandboxes"))
        .header("content-type", "application/json")
        .header("x-hearth-agent-token", common::AGENT_TOKEN)
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);

    // Oversized body.
    let r = stack
        .req(Method::POST, "/v1/sandboxes")
        .header("content-type", "application/json")
        .body(vec![b' '; 4 * 1024 * 1024])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);

    let v: serde_json::Value = stack
        .req(Method::GET, "/v1/sandboxes")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(v["sandboxes"].as_array().map(Vec::len), Some(0), "{v}");
    let dirs = std::fs::read_dir(stack.run_dir().join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(dirs, 0, "bad input left run dirs behind");
}

#[test]
fn sandbox_past_its_timeout_is_destroyed_and_reported_stopped() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    // Long enough for a TCG boot on a busy 2-core host, short enough for a test.
    let sb = stack.create(json!({"template": "minimal", "timeout_s": 15}));
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["state"], "running");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let state = loop {
        let v: serde_json::Value = stack
            .req(Method::GET, &format!("/v1/sandboxes/{id}"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if v["state"] != "running" || std::time::Instant::now() > deadline {
            break v["state"].clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(state, "stopped", "sandbox not reaped after its timeout");
    let left = leftovers(&id, &stack.run_dir());
    assert!(left.is_empty(), "after the reaper: {left:?}");
    let r = stack.sh_status(&id, "true");
    assert_eq!(r, 409, "exec on a reaped sandbox");
}

#[test]
fn files_at_rest_are_private_to_root() {
    if !e2e_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let stack = Stack::start();
    let sb = stack.create(json!({"template": "minimal", "env": {"SECRET": "s3"}}));
    let id = sb["id"].as_str().unwrap().to_string();
    let mode = |p: std::path::PathBuf| {
        std::fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let data = stack.dir.path().join("data");
    assert_eq!(mode(data.clone()), 0o700, "data dir");
    assert_eq!(mode(data.join("hearth.db")), 0o600, "database");
    let sandbox_dir = stack.run_dir().join("sandboxes").join(&id);
    assert_eq!(mode(stack.run_dir()), 0o700, "run dir");
    assert_eq!(mode(sandbox_dir.clone()), 0o700, "sandbox dir");
    // state.json holds the env and the access token.
    assert_eq!(mode(sandbox_dir.join("state.json")), 0o600, "state.json");
    for entry in std::fs::read_dir(&sandbox_dir).unwrap().flatten() {
        let m = mode(entry.path());
        assert_eq!(
            m & 0o077,
            0,
            "{} is open to other users ({m:o})",
            entry.path().display()
        );
    }
    stack.delete(&id);
}

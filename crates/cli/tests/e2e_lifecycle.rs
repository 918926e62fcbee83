//! End-to-end on real VMs through the CLI: pause and resume keep memory, files and
//! processes; a snapshot becomes a team template that new sandboxes start from; a
//! fork makes running copies. Control plane, host agent and guest are all real.

mod common;

use common::{e2e_available, Stack};
use serde_json::Value;

fn json_of(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "hearth failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn count(stack: &Stack, id: &str) -> u64 {
    let r = stack.sh(id, "cat /tmp/count");
    assert_eq!(r["exit_code"], 0, "{r}");
    r["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .expect("a count")
}

/// Removes the test's sandboxes and its snapshot even when the test fails: templates
/// live in the shared images directory, beyond the stack's temporary one.
struct Cleanup<'a>(&'a Stack);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Ok(list) = self
            .0
            .req(reqwest::Method::GET, "/v1/sandboxes")
            .send()
            .and_then(|r| r.json::<Value>())
        {
            for sb in list["sandboxes"].as_array().into_iter().flatten() {
                if let Some(id) = sb["id"].as_str() {
                    let _ = self.0.cli(&["sandbox", "rm", id]);
                }
            }
        }
        let _ = self.0.cli(&["snapshot", "rm", "e2e-snap"]);
    }
}

#[test]
fn pause_resume_snapshot_and_fork_through_the_cli() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let _cleanup = Cleanup(&stack);
    let sb = stack.create(serde_json::json!({"template": "minimal", "timeout_s": 600}));
    let id = sb["id"].as_str().unwrap().to_string();
    // A counter in the background and a file on disk, not synced: a disk-only snapshot
    // asks the guest to sync first (without that the file was found as NUL bytes).
    let r = stack.sh(
        &id,
        "echo kept > /keep; (i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done) >/dev/null 2>&1 &",
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    std::thread::sleep(std::time::Duration::from_secs(1));

    let v = json_of(&stack.cli(&["--json", "sandbox", "pause", &id]));
    assert_eq!(v["state"], "paused", "{v}");
    assert_eq!(
        stack.sh_status(&id, "true"),
        409,
        "exec on a paused sandbox"
    );
    let before = {
        // Resume and read the counter at once: it carries on from where it was.
        let v = json_of(&stack.cli(&["--json", "sandbox", "resume", &id, "--timeout", "600"]));
        assert_eq!(
            (v["state"].as_str(), v["timeout_s"].as_u64()),
            (Some("running"), Some(600)),
            "{v}"
        );
        count(&stack, &id)
    };
    assert!(before > 0);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let after = count(&stack, &id);
    assert!(after > before, "the counter stopped: {before} then {after}");
    assert_eq!(stack.sh(&id, "cat /keep")["stdout"], "kept\n");
    // The guest's process table answers after the resume (the counter above was
    // orphaned by its shell, so envd does not track it).
    let ps = json_of(&stack.cli(&["--json", "sandbox", "ps", &id]));
    assert!(ps["processes"].is_array(), "{ps}");

    // Snapshot to a team template, and a sandbox from it sees the file.
    let t = json_of(&stack.cli(&["--json", "snapshot", "create", &id, "--name", "e2e-snap"]));
    assert_eq!(
        (t["name"].as_str(), t["has_memory"].as_bool()),
        (Some("e2e-snap"), Some(false)),
        "{t}"
    );
    let list = json_of(&stack.cli(&["--json", "snapshot", "list"]));
    assert_eq!(list["templates"].as_array().unwrap().len(), 1, "{list}");
    let child = json_of(&stack.cli(&["--json", "sandbox", "create", "--template", "e2e-snap"]));
    let child_id = child["id"].as_str().unwrap().to_string();
    assert_eq!(stack.sh(&child_id, "cat /keep")["stdout"], "kept\n");
    // In use: refused.
    let out = stack.cli(&["snapshot", "rm", "e2e-snap"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use")
            || String::from_utf8_lossy(&out.stderr).contains("used by")
    );

    // Fork: two running copies, each with the file, each its own.
    let f = json_of(&stack.cli(&["--json", "sandbox", "fork", &id, "--count", "2"]));
    let copies: Vec<String> = f["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(copies.len(), 2, "{f}");
    for c in &copies {
        assert_eq!(stack.sh(c, "cat /keep")["stdout"], "kept\n");
    }
    stack.sh(&copies[0], "echo mine > /keep");
    assert_eq!(stack.sh(&copies[1], "cat /keep")["stdout"], "kept\n");
    assert_eq!(stack.sh(&id, "cat /keep")["stdout"], "kept\n");

    for s in copies.iter().chain([&child_id, &id]) {
        stack.delete(s);
    }
    let out = stack.cli(&["snapshot", "rm", "e2e-snap"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn on_timeout_pause_pauses_instead_of_destroying_and_a_warm_snapshot_restores() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let _cleanup = Cleanup(&stack);
    let sb = json_of(&stack.cli(&[
        "--json",
        "sandbox",
        "create",
        "--timeout-s",
        "8",
        "--on-timeout",
        "pause",
    ]));
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["on_timeout"], "pause", "{sb}");
    let r = stack.sh(&id, "echo warm > /tmp/mem-only");
    assert_eq!(r["exit_code"], 0, "{r}");
    // The reconciler (every 2 s) pauses it once its time is up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let state = loop {
        let v = json_of(&stack.cli(&["--json", "sandbox", "get", &id]));
        if v["state"] != "running" || std::time::Instant::now() > deadline {
            break v["state"].clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert_eq!(state, "paused", "not paused at its timeout");
    let v = json_of(&stack.cli(&["--json", "sandbox", "resume", &id, "--timeout", "600"]));
    assert_eq!(v["state"], "running", "{v}");
    // /tmp is in memory: only a restore brings it back.
    assert_eq!(stack.sh(&id, "cat /tmp/mem-only")["stdout"], "warm\n");

    // A snapshot with memory: a sandbox from it starts with the same memory.
    let t = json_of(&stack.cli(&[
        "--json", "snapshot", "create", &id, "--name", "e2e-snap", "--memory",
    ]));
    assert_eq!(t["has_memory"], true, "{t}");
    let child = json_of(&stack.cli(&["--json", "sandbox", "create", "--template", "e2e-snap"]));
    let child_id = child["id"].as_str().unwrap().to_string();
    assert_eq!(stack.sh(&child_id, "cat /tmp/mem-only")["stdout"], "warm\n");
    // ...but its own identity.
    assert_eq!(
        stack.sh(&child_id, "hostname")["stdout"],
        format!("{child_id}\n")
    );
}

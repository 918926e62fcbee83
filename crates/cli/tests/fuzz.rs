//! OpenAPI-driven fuzzing of the whole public API over a real stack (real VMs under
//! TCG): schemathesis (pinned, installed by scripts/install-deps.sh into
//! /opt/hearth/venv) reads `/v1/openapi.json` and sends generated and boundary
//! requests; any 5xx, any status the document does not list, any response that does not
//! match its schema or content type fails the test with schemathesis' report.
//!
//! Bounded: few examples per operation, one worker, a wall-clock limit after which the
//! fuzzer is killed by PID (a failure: the run must fit). Traffic goes only to the
//! loopback stack. Sandboxes it creates are removed at the end and must leave nothing.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{e2e_available, leftovers, Stack};
use reqwest::Method;
use serde_json::{json, Value};

/// The pinned version; scripts/install-deps.sh installs the same.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// Wall-clock limit of one fuzzer run.
const FUZZ_WALL_LIMIT: Duration = Duration::from_secs(8 * 60);

/// The schemathesis executable: $HEARTH_SCHEMATHESIS, the venv of install-deps.sh, or
/// PATH; `None` when none is there in the pinned version.
fn schemathesis() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("HEARTH_SCHEMATHESIS").map(PathBuf::from),
        Some(PathBuf::from(
            std::env::var("HEARTH_VENV").unwrap_or_else(|_| "/opt/hearth/venv".into()),
        ))
        .map(|v| v.join("bin/schemathesis")),
        Some(PathBuf::from("schemathesis")),
    ];
    candidates.into_iter().flatten().find(|exe| {
        Command::new(exe).arg("--version").output().is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim()
                == format!("schemathesis, version {SCHEMATHESIS_VERSION}")
        })
    })
}

/// Every sandbox of the stack's team, in any state.
fn all_sandboxes(stack: &Stack) -> Vec<Value> {
    let r = stack
        .req(Method::GET, "/v1/sandboxes?all=true&limit=1000")
        .send()
        .expect("list");
    assert!(r.status().is_success(), "list: {:?}", r.text());
    let v: Value = r.json().expect("list json");
    v["sandboxes"].as_array().cloned().unwrap_or_default()
}

#[test]
fn openapi_fuzzing_finds_no_server_error_or_undocumented_answer() {
    if !e2e_available() {
        return;
    }
    let Some(exe) = schemathesis() else {
        let msg =
            format!("schemathesis {SCHEMATHESIS_VERSION} not found (run scripts/install-deps.sh)");
        if std::env::var("HEARTH_REQUIRE_E2E").is_ok_and(|v| v == "1") {
            panic!("fuzz test required but cannot run: {msg}");
        }
        eprintln!("\n*** SKIPPING fuzz test: {msg} ***\n");
        return;
    };
    let stack = Stack::start();

    // One running sandbox for exec, files and get to reach a real guest; the fuzzer's
    // own creates (from the document's examples) add a few more.
    let target = stack.create(json!({"template": "minimal", "timeout_s": 1800}));
    let id = target["id"].as_str().expect("id").to_string();

    let dir = stack.dir.path();
    let config = dir.join("schemathesis.toml");
    // The target sandbox is pinned for exec, files and get (not for delete, which would
    // end it early); the other operations get generated IDs (400 / 404), but for the
    // revocation of keys (below).
    std::fs::write(
        &config,
        format!(
            r#"
[[operations]]
include-path-regex = "^/v1/sandboxes/\\{{id\\}}/(exec|files)$"
parameters = {{ "path.id" = "{id}" }}

[[operations]]
include-path = "/v1/sandboxes/{{id}}"
include-method = "GET"
parameters = {{ "path.id" = "{id}" }}

[[operations]]
include-path = "/v1/sandboxes"
include-method = "POST"
generation = {{ max-examples = 8 }}

# Revocations get a key ID that does not exist: the fuzzer reuses IDs from earlier
# answers and would otherwise revoke the key it runs with (as it is allowed to).
[[operations]]
include-path-regex = "^/v1/(admin/)?keys/\\{{key_id\\}}$"
include-method = "DELETE"
parameters = {{ "path.key_id" = "key-000000000000" }}
"#
        ),
    )
    .expect("write schemathesis.toml");
    let report = dir.join("schemathesis.txt");
    let out = std::fs::File::create(&report).expect("report file");
    // Fixed by default so that CI runs are repeatable; set to explore.
    let seed = std::env::var("HEARTH_FUZZ_SEED").unwrap_or_else(|_| "20261123".into());
    let checks = std::env::var("HEARTH_FUZZ_CHECKS").unwrap_or_else(|_| {
        "not_a_server_error,status_code_conformance,content_type_conformance,\
         response_schema_conformance"
            .into()
    });
    let mut child = Command::new(&exe)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/v1/openapi.json", stack.url))
        .args(["--url", &stack.url])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", stack.api_key),
        ])
        .args(["--checks", &checks])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "50"])
        .args(["--workers", "1"])
        .args(["--seed", &seed])
        .args(["--request-timeout", "120"])
        .args(["--max-redirects", "0"])
        // An event stream never ends by itself: every case would run into the timeout.
        .args(["--exclude-path", "/v1/events"])
        .arg("--no-color")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("report file"))
        .stderr(out)
        .spawn()
        .expect("start schemathesis");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for schemathesis") {
            break Some(s);
        }
        if started.elapsed() > FUZZ_WALL_LIMIT {
            // Our own child, by PID.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    eprintln!(
        "schemathesis took {:.0} s; its report:\n{text}",
        started.elapsed().as_secs_f64()
    );

    // Clean up whatever the fuzzer created, then check nothing is left on the host.
    let created: Vec<String> = all_sandboxes(&stack)
        .iter()
        .filter_map(|s| s["id"].as_str().map(str::to_string))
        .collect();
    eprintln!("sandboxes after fuzzing: {}", created.len());
    for sid in &created {
        let _ = stack
            .req(Method::DELETE, &format!("/v1/sandboxes/{sid}"))
            .send();
    }
    let still: Vec<String> = all_sandboxes(&stack)
        .iter()
        .filter(|s| !matches!(s["state"].as_str(), Some("stopped" | "error")))
        .map(|s| format!("{} {}", s["id"], s["state"]))
        .collect();
    assert!(still.is_empty(), "not stopped after delete: {still:?}");
    for sid in &created {
        let left = leftovers(sid, &stack.run_dir());
        assert!(left.is_empty(), "{sid} left {left:?}");
    }
    // Snapshots the fuzzer made (POST .../snapshots on a sandbox it created) live in
    // the shared images directory: delete the team's templates too.
    let templates: Value = stack
        .req(Method::GET, "/v1/templates")
        .send()
        .expect("list templates")
        .json()
        .expect("templates JSON");
    let own: Vec<String> = templates["templates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["team_id"] != "00000000-0000-0000-0000-000000000000")
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect();
    eprintln!("snapshots after fuzzing: {own:?}");
    for name in &own {
        let r = stack
            .req(Method::DELETE, &format!("/v1/templates/{name}"))
            .send()
            .expect("delete template");
        assert_eq!(r.status().as_u16(), 204, "delete template {name}");
    }

    match status {
        None => {
            panic!("schemathesis did not finish within {FUZZ_WALL_LIMIT:?}; report so far above")
        }
        Some(s) => assert!(
            s.success(),
            "schemathesis found problems ({s}); its report is above"
        ),
    }
}

/// What fuzzing by hand found before (issue 5), over the real stack: each must stay a
/// clear 4xx (or a success), never a 5xx, a plain-text error or a hang.
#[test]
fn hand_found_fuzz_cases_stay_fixed() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let sb = stack.create(json!({"template": "minimal", "timeout_s": 600}));
    let id = sb["id"].as_str().expect("id").to_string();

    let json_error = |r: reqwest::blocking::Response, what: &str| -> (u16, Value) {
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = r.text().unwrap_or_default();
        assert_eq!(ct, "application/json", "{what}: {status} {text:?}");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        (status, v)
    };

    // A path component over NAME_MAX (255 bytes): 4xx, not 500.
    let long = format!("/tmp/{}", "a".repeat(300));
    let r = stack.get_file(&id, &[("path", &long)]);
    let (status, v) = json_error(r, "download of a 300-byte name");
    assert!((400..500).contains(&status), "download: {status} {v}");
    let r = stack.put_file(&id, &[("path", &long)], "x");
    let (status, v) = json_error(r, "upload of a 300-byte name");
    assert!((400..500).contains(&status), "upload: {status} {v}");
    let r = stack
        .req(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .json(&json!({"cmd": ["true"], "cwd": long}))
        .send()
        .expect("exec");
    assert!(
        r.status().as_u16() < 500,
        "exec with a 300-byte cwd: {} {:?}",
        r.status(),
        r.text()
    );
    let r = stack
        .req(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .json(&json!({"cmd": ["a".repeat(300)]}))
        .send()
        .expect("exec");
    assert!(
        r.status().as_u16() < 500,
        "exec of a 300-byte program name: {} {:?}",
        r.status(),
        r.text()
    );

    // A sysfs file (size 4096 in stat, shorter when read): its bytes, not a 503.
    let r = stack.get_file(&id, &[("path", "/sys/class/net/eth0/address")]);
    let status = r.status().as_u16();
    let body = r.text().unwrap_or_default();
    assert_eq!(status, 200, "sysfs download: {body}");
    assert_eq!(body.trim().len(), 17, "a MAC address: {body:?}");

    // Limits of the listener answer in JSON over the real server too.
    let r = stack
        .req(
            Method::GET,
            &format!("/v1/sandboxes?next_token={}", "a".repeat(9000)),
        )
        .send()
        .expect("long URI");
    let (status, v) = json_error(r, "9 KB request target");
    assert_eq!(status, 414, "{v}");
    let r = stack
        .req(Method::GET, "/v1/templates")
        .header("x-big", "b".repeat(40 * 1024))
        .send()
        .expect("big header");
    let (status, v) = json_error(r, "40 KB header");
    assert_eq!(status, 431, "{v}");
    let r = stack
        .req(Method::PATCH, "/v1/sandboxes")
        .send()
        .expect("patch");
    let (status, v) = json_error(r, "unknown method");
    assert_eq!(status, 405, "{v}");

    // An out-of-range number is reported as sent.
    let r = stack
        .req(Method::POST, "/v1/sandboxes")
        .json(&json!({"template": "minimal", "vcpus": -1}))
        .send()
        .expect("create");
    let (status, v) = json_error(r, "vcpus -1");
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("-1"),
        "the message quotes what was sent: {msg}"
    );

    // A lifetime shorter than a TCG boot still gives a sandbox (which then expires).
    let short = stack.create(json!({"template": "minimal", "timeout_s": 1}));
    assert_eq!(short["state"], "running", "{short}");

    // Deleting a sandbox ends an exec that waits in it at once, not when it times out.
    let exec = {
        let (url, key, id) = (stack.url.clone(), stack.api_key.clone(), id.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = reqwest::blocking::Client::new()
                .post(format!("{url}/v1/sandboxes/{id}/exec"))
                .bearer_auth(key)
                .json(&json!({"cmd": ["sleep", "120"], "timeout_s": 300}))
                .timeout(Duration::from_secs(200))
                .send();
            (t.elapsed(), r.map(|r| r.status().as_u16()))
        })
    };
    // The exec is running once `sleep 120` shows up in the guest.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ps = stack.sh(&id, "ps | grep -c '[s]leep 120' || true");
        if ps["stdout"].as_str().unwrap_or("0").trim() != "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the exec never started");
    }
    let deleted = Instant::now();
    stack.delete(&id);
    let (_, status) = exec.join().expect("exec thread");
    let after = deleted.elapsed();
    assert!(
        after < Duration::from_secs(15),
        "exec went on {after:?} after its sandbox was deleted ({status:?})"
    );
}

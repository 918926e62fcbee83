//! E2B's own SDKs, unchanged, against a real hearth stack (real VMs): the Python
//! suite (tests/e2b/python, pytest, `e2b` from PyPI) and the npm one (tests/e2b/node,
//! `node --test`, `e2b` from npm), each given only the environment `hearth e2b env`
//! prints (plus PATH and HOME). Their SDKs and runners come from
//! scripts/install-test-deps.sh; with HEARTH_REQUIRE_E2E=1 a missing one is a failure.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{e2e_available, Stack};

const VENV: &str = "/var/lib/hearth/test/e2b-venv";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `hearth e2b env --json` of this stack.
fn e2b_env(stack: &Stack) -> BTreeMap<String, String> {
    let out = stack.cli(&["e2b", "env", "--json"]);
    assert!(
        out.status.success(),
        "hearth e2b env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("hearth e2b env --json prints an object")
}

/// Whether the SDKs' runners are installed; a loud skip (or, when required, a panic)
/// when not.
fn runners_available() -> bool {
    let mut why = Vec::new();
    if !Path::new(VENV).join("bin/python3").exists() {
        why.push(format!("no venv at {VENV}"));
    }
    if !repo().join("tests/e2b/node/node_modules/e2b").exists() {
        why.push("no tests/e2b/node/node_modules (npm ci)".to_owned());
    }
    if why.is_empty() {
        return true;
    }
    let why = format!("{} (run scripts/install-test-deps.sh)", why.join("; "));
    assert!(
        std::env::var("HEARTH_REQUIRE_E2E").as_deref() != Ok("1"),
        "E2B SDK tests required but cannot run: {why}"
    );
    eprintln!("\n*** SKIPPING E2B SDK tests: {why} ***\n");
    false
}

/// Run `cmd` in `dir` with only `env` (+ PATH, HOME); panic with its output on failure.
fn run_sdk_suite(name: &str, mut cmd: Command, dir: &Path, env: &BTreeMap<String, String>) {
    let home = tempfile::tempdir().expect("home");
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        // No __pycache__ in the work tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .envs(env)
        .stdin(Stdio::null());
    let started = std::time::Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- {name} ({:.1?}) ---\n{text}", started.elapsed());
    assert!(out.status.success(), "{name} failed:\n{text}");
}

/// The stack's live sandboxes (`GET /v1/sandboxes`).
fn live_sandboxes(stack: &Stack) -> serde_json::Value {
    stack
        .req(reqwest::Method::GET, "/v1/sandboxes")
        .send()
        .and_then(|r| r.json::<serde_json::Value>())
        .expect("list")
}

#[test]
fn e2b_python_and_npm_sdks_work_unchanged() {
    if !e2e_available() || !runners_available() {
        return;
    }
    let stack = Stack::start();
    let mut env = e2b_env(&stack);
    assert_eq!(
        env.keys().map(String::as_str).collect::<Vec<_>>(),
        ["E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL"]
    );
    env.insert(
        "HEARTH_E2B_RUN".into(),
        format!("run-{}", std::process::id()),
    );

    let mut pytest = Command::new(Path::new(VENV).join("bin/python3"));
    pytest.args([
        "-m",
        "pytest",
        "-v",
        "-p",
        "no:cacheprovider",
        "test_sdk.py",
    ]);
    run_sdk_suite(
        "pytest (e2b Python SDK)",
        pytest,
        &repo().join("tests/e2b/python"),
        &env,
    );

    let mut node = Command::new("node");
    node.args(["--test", "test.mjs"]);
    run_sdk_suite(
        "node --test (e2b npm SDK)",
        node,
        &repo().join("tests/e2b/node"),
        &env,
    );

    // Every sandbox the suites made is gone (they kill what they create).
    let left = live_sandboxes(&stack);
    assert_eq!(
        left["sandboxes"].as_array().map(Vec::len),
        Some(0),
        "left behind: {left}"
    );
}

#[test]
fn bench_e2b_measures_both_paths_and_writes_its_result() {
    if !e2e_available() || !runners_available() {
        return;
    }
    let stack = Stack::start();
    let out_dir = tempfile::tempdir().expect("out dir");
    let out_arg = out_dir.path().to_string_lossy().into_owned();
    let out = stack.cli(&[
        "bench",
        "e2b",
        "--samples",
        "1",
        "--json",
        "--out-dir",
        &out_arg,
    ]);
    assert!(
        out.status.success(),
        "bench e2b failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in [
        "sdk_total_p50_ms",
        "native_total_p50_ms",
        "sdk_run_p50_ms",
        "native_create_p50_ms",
    ] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert!(
        v["sdk_over_native_p50"]
            .as_f64()
            .is_some_and(f64::is_finite),
        "{v}"
    );
    let written: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert_eq!(written.len(), 1, "one results file");
    let left = live_sandboxes(&stack);
    assert_eq!(
        left["sandboxes"].as_array().map(Vec::len),
        Some(0),
        "{left}"
    );
}

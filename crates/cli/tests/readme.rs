//! The README's examples, run as written against a real stack, so they cannot rot:
//! the `curl` lines of "The API" and every `$ hearth …` line of the tour, read from
//! README.md at test time. Only the address (`http://127.0.0.1:7420` -> the test
//! stack's) and the sandbox ID (the README's -> the one just created) are substituted.
//! The CLI and `KEY=$(jq …)` find the key where `hearth up` stores it
//! (`~/.config/hearth/credentials.json`, with HOME set to a temporary directory).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{e2e_available, hearth_bin, Stack};
use serde_json::Value;

const README_URL: &str = "http://127.0.0.1:7420";

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    std::fs::read_to_string(&path).expect("README.md")
}

/// The fenced blocks of `lang` under the heading `section`.
fn blocks(readme: &str, section: &str, lang: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut in_section = false;
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        if let Some(block) = current.as_mut() {
            if line.trim_start().starts_with("```") {
                out.push(current.take().unwrap_or_default());
            } else {
                block.push(line.to_string());
            }
            continue;
        }
        if line.starts_with("## ") {
            in_section = line.trim_start_matches("## ").trim() == section;
        } else if in_section && line.trim() == format!("```{lang}") {
            current = Some(Vec::new());
        }
    }
    out
}

/// A shell in a temporary HOME holding the stack's credentials, with `hearth` on PATH.
struct Shell {
    home: tempfile::TempDir,
    bin_dir: std::path::PathBuf,
}

impl Shell {
    fn new(stack: &Stack) -> Shell {
        let home = tempfile::tempdir().expect("tempdir");
        let conf = home.path().join(".config/hearth");
        std::fs::create_dir_all(&conf).expect("config dir");
        let creds = serde_json::json!({"url": stack.url, "api_key": stack.api_key});
        std::fs::write(conf.join("credentials.json"), creds.to_string()).expect("credentials");
        let bin_dir = Path::new(hearth_bin())
            .parent()
            .expect("bin dir")
            .to_path_buf();
        Shell { home, bin_dir }
    }

    /// Run `script` with bash in HOME; (exit status ok, stdout + stderr).
    fn run(&self, script: &str, env: &[(&str, &str)]) -> (bool, String) {
        let path = format!(
            "{}:{}",
            self.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .args(["-c", script])
            .current_dir(self.home.path())
            .env("HOME", self.home.path())
            .env("PATH", path)
            .env_remove("HEARTH_URL")
            .env_remove("HEARTH_API_KEY")
            .env_remove("HEARTH_CREDENTIALS")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run bash");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

#[test]
fn readme_api_curl_examples_work_as_written() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let shell = Shell::new(&stack);
    let lines: Vec<String> = blocks(&readme(), "The API", "sh")
        .concat()
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    let key_line = lines
        .iter()
        .find(|l| l.starts_with("KEY="))
        .expect("the README's KEY= line");
    let curls: Vec<&String> = lines.iter().filter(|l| l.starts_with("curl ")).collect();
    assert!(curls.len() >= 2, "README's API block lost its curl lines");
    let mut sandbox: Option<String> = None;
    for curl in curls {
        let mut line = curl.replace(README_URL, &stack.url);
        if line.contains("sb-…") {
            let id = sandbox
                .as_deref()
                .expect("a curl that creates a sandbox first");
            line = line.replace("sb-…", id);
        }
        let (ok, out) = shell.run(&format!("set -e\n{key_line}\n{line}"), &[]);
        assert!(ok, "README line failed: {curl}\n{out}");
        let v: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("README line {curl} printed no JSON ({e}): {out}"));
        assert!(
            !v["error"].is_object(),
            "README line {curl} got an error: {v}"
        );
        if let Some(id) = v["id"].as_str() {
            assert_eq!(v["state"], "running", "{v}");
            sandbox = Some(id.to_string());
        }
        if line.contains("/exec") {
            assert_eq!(v["exit_code"], 0, "{v}");
        }
    }
    let id = sandbox.expect("the README's curl lines create a sandbox");
    stack.delete(&id);
}

/// Output lines that differ from run to run (times, IDs of hosts and teams, the host's
/// kernel) are not compared.
fn comparable(line: &str) -> bool {
    let varies = ["created_at", "expires_at", "host_id", "team_id", "2026-"];
    !varies.iter().any(|v| line.contains(v))
}

fn words(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn readme_tour_runs_as_written() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let shell = Shell::new(&stack);
    let tour = blocks(&readme(), "A 60-second tour", "console").concat();
    // (command, the output the README shows for it)
    let mut steps: Vec<(String, Vec<String>)> = Vec::new();
    for line in &tour {
        if let Some(cmd) = line.strip_prefix("$ ") {
            steps.push((cmd.to_string(), Vec::new()));
        } else if let Some((_, out)) = steps.last_mut() {
            out.push(line.clone());
        }
    }
    assert!(steps.len() >= 5, "the tour lost its commands: {steps:?}");
    let readme_id = tour
        .iter()
        .find_map(|l| l.strip_prefix("id").map(str::trim))
        .filter(|id| id.starts_with("sb-"))
        .expect("the tour's create shows an id")
        .to_string();
    // `hearth cp hello.txt …` copies a file the reader has; the README shows 37 bytes.
    std::fs::write(
        shell.home.path().join("hello.txt"),
        "hello from the host, into a sandbox!\n",
    )
    .expect("hello.txt");
    let mut id: Option<String> = None;
    for (cmd, shown) in &steps {
        let mut script = cmd.clone();
        if let Some(id) = &id {
            script = script.replace(&readme_id, id);
        }
        // Every line succeeds as a whole (the failing exec is followed by `echo`).
        let (ok, out) = shell.run(&script, &[]);
        assert!(ok, "tour command failed: $ {cmd}\n{out}");
        if cmd.starts_with("hearth sandbox create") {
            let new_id = out
                .lines()
                .find_map(|l| l.strip_prefix("id").map(str::trim))
                .filter(|s| s.starts_with("sb-"))
                .unwrap_or_else(|| panic!("create printed no id: {out}"))
                .to_string();
            id = Some(new_id);
        }
        if cmd.contains("uname -r") {
            continue; // kernel releases differ between machines
        }
        let got = words(&out);
        for want in shown.iter().filter(|l| comparable(l)) {
            let want = match &id {
                Some(id) => want.replace(&readme_id, id),
                None => want.clone(),
            };
            assert!(
                got.contains(&words(&want)),
                "$ {cmd}: the README shows {want:?}, the command printed:\n{out}"
            );
        }
    }
    let id = id.expect("the tour creates a sandbox");
    let r = stack
        .req(reqwest::Method::GET, &format!("/v1/sandboxes/{id}"))
        .send()
        .expect("get");
    let v: Value = r.json().expect("json");
    assert_ne!(v["state"], "running", "the tour's rm left it running: {v}");
}

/// The venv with E2B's Python SDK (pinned) that `scripts/install-test-deps.sh` makes.
const E2B_VENV: &str = "/var/lib/hearth/test/e2b-venv";

#[test]
fn readme_e2b_python_example_runs_unchanged() {
    if !e2e_available() {
        return;
    }
    let python = Path::new(E2B_VENV).join("bin/python3");
    if !python.exists() {
        let why = format!("no E2B SDK venv at {E2B_VENV} (run scripts/install-test-deps.sh)");
        assert!(
            std::env::var("HEARTH_REQUIRE_E2E").as_deref() != Ok("1"),
            "{why}"
        );
        eprintln!("\n*** SKIPPING: {why} ***\n");
        return;
    }
    let readme = readme();
    let sh = blocks(&readme, "E2B's SDKs, unchanged", "sh").concat();
    let eval = sh
        .iter()
        .find(|l| l.starts_with("eval "))
        .expect("the README's eval line");
    let eval = eval.split('#').next().unwrap_or(eval).trim();
    let code = blocks(&readme, "E2B's SDKs, unchanged", "python")
        .concat()
        .join("\n");
    assert!(
        code.contains("Sandbox.create"),
        "README lost its E2B example"
    );
    let stack = Stack::start();
    let shell = Shell::new(&stack);
    std::fs::write(shell.home.path().join("hello_e2b.py"), &code).expect("write example");
    // Only the venv differs from the README (the test suite's, made by install-test-deps).
    let (ok, out) = shell.run(
        &format!("set -e\n{eval}\n{} hello_e2b.py", python.display()),
        &[],
    );
    assert!(ok, "the README's E2B example failed:\n{out}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(
        lines.contains(&"42") && lines.contains(&"hello from hearth"),
        "{out}"
    );
    let left = stack
        .req(reqwest::Method::GET, "/v1/sandboxes")
        .send()
        .and_then(|r| r.json::<Value>())
        .expect("list");
    assert_eq!(
        left["sandboxes"].as_array().map(Vec::len),
        Some(0),
        "sbx.kill() left {left}"
    );
}

#[test]
fn readme_teams_and_keys_block_works_as_written() {
    // Needs no VM: a control plane alone.
    let stack = Stack::start_server_only();
    let shell = Shell::new(&stack);
    let block = blocks(&readme(), "Teams and API keys", "sh").concat();
    assert!(
        block.iter().any(|l| l.contains("hearth admin key create")),
        "README lost its keys example"
    );
    let (ok, out) = shell.run(&format!("set -euo pipefail\n{}", block.join("\n")), &[]);
    assert!(ok, "the README's teams and keys block failed:\n{out}");
    assert!(out.contains("ci") && out.contains("laptop"), "{out}");
    assert!(out.contains("hk_"), "keys are listed by prefix: {out}");
}

//! Two control planes on one PostgreSQL database (issue 8, "Must show"): both serve
//! the same API; background work runs on one of them (an advisory lock); `kill -9` of
//! that one while creates are in flight leaves the other serving, the lead moves to
//! it, and nothing is created twice or lost: every create that answered 201 is
//! running on the host, every create cut off ends `error` with its VM destroyed, and
//! the host runs exactly the sandboxes the database says are running.
//!
//! Real parts: `hearth server` processes, a `hearth agent` booting QEMU/TCG VMs, the
//! test PostgreSQL cluster of scripts/test-postgres.sh.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{e2e_available, free_port, hearth_bin, images_dir, Stack, AGENT_TOKEN};
use serde_json::{json, Value};

/// A second `hearth server` on the stack's database and agent.
struct Replica {
    child: Option<Child>,
    url: String,
    log: std::path::PathBuf,
}

impl Replica {
    fn start(stack: &Stack, name: &str, database_url: &str) -> Replica {
        let port = free_port();
        let dir = stack.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("server.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(hearth_bin())
            .args(["server", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args([
                "--agent-url",
                &format!("http://127.0.0.1:{}", stack.agent_port),
            ])
            .env("HEARTH_DATABASE_URL", database_url)
            .env("HEARTH_CREDENTIALS", dir.join("credentials.json"))
            .env("HEARTH_AGENT_TOKEN", AGENT_TOKEN)
            .envs(SERVER_ENV.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn hearth server");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while reqwest::blocking::get(format!("{url}/v1/health")).is_err() {
            assert!(Instant::now() < deadline, "replica {name} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Replica {
            child: Some(child),
            url,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) of our own unreaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}

/// Fast reconciler passes and a short create timeout, so the test sees the lead move
/// and cut-off creates resolved within seconds.
const SERVER_ENV: &[(&str, &str)] = &[
    ("HEARTH_RECONCILE_INTERVAL_MS", "300"),
    ("HEARTH_CREATE_TIMEOUT_S", "20"),
];

fn call(
    url: &str,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let c = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(180))
        .build()
        .unwrap();
    let mut r = c.request(method, format!("{url}{path}")).bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    match r.send() {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.json().unwrap_or(Value::Null))
        }
        // The replica was killed under the request.
        Err(_) => (0, Value::Null),
    }
}

fn leads(log: &str) -> bool {
    log.contains("leading background work")
}

#[test]
fn two_replicas_on_postgres_survive_a_kill_9_during_creates() {
    if !e2e_available() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(database_url) = rt.block_on(hearth_db::testing::scratch_postgres_url()) else {
        return;
    };
    // Replica A: the stack's own server (it bootstraps the admin key) and agent.
    let mut env: Vec<(&str, &str)> = SERVER_ENV.to_vec();
    env.push(("HEARTH_DATABASE_URL", &database_url));
    let stack = Stack::start_custom(images_dir(), &[], &env);
    let key = stack.api_key.clone();
    let a_url = stack.url.clone();
    let a_log = || std::fs::read_to_string(stack.dir.path().join("server.log")).unwrap_or_default();
    // A took the lead at its first pass; B, started after, must not.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !leads(&a_log()) {
        assert!(
            Instant::now() < deadline,
            "replica A never led:\n{}",
            a_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = Replica::start(&stack, "b", &database_url);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!leads(&b.log()), "B leads beside A:\n{}", b.log());

    // The same API on both: A's key works on B, and B sees A's sandbox.
    let (s, first) = call(
        &a_url,
        &key,
        reqwest::Method::POST,
        "/v1/sandboxes",
        Some(json!({"template": "minimal"})),
    );
    assert_eq!(s, 201, "{first}");
    let first_id = first["id"].as_str().unwrap().to_string();
    let (s, seen) = call(
        &b.url,
        &key,
        reqwest::Method::GET,
        &format!("/v1/sandboxes/{first_id}"),
        None,
    );
    assert_eq!(
        (s, seen["state"].as_str()),
        (200, Some("running")),
        "{seen}"
    );

    // Creates through both replicas at once; A is killed (SIGKILL) while its second
    // create is in flight.
    let created = std::sync::Mutex::new(vec![first_id]);
    let a_pid = stack.server.as_ref().map(|c| c.id()).unwrap();
    std::thread::scope(|scope| {
        let created = &created;
        let key = &key;
        let b_url = b.url.clone();
        scope.spawn(move || {
            for _ in 0..3 {
                let (s, v) = call(
                    &b_url,
                    key,
                    reqwest::Method::POST,
                    "/v1/sandboxes",
                    Some(json!({"template": "minimal"})),
                );
                assert_eq!(s, 201, "create through B: {v}");
                created
                    .lock()
                    .unwrap()
                    .push(v["id"].as_str().unwrap().to_string());
            }
        });
        let a_url = a_url.clone();
        scope.spawn(move || {
            let killer = std::thread::spawn(move || {
                // Cut A mid-create: its first create here takes seconds under TCG.
                std::thread::sleep(Duration::from_millis(800));
                // SAFETY: kill(2) of the stack's server, our own child.
                unsafe { libc::kill(a_pid as i32, libc::SIGKILL) };
            });
            let (s, v) = call(
                &a_url,
                key,
                reqwest::Method::POST,
                "/v1/sandboxes",
                Some(json!({"template": "minimal"})),
            );
            // A cold boot under TCG takes seconds: the kill lands before the answer.
            assert_eq!(s, 0, "A answered before it was killed: {v}");
            killer.join().unwrap();
        });
    });

    // The lead moves to B within a few passes of A's death.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !leads(&b.log()) {
        assert!(
            Instant::now() < deadline,
            "the lead did not move to B:\n{}",
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // B still serves, and its reconciler acts: cut-off creates (`starting` rows of the
    // dead replica) end `error` once the create timeout passes.
    let deadline = Instant::now() + Duration::from_secs(90);
    let rows = loop {
        let (s, v) = call(
            &b.url,
            &key,
            reqwest::Method::GET,
            "/v1/sandboxes?state=starting,running,error",
            None,
        );
        assert_eq!(s, 200, "{v}");
        let rows = v["sandboxes"].as_array().cloned().unwrap_or_default();
        if rows.iter().all(|r| r["state"] != "starting") {
            break rows;
        }
        assert!(Instant::now() < deadline, "rows still starting: {v}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let state_of = |id: &str| {
        rows.iter()
            .find(|r| r["id"] == id)
            .map(|r| r["state"].as_str().unwrap_or("").to_string())
    };
    let created = created.into_inner().unwrap();
    for id in &created {
        assert_eq!(
            state_of(id).as_deref(),
            Some("running"),
            "answered 201 but not running: {id}"
        );
    }
    // Nothing twice: one row per create that answered, at most one more (the cut one).
    let running: BTreeSet<String> = rows
        .iter()
        .filter(|r| r["state"] == "running")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        running,
        created.iter().cloned().collect::<BTreeSet<_>>(),
        "{rows:?}"
    );
    // The create cut off by the kill: its row ends `error` (the dead replica had
    // inserted it), never `running` and never twice.
    let failed: Vec<_> = rows.iter().filter(|r| r["state"] == "error").collect();
    assert_eq!(failed.len(), 1, "{rows:?}");
    assert_eq!(rows.len(), created.len() + 1, "{rows:?}");
    // The host runs exactly the running rows: a cut create's VM is destroyed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let on_host: BTreeSet<String> = std::fs::read_dir(stack.run_dir().join("sandboxes"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("sb-"))
                    .collect()
            })
            .unwrap_or_default();
        if on_host == running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "host holds {on_host:?}, database says running {running:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for id in &created {
        let (s, _) = call(
            &b.url,
            &key,
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            None,
        );
        assert_eq!(s, 204);
    }
    drop(b);
}

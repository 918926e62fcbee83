//! A control plane run in the test's process over real `hearth agent` processes
//! (each with its own images directory), its logs kept for assertions. For tests
//! that need what `hearth server` does not expose (a 100 ms reconciler, no
//! transition grace, calls into `App`).
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_control::app::Policy;
use hearth_control::{AgentHostClient, ControlConfig, HostClient, RunningControl};
use serde_json::Value;

use super::common::*;

/// The control plane's log lines, kept for the assertions.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// One subscriber per test process: every test's control plane logs here.
pub fn logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info,hearth_serve=debug,hyper=debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
    .clone()
}

/// Agent processes (each with its own images directory) and a control plane in
/// this process.
pub struct Plane {
    pub rt: tokio::runtime::Runtime,
    pub control: Option<RunningControl>,
    /// A client of each agent, in the order of `stacks`.
    pub hosts: Vec<AgentHostClient>,
    pub url: String,
    pub key: String,
    pub http: reqwest::blocking::Client,
    // Dropped last: stops the agents (which destroy what is left).
    pub stacks: Vec<Stack>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Plane {
    /// One agent.
    pub fn start(agent_env: &[(&str, &str)]) -> Plane {
        Self::start_hosts(1, agent_env)
    }

    /// `n` agents, each with its own images and run directories.
    pub fn start_hosts(n: usize, agent_env: &[(&str, &str)]) -> Plane {
        let mut dirs = Vec::new();
        let mut stacks = Vec::new();
        for _ in 0..n {
            let dir = tempfile::tempdir().expect("tempdir");
            let images = private_images(dir.path());
            stacks.push(Stack::agent_only(images, agent_env));
            dirs.push(dir);
        }
        let dir = &dirs[0];
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let agent_urls: Vec<String> = stacks
            .iter()
            .map(|s| format!("http://127.0.0.1:{}", s.agent_port))
            .collect();
        let mut cfg = ControlConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            format!("sqlite://{}/hearth.db?mode=rwc", dir.path().display()),
        );
        cfg.agent_urls = agent_urls.clone();
        cfg.agent_token = Some(AGENT_TOKEN.to_owned());
        cfg.reconcile_interval = Duration::from_millis(100);
        // No grace at all: only the in-flight set and compare-and-set writes keep
        // the reconciler off a sandbox that is changing.
        cfg.policy = Policy {
            transition_grace: Duration::ZERO,
            ..Policy::default()
        };
        let _ = logs();
        let control = rt.block_on(hearth_control::start(cfg)).expect("control");
        let key = control.bootstrap_key().expect("bootstrap key").to_owned();
        let url = format!("http://{}", control.local_addr());
        Plane {
            rt,
            control: Some(control),
            hosts: agent_urls
                .iter()
                .map(|u| AgentHostClient::new(u, Some(AGENT_TOKEN)).expect("agent client"))
                .collect(),
            url,
            key,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap(),
            stacks,
            _dirs: dirs,
        }
    }

    pub fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method.clone(), path, body);
        assert!((200..300).contains(&s), "{method} {path}: {s} {v}");
        v
    }

    pub fn post(&self, path: &str, body: Value) -> Value {
        self.ok(reqwest::Method::POST, path, Some(body))
    }

    pub fn get(&self, path: &str) -> Value {
        self.ok(reqwest::Method::GET, path, None)
    }

    pub fn state(&self, id: &str) -> String {
        self.get(&format!("/v1/sandboxes/{id}"))["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// What the host agent says of `id`: "running", "paused", "changing" or absent.
    pub fn host_phase(&self, id: &str) -> Option<String> {
        let list = self
            .rt
            .block_on(self.hosts[0].list_sandboxes())
            .expect("list");
        list.into_iter()
            .find(|s| s.id.as_str() == id)
            .map(|s| format!("{:?}", s.phase).to_lowercase())
    }

    /// Wait (bounded) until `f` holds.
    pub fn wait(&self, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the host is building a template now.
    pub fn building(&self) -> bool {
        std::fs::read_dir(self.stacks[0].images.join("templates"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            })
            .unwrap_or(false)
    }

    /// Names of the templates the team sees.
    pub fn template_names(&self) -> Vec<String> {
        self.get("/v1/templates")["templates"]
            .as_array()
            .expect("templates")
            .iter()
            .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// hearth's own changes of state (`sandbox.state` entries: lost, failed,
    /// corrected), of any sandbox.
    pub fn own_changes(&self) -> Vec<Value> {
        let page = self.get("/v1/audit?limit=500");
        page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "sandbox.state")
            .cloned()
            .collect()
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        if let Some(c) = self.control.take() {
            self.rt.block_on(c.shutdown());
        }
        if std::thread::panicking() {
            eprintln!("--- control plane log ---\n{}", logs().text());
        }
    }
}

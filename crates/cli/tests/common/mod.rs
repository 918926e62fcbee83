//! Test harness: a real hearth stack made of the `hearth` binary's own processes
//! (`hearth agent` with QEMU/TCG, netns and qcow2 disks; `hearth server` with SQLite),
//! on loopback ports, with a temporary run dir and database per stack.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn images_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("HEARTH_IMAGES_DIR").unwrap_or_else(|_| "/var/lib/hearth/images".into()),
    )
}

/// True when real VMs can run here; false (with a loud message) when they cannot and
/// the run does not demand them. CI sets HEARTH_REQUIRE_E2E=1, so there a missing
/// image or missing root is a failure, never a silent skip.
pub fn e2e_available() -> bool {
    let required = std::env::var("HEARTH_REQUIRE_E2E").is_ok_and(|v| v == "1");
    let mut why = Vec::new();
    if !images_dir().join("kernel/vmlinux").exists() {
        why.push(format!(
            "no kernel in {} (run scripts/build-images.sh)",
            images_dir().display()
        ));
    }
    if !images_dir().join("templates/minimal/rootfs.ext4").exists() {
        why.push("no minimal template image".to_string());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        why.push("not root (network namespaces need it)".to_string());
    }
    if why.is_empty() {
        return true;
    }
    if required {
        panic!(
            "end-to-end tests required but cannot run: {}",
            why.join("; ")
        );
    }
    eprintln!("\n*** SKIPPING end-to-end test: {} ***\n", why.join("; "));
    false
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

pub fn hearth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hearth")
}

/// The shared secret between the test's control plane and host agent.
pub const AGENT_TOKEN: &str = "test-agent-token-9f3b2c";

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub agent: Option<Child>,
    pub server: Option<Child>,
    pub agent_port: u16,
    pub api_port: u16,
    pub url: String,
    pub api_key: String,
    /// Images directory the agent serves templates from.
    pub images: PathBuf,
    /// Extra `hearth agent` flags (kept across agent restarts).
    pub agent_args: Vec<String>,
    /// Extra `hearth agent` environment (e.g. `HEARTH_AGENT_FAULTS`).
    pub agent_env: Vec<(String, String)>,
}

fn wait_http(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let client = reqwest::blocking::Client::new();
    loop {
        if let Ok(r) = client.get(url).timeout(Duration::from_secs(2)).send() {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Stack {
    pub fn start() -> Stack {
        Self::start_with_images(images_dir())
    }

    /// A stack whose agent serves the templates of `images` (tests that need their
    /// own templates, e.g. a hostile guest).
    pub fn start_with_images(images: PathBuf) -> Stack {
        Self::start_custom(images, &[], &[])
    }

    /// A stack with extra `hearth agent` flags and `hearth server` environment
    /// (capacity limits, team quotas).
    pub fn start_custom(
        images: PathBuf,
        agent_args: &[&str],
        server_env: &[(&str, &str)],
    ) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent_port = free_port();
        let api_port = free_port();
        let mut s = Stack {
            dir,
            agent: None,
            server: None,
            agent_port,
            api_port,
            url: format!("http://127.0.0.1:{api_port}"),
            api_key: String::new(),
            images,
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            agent_env: Vec::new(),
        };
        s.start_agent();
        s.start_server(server_env);
        s
    }

    /// Only `hearth agent` (serving `images`, with extra environment): for tests that
    /// run their own control plane in process (e.g. with a faster reconciler).
    pub fn agent_only(images: PathBuf, agent_env: &[(&str, &str)]) -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Stack {
            dir,
            agent: None,
            server: None,
            agent_port: free_port(),
            api_port: 0,
            url: String::new(),
            api_key: String::new(),
            images,
            agent_args: Vec::new(),
            agent_env: agent_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        s.start_agent();
        s
    }

    /// Only `hearth server`, its host agent's port left unanswered: for what needs no
    /// VM (accounts, keys, the CLI's error paths). Needs no root and no images.
    pub fn start_server_only() -> Stack {
        let dir = tempfile::tempdir().expect("tempdir");
        let api_port = free_port();
        let mut s = Stack {
            dir,
            agent: None,
            server: None,
            agent_port: free_port(),
            api_port,
            url: format!("http://127.0.0.1:{api_port}"),
            api_key: String::new(),
            images: images_dir(),
            agent_args: Vec::new(),
            agent_env: Vec::new(),
        };
        s.start_server(&[]);
        s
    }

    fn start_server(&mut self, server_env: &[(&str, &str)]) {
        let s = self;
        let api_port = s.api_port;
        let agent_port = s.agent_port;
        let creds = s.dir.path().join("credentials.json");
        let log = std::fs::File::create(s.dir.path().join("server.log")).expect("log");
        let server = Command::new(hearth_bin())
            .args(["server", "--listen", &format!("127.0.0.1:{api_port}")])
            .arg("--data-dir")
            .arg(s.dir.path().join("data"))
            .args(["--agent-url", &format!("http://127.0.0.1:{agent_port}")])
            .env("HEARTH_CREDENTIALS", &creds)
            .env("HEARTH_AGENT_TOKEN", AGENT_TOKEN)
            .env("RUST_LOG", "info")
            .envs(server_env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn hearth server");
        s.server = Some(server);
        wait_http(&format!("{}/v1/health", s.url), Duration::from_secs(60));
        // The server stores the key just after its API starts answering: wait for it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let c: Value = loop {
            let parsed = std::fs::read(&creds)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            match parsed {
                Some(c) if c["api_key"].is_string() => break c,
                _ if Instant::now() > deadline => panic!("no credentials in {creds:?} after 30 s"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.api_key = c["api_key"].as_str().expect("api_key").to_string();
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn start_agent(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("log");
        let agent = Command::new(hearth_bin())
            .args([
                "agent",
                "--listen",
                &format!("127.0.0.1:{}", self.agent_port),
            ])
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--images-dir")
            .arg(&self.images)
            .args(["--accel", "tcg", "--destroy-on-shutdown"])
            .args(&self.agent_args)
            .env("HEARTH_AGENT_TOKEN", AGENT_TOKEN)
            // Tests share one images directory and count what a host holds: no warm
            // variants or pool unless a test asks (--warm-templates, --warm-pool).
            .env("HEARTH_WARM_TEMPLATES", "none")
            .env("HEARTH_WARM_POOL", "0")
            .env("RUST_LOG", "info")
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn hearth agent");
        self.agent = Some(agent);
        wait_http(
            &format!("http://127.0.0.1:{}/healthz", self.agent_port),
            Duration::from_secs(60),
        );
    }

    /// SIGKILL the host agent: no cleanup code of it runs.
    pub fn kill9_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: plain kill(2) of a child we spawned and have not reaped.
            unsafe { libc::kill(a.id() as i32, libc::SIGKILL) };
            let _ = a.wait();
        }
    }

    pub fn http(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(180))
            .build()
            .expect("client")
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http()
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(&self.api_key)
    }

    pub fn create(&self, body: Value) -> Value {
        let r = self
            .req(reqwest::Method::POST, "/v1/sandboxes")
            .json(&body)
            .send()
            .expect("create");
        let status = r.status();
        let v: Value = r.json().expect("json");
        assert_eq!(status.as_u16(), 201, "create failed: {v}");
        v
    }

    pub fn exec(&self, id: &str, body: Value) -> Value {
        let r = self
            .req(reqwest::Method::POST, &format!("/v1/sandboxes/{id}/exec"))
            .json(&body)
            .send()
            .expect("exec");
        let status = r.status();
        let v: Value = r.json().expect("json");
        assert_eq!(status.as_u16(), 200, "exec failed: {v}");
        v
    }

    /// `PUT /v1/sandboxes/{id}/files` with the given query (path, user).
    pub fn put_file(
        &self,
        id: &str,
        query: &[(&str, &str)],
        body: impl Into<reqwest::blocking::Body>,
    ) -> reqwest::blocking::Response {
        self.req(reqwest::Method::PUT, &format!("/v1/sandboxes/{id}/files"))
            .query(query)
            .body(body)
            .send()
            .expect("upload")
    }

    /// `GET /v1/sandboxes/{id}/files` with the given query (path, user).
    pub fn get_file(&self, id: &str, query: &[(&str, &str)]) -> reqwest::blocking::Response {
        self.req(reqwest::Method::GET, &format!("/v1/sandboxes/{id}/files"))
            .query(query)
            .send()
            .expect("download")
    }

    /// HTTP status of an exec, for the cases where it must fail.
    pub fn sh_status(&self, id: &str, script: &str) -> u16 {
        self.req(reqwest::Method::POST, &format!("/v1/sandboxes/{id}/exec"))
            .json(&serde_json::json!({"cmd": ["sh", "-c", script]}))
            .send()
            .expect("exec")
            .status()
            .as_u16()
    }

    pub fn sh(&self, id: &str, script: &str) -> Value {
        self.exec(id, serde_json::json!({"cmd": ["sh", "-c", script]}))
    }

    pub fn delete(&self, id: &str) {
        let r = self
            .req(reqwest::Method::DELETE, &format!("/v1/sandboxes/{id}"))
            .send()
            .expect("delete");
        assert_eq!(r.status().as_u16(), 204, "delete {id}: {:?}", r.text());
    }

    /// Run the `hearth` CLI against this stack.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.api_key, args)
    }

    /// Run the `hearth` CLI against this stack with API key `key`.
    pub fn cli_as(&self, key: &str, args: &[&str]) -> Output {
        Command::new(hearth_bin())
            .args(args)
            .env("HEARTH_URL", &self.url)
            .env("HEARTH_API_KEY", key)
            .env("HEARTH_CREDENTIALS", self.dir.path().join("no-such-file"))
            .stdin(Stdio::null())
            .output()
            .expect("run hearth CLI")
    }

    pub fn logs(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!(
            "--- agent.log ---\n{}\n--- server.log ---\n{}",
            read("agent.log"),
            read("server.log")
        )
    }
}

fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SAFETY: kill(2) of our own unreaped child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        stop(&mut self.server);
        // The agent runs with --destroy-on-shutdown: SIGTERM destroys its sandboxes.
        stop(&mut self.agent);
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// An images directory of its own in `dir` (the kernel and the `minimal` template
/// linked from the installed ones), so that a test's snapshots land there and
/// nowhere shared. `dir` is made traversable for the VMs' unprivileged uid.
pub fn private_images(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let real = images_dir();
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("templates")).expect("images dir");
    std::os::unix::fs::symlink(real.join("kernel"), images.join("kernel")).expect("kernel link");
    std::os::unix::fs::symlink(
        real.join("templates/minimal"),
        images.join("templates/minimal"),
    )
    .expect("template link");
    for d in [dir, images.as_path(), images.join("templates").as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    images
}

/// Host resources that a sandbox may hold, checked by name/path after destroy.
pub fn leftovers(id: &str, run_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns");
    if String::from_utf8_lossy(&netns.stdout).contains(id) {
        found.push(format!("network namespace of {id}"));
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("qemu-system") && cmdline.contains(id) {
                found.push(format!("qemu process {:?}", e.file_name()));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.contains(id) {
        found.push(format!("mount of {id}"));
    }
    if run_dir.join("sandboxes").join(id).exists() {
        found.push(format!("run dir of {id}"));
    }
    if let Ok(slots) = std::fs::read_dir("/run/hearth/slots") {
        for s in slots.flatten() {
            if std::fs::read_to_string(s.path())
                .unwrap_or_default()
                .contains(id)
            {
                found.push(format!("network slot {:?}", s.file_name()));
            }
        }
    }
    found
}

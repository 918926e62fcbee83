//! A control plane and two host agents on real VMs, each in its own network namespace
//! with its own address, enrolled with one-time tokens and talking mutual TLS:
//! sandboxes spread over both; one agent killed (by its PID): its host goes
//! unreachable, then its sandboxes are lost while new ones go to the other; an agent
//! with a wrong token, a foreign or another host's certificate, or a revoked host's
//! credential is refused on both sides.
//!
//! Topology (all made here, removed on success and failure):
//! ```text
//! test (root ns) --veth--> [c] hearth server (0.0.0.0)
//!                           |--veth--> [a] hearth agent
//!                           '--veth--> [b] hearth agent
//! ```
//! The test only sends traffic to addresses inside these namespaces.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{e2e_available, hearth_bin, images_dir};
use serde_json::{json, Value};

const API_PORT: u16 = 7420;
const AGENT_PORT: u16 = 7421;

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces, links and processes of one run; `Drop` removes them all.
struct Net {
    tag: String,
    /// Third octet shared by the run's subnets.
    n: u32,
    procs: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

impl Net {
    fn ns(&self, which: &str) -> String {
        format!("hmh{}{which}", self.tag)
    }

    /// Address of the control plane as the test sees it (inside `c`).
    fn api(&self) -> String {
        format!("http://10.231.{}.2:{API_PORT}", self.n)
    }

    /// Address of agent `which` (`a` or `b`), inside its namespace.
    fn agent_addr(&self, which: &str) -> String {
        let subnet = if which == "a" { 232 } else { 233 };
        format!("10.{subnet}.{}.2", self.n)
    }

    /// The control plane's address on agent `which`'s link.
    fn control_for(&self, which: &str) -> String {
        let subnet = if which == "a" { 232 } else { 233 };
        format!("http://10.{subnet}.{}.1:{API_PORT}", self.n)
    }

    fn setup() -> Net {
        let pid = std::process::id();
        let n = 20 + pid % 200;
        let net = Net {
            tag: format!("{:x}", pid % 0xfffff),
            n,
            procs: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let (c, a, b) = (net.ns("c"), net.ns("a"), net.ns("b"));
        for ns in [&c, &a, &b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // root <-> c
        let root_if = format!("hmh{}r", net.tag);
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", "up0", "netns", &c,
        ]);
        ip(&["addr", "add", &format!("10.231.{n}.1/30"), "dev", &root_if]);
        ip(&["link", "set", &root_if, "up"]);
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("10.231.{n}.2/30"),
            "dev",
            "up0",
        ]);
        ip(&["-n", &c, "link", "set", "up0", "up"]);
        // c <-> a, c <-> b
        for (which, ns, subnet) in [("a", &a, 232), ("b", &b, 233)] {
            let in_c = format!("to{which}");
            ip(&[
                "-n", &c, "link", "add", &in_c, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ]);
            ip(&[
                "-n",
                &c,
                "addr",
                "add",
                &format!("10.{subnet}.{n}.1/30"),
                "dev",
                &in_c,
            ]);
            ip(&["-n", &c, "link", "set", &in_c, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.{subnet}.{n}.2/30"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log")
    }

    /// `hearth ARGS` in namespace `ns` (nsenter execs it, so the child's PID is
    /// hearth's). Not `ip netns exec`: that remounts /sys for the namespace, which
    /// hides the cgroup v1 hierarchies under /sys/fs/cgroup, and the agent then
    /// cannot confine its VMs; nsenter changes the network namespace only.
    fn spawn(&mut self, name: &str, ns: &str, args: &[String], env: &[(&str, &str)]) -> u32 {
        let log = self.log(name);
        let child = in_ns(ns)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn");
        let pid = child.id();
        self.procs.push((name.to_owned(), child));
        pid
    }

    fn agent_args(&self, which: &str, data: &Path, enroll: Option<&str>) -> Vec<String> {
        let mut args: Vec<String> = [
            "agent",
            "--listen",
            &format!("{}:{AGENT_PORT}", self.agent_addr(which)),
            "--accel",
            "tcg",
            "--destroy-on-shutdown",
            "--max-sandboxes",
            "8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push("--data-dir".into());
        args.push(data.display().to_string());
        args.push("--images-dir".into());
        args.push(images_dir().display().to_string());
        if let Some(t) = enroll {
            args.extend([
                "--control-url".into(),
                self.control_for(which),
                "--enroll-token".into(),
                t.into(),
            ]);
        }
        args
    }

    fn start_agent(&mut self, name: &str, which: &str, data: &Path, enroll: Option<&str>) -> u32 {
        let args = self.agent_args(which, data, enroll);
        let ns = self.ns(which);
        self.spawn(
            name,
            &ns,
            &args,
            &[("HEARTH_WARM_TEMPLATES", "none"), ("HEARTH_WARM_POOL", "0")],
        )
    }

    /// SIGTERM process `name` and wait (agents destroy their sandboxes on the way out).
    fn stop(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.procs.remove(i);
            stop_child(&mut c);
        }
    }

    /// SIGKILL process `name`: no cleanup code of it runs.
    fn kill9(&mut self, name: &str) -> u32 {
        let i = self
            .procs
            .iter()
            .position(|(n, _)| n == name)
            .expect("running");
        let (_, mut c) = self.procs.remove(i);
        let pid = c.id();
        // SAFETY: kill(2) of our own unreaped child, by its PID.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = c.wait();
        pid
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["server", "agent-a", "agent-a2", "rogue", "agent-b"] {
            let p = self.dir.path().join(format!("{name}.log"));
            if let Ok(t) = std::fs::read_to_string(&p) {
                let tail: Vec<&str> = t.lines().rev().take(60).collect();
                out.push_str(&format!("\n--- {name}.log (last lines) ---\n"));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// A `hearth` command that runs in network namespace `ns` (see [`Net::spawn`]).
fn in_ns(ns: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(hearth_bin());
    c
}

fn stop_child(c: &mut Child) {
    // SAFETY: kill(2) of our own unreaped child, by its PID.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // Agents first (they destroy their sandboxes), the server last.
        let mut procs = std::mem::take(&mut self.procs);
        procs.sort_by_key(|(n, _)| n == "server");
        for (_, c) in procs.iter_mut() {
            stop_child(c);
        }
        for which in ["a", "b", "c"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(which)])
                .status();
        }
        // Deleting c removed the root veth's peer, and so the pair; in case it did not:
        let _ = Command::new("ip")
            .args(["link", "del", &format!("hmh{}r", self.tag)])
            .stderr(Stdio::null())
            .status();
    }
}

struct Api {
    base: String,
    key: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(Value::Null))
    }

    fn host(&self, id: &str) -> Value {
        let (s, v) = self.call(reqwest::Method::GET, &format!("/v1/admin/hosts/{id}"), None);
        assert_eq!(s, 200, "{v}");
        v
    }

    fn create(&self) -> Value {
        let (s, v) = self.call(
            reqwest::Method::POST,
            "/v1/sandboxes",
            Some(json!({"template": "minimal", "timeout_s": 900})),
        );
        assert_eq!(s, 201, "create: {v}");
        v
    }

    fn sandbox(&self, id: &str) -> Value {
        let (s, v) = self.call(reqwest::Method::GET, &format!("/v1/sandboxes/{id}"), None);
        assert_eq!(s, 200, "{v}");
        v
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `curl` from inside namespace `c` to agent `which`'s health check with the given
/// client certificate and key (PEM files); true when the agent answered 200.
fn agent_accepts(
    net: &Net,
    which: &str,
    host_id: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> bool {
    let name = format!("{host_id}.hosts.hearth");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns("c"),
            "curl",
            "-s",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code}", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args([
            "--resolve",
            &format!("{name}:{AGENT_PORT}:{}", net.agent_addr(which)),
            &format!("https://{name}:{AGENT_PORT}/healthz"),
        ])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).trim() == "200"
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p
}

#[test]
fn two_enrolled_agents_in_their_own_namespaces() {
    if !e2e_available() {
        return;
    }
    let t0 = Instant::now();
    let mut net = Net::setup();
    let root = net.dir.path().to_owned();
    let creds = root.join("credentials.json");
    let server_args: Vec<String> = [
        "server",
        "--listen",
        &format!("0.0.0.0:{API_PORT}"),
        "--data-dir",
        &root.join("server").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let c = net.ns("c");
    let creds_s = creds.display().to_string();
    net.spawn(
        "server",
        &c,
        &server_args,
        &[
            ("HEARTH_CREDENTIALS", creds_s.as_str()),
            ("HEARTH_HOST_HEARTBEAT_MS", "300"),
            ("HEARTH_HOST_UNREACHABLE_AFTER_S", "2"),
            ("HEARTH_HOST_LOST_AFTER_S", "6"),
        ],
    );
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(180))
        .build()
        .unwrap();
    let health = format!("{}/v1/health", net.api());
    wait_for("the API answers", Duration::from_secs(60), || {
        http.get(&health)
            .send()
            .is_ok_and(|r| r.status().is_success())
    });
    let mut key = String::new();
    wait_for("the admin key is stored", Duration::from_secs(30), || {
        let v: Option<Value> = std::fs::read(&creds)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        key = v
            .and_then(|v| v["api_key"].as_str().map(str::to_owned))
            .unwrap_or_default();
        !key.is_empty()
    });
    let api = Api {
        base: net.api(),
        key,
        http,
    };

    // Two hosts, each with its one-time token.
    let mut hosts = Vec::new();
    for which in ["a", "b"] {
        let (s, v) = api.call(
            reqwest::Method::POST,
            "/v1/admin/hosts",
            Some(json!({"name": format!("host-{which}"),
                "url": format!("https://{}:{AGENT_PORT}", net.agent_addr(which))})),
        );
        assert_eq!(s, 201, "{v}");
        hosts.push((
            v["host"]["id"].as_str().unwrap().to_owned(),
            v["enrollment_token"].as_str().unwrap().to_owned(),
        ));
    }
    let (id_a, token_a) = hosts[0].clone();
    let (id_b, token_b) = hosts[1].clone();

    // A wrong token: the agent exits with the control plane's refusal, before it
    // serves anything.
    let out = in_ns(&net.ns("a"))
        .args(net.agent_args("a", &root.join("wrong"), Some("hearth_enroll_wrong")))
        .env("HEARTH_WARM_TEMPLATES", "none")
        .output()
        .expect("agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("enrollment refused (403"), "{err}");
    assert!(!root.join("wrong/agent-identity/cert.pem").exists());

    let data_a = root.join("agent-a");
    let data_b = root.join("agent-b");
    net.start_agent("agent-a", "a", &data_a, Some(&token_a));
    net.start_agent("agent-b", "b", &data_b, Some(&token_b));
    for id in [&id_a, &id_b] {
        wait_for(
            "the host is active with a heartbeat",
            Duration::from_secs(120),
            || {
                let h = api.host(id);
                h["status"] == "active" && h["last_heartbeat_at"].is_string()
            },
        );
    }
    // Identity files: directory 0700, files 0600.
    {
        use std::os::unix::fs::PermissionsExt;
        let d = data_a.join("agent-identity");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        for f in ["key.pem", "cert.pem", "ca.pem", "host-id"] {
            assert_eq!(mode(&d.join(f)), 0o600, "{f}");
        }
    }
    eprintln!("[{:?}] both agents enrolled and active", t0.elapsed());
    // The reconciler records the hosts' templates on its next pass.
    wait_for(
        "the minimal template is listed",
        Duration::from_secs(30),
        || {
            let (_, v) = api.call(reqwest::Method::GET, "/v1/templates", None);
            v.to_string().contains("\"minimal\"")
        },
    );

    // The agent's side of mutual TLS, tried from inside c with curl: the real control
    // certificate works; a foreign CA's, another host's, or none is refused.
    // The control plane's credential, read from its database as a replica would.
    let db_url = format!("sqlite://{}", root.join("server/hearth.db").display());
    let bundle = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let db = hearth_db::Db::connect(&db_url).await.expect("database");
        let b = db.get_or_create_secret("pki.ca.v1", Vec::new).await;
        db.close().await;
        b.expect("the CA secret")
    });
    let ca = hearth_pki::Ca::from_bytes(&bundle).expect("the stored CA");
    let pem = root.join("pem");
    std::fs::create_dir_all(&pem).unwrap();
    let ca_pem = write(&pem, "ca.pem", &ca.ca_cert_pem);
    let ctl_cert = write(&pem, "control.pem", &ca.control_cert_pem);
    let ctl_key = write(&pem, "control.key", ca.control_key_pem());
    assert!(agent_accepts(
        &net, "a", &id_a, &ca_pem, &ctl_cert, &ctl_key
    ));
    let foreign = hearth_pki::Ca::generate().unwrap();
    let f_cert = write(&pem, "foreign.pem", &foreign.control_cert_pem);
    let f_key = write(&pem, "foreign.key", foreign.control_key_pem());
    assert!(!agent_accepts(&net, "a", &id_a, &ca_pem, &f_cert, &f_key));
    let b_ident = data_b.join("agent-identity");
    assert!(!agent_accepts(
        &net,
        "a",
        &id_a,
        &ca_pem,
        &b_ident.join("cert.pem"),
        &b_ident.join("key.pem")
    ));
    let plain = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns("c"),
            "curl",
            "-s",
            "--max-time",
            "5",
        ])
        .arg(format!(
            "http://{}:{AGENT_PORT}/healthz",
            net.agent_addr("a")
        ))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain HTTP reached the agent");

    // Sandboxes spread over both hosts, and each works through its host.
    let mut on: std::collections::HashMap<String, Vec<String>> = Default::default();
    for _ in 0..4 {
        let v = api.create();
        on.entry(v["host_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(v["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(on.get(&id_a).map(Vec::len), Some(2), "{on:?}");
    assert_eq!(on.get(&id_b).map(Vec::len), Some(2), "{on:?}");
    for sb in [&on[&id_a][0], &on[&id_b][0]] {
        let (s, v) = api.call(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{sb}/exec"),
            Some(json!({"cmd": ["echo", "hi"]})),
        );
        assert_eq!((s, v["stdout"].clone()), (200, json!("hi\n")), "{v}");
    }
    eprintln!("[{:?}] 4 sandboxes spread over both hosts", t0.elapsed());

    // Agent a dies (SIGKILL by PID). First unreachable, its sandboxes not yet lost.
    let pid = net.kill9("agent-a");
    eprintln!("[{:?}] killed agent a (pid {pid})", t0.elapsed());
    wait_for("host a unreachable", Duration::from_secs(30), || {
        api.host(&id_a)["status"] == "unreachable"
    });
    let killed_at_seen = Instant::now();
    for sb in &on[&id_a] {
        assert_eq!(api.sandbox(sb)["state"], "running", "lost too early");
    }
    // New sandboxes go to b meanwhile.
    let v = api.create();
    assert_eq!(v["host_id"], json!(id_b), "{v}");
    let on_b_late = v["id"].as_str().unwrap().to_owned();
    // After the grace, a's sandboxes are lost; b's keep running.
    wait_for("a's sandboxes lost", Duration::from_secs(60), || {
        on[&id_a]
            .iter()
            .all(|sb| api.sandbox(sb)["state"] == "error")
    });
    assert!(killed_at_seen.elapsed() >= Duration::from_secs(2));
    for sb in &on[&id_a] {
        let v = api.sandbox(sb);
        assert!(
            v["error"].as_str().unwrap_or_default().contains("lost"),
            "{v}"
        );
    }
    for sb in &on[&id_b] {
        assert_eq!(api.sandbox(sb)["state"], "running");
    }
    eprintln!("[{:?}] a's sandboxes lost, b's running", t0.elapsed());

    // A rogue agent at a's address with b's (valid, same-CA) credential: the control
    // plane refuses it (the certificate names host b, not a): a stays unreachable.
    let rogue = root.join("rogue");
    std::fs::create_dir_all(&rogue).unwrap();
    let copy = Command::new("cp")
        .arg("-a")
        .arg(&b_ident)
        .arg(rogue.join("agent-identity"))
        .status()
        .unwrap();
    assert!(copy.success());
    net.start_agent("rogue", "a", &rogue, None);
    let hb = api.host(&id_a)["last_heartbeat_at"].clone();
    std::thread::sleep(Duration::from_secs(4));
    let h = api.host(&id_a);
    assert_eq!(
        (h["status"].clone(), h["last_heartbeat_at"].clone()),
        (json!("unreachable"), hb.clone())
    );
    // The control plane did try it: the rogue saw handshakes fail on its side.
    let rogue_log = std::fs::read_to_string(root.join("rogue.log")).unwrap_or_default();
    assert!(rogue_log.contains("TLS handshake refused"), "{rogue_log}");
    net.stop("rogue");

    // Revoked: a's real agent comes back with its own credential, and is refused.
    let (s, v) = api.call(
        reqwest::Method::DELETE,
        &format!("/v1/admin/hosts/{id_a}"),
        None,
    );
    assert_eq!((s, v["status"].clone()), (200, json!("revoked")), "{v}");
    net.start_agent("agent-a2", "a", &data_a, None);
    std::thread::sleep(Duration::from_secs(4));
    let h = api.host(&id_a);
    assert_eq!(
        (h["status"].clone(), h["last_heartbeat_at"].clone()),
        (json!("revoked"), hb)
    );
    let v = api.create();
    assert_eq!(v["host_id"], json!(id_b), "{v}");
    let on_b_last = v["id"].as_str().unwrap().to_owned();
    eprintln!("[{:?}] rogue and revoked agents refused", t0.elapsed());

    // Clean up through the API; agent a2 destroys what it re-adopted on SIGTERM.
    for sb in on[&id_b].iter().chain([&on_b_late, &on_b_last]) {
        let (s, v) = api.call(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{sb}"),
            None,
        );
        assert_eq!(s, 204, "{v}");
    }
    net.stop("agent-a2");
    net.stop("agent-b");
    let left: Vec<String> = on
        .values()
        .flatten()
        .chain([&on_b_late, &on_b_last])
        .flat_map(|sb| common::leftovers(sb, &data_b.join("run")))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    eprintln!("[{:?}] done", t0.elapsed());
}

//! Shared by the handler tests: [`FakeHost`], a hand-written host agent, and [`Env`],
//! the real router over an in-memory database with two teams.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use connectrpc::ErrorCode;
use futures::StreamExt;
use hearth_control::app::hosts::{
    ByteStream, CreateSpec, HostCapacity, HostClient, HostError, HostInfo, HostPhase, HostSandbox,
    HostTemplate, ProcEvent, ProcEvents, ProcInfo, ProcSpec, SandboxMetrics, Signal, WarmShape,
};
use hearth_control::app::Policy;
use hearth_control::{router, App, AppState};
use hearth_db::NewApiKey;
use hearth_types::{HostId, SandboxId, SandboxLimits, TeamId, TemplateName};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower::ServiceExt;

/// Stands in for a host agent (and the guest agents behind its envd proxy) in logic
/// tests. It models what the control plane relies on: CreateSandbox makes the sandbox
/// listed by ListSandboxes until DestroySandbox; a started process emits Started, its
/// output and an exit; `sleep` runs until SIGKILL, which ends it with exit code 137;
/// uploads consume the whole body stream. Lifecycle as the agent's contract says:
/// PauseSandbox only of a running sandbox (then listed PAUSED), ResumeSandbox only of a
/// paused one; a failure (injected with `fail_*`) changes nothing. SnapshotSandbox of a
/// running or paused sandbox makes a template (AlreadyExists if the name is taken);
/// ForkSandbox makes every copy or none; DeleteTemplate is refused
/// (FailedPrecondition) while a sandbox of this host was made from it, and always for
/// the built-in `minimal` (PermissionDenied, as the agent refuses templates of its
/// images). Admission as the agent's: a create that does not fit beside the sandboxes
/// holding a VM (paused ones hold none) within `limits` is refused (ResourceExhausted)
/// and Info reports capacity and use the same way. It does not boot anything.
#[derive(Default)]
pub struct FakeHost {
    pub host_id: Option<HostId>,
    state: Mutex<FakeState>,
}

#[derive(Default)]
pub struct FakeState {
    pub sandboxes: HashSet<SandboxId>,
    /// Capacity as the agent reports it (`memory_used_mb`, `vcpus_used` and
    /// `vm_sandboxes` are computed from the sandboxes held); `disk_free_mb` is free
    /// disk before this host's sandboxes.
    pub limits: HostCapacity,
    /// Reported as the agent's `warm` list.
    pub warm: Vec<WarmShape>,
    /// (vCPUs, memory MiB, disk MiB) of each sandbox held.
    pub shapes: HashMap<SandboxId, (u32, u32, u32)>,
    /// Info answers an error (the host is away).
    pub fail_info: bool,
    /// Sandboxes the host holds in error, with its message.
    pub failed: HashMap<SandboxId, String>,
    pub creates: usize,
    pub destroys: usize,
    pub fail_create: Option<HostError>,
    /// How long CreateSandbox takes (a boot).
    pub create_delay: Option<std::time::Duration>,
    pub signals: Vec<(u32, Signal)>,
    pub stdin: Vec<u8>,
    pub uploads: Vec<(String, usize)>,
    /// `sleep`: ends on SIGKILL.
    pub killers: Vec<mpsc::UnboundedSender<Result<ProcEvent, HostError>>>,
    /// `cat`: echoes stdin and ends when stdin is closed.
    pub cats: Vec<mpsc::UnboundedSender<Result<ProcEvent, HostError>>>,
    pub files: Vec<(String, Vec<u8>)>,
    /// Paused sandboxes (also in `sandboxes`).
    pub paused: HashSet<SandboxId>,
    /// The template each sandbox was made from.
    pub made_from: HashMap<SandboxId, TemplateName>,
    pub templates: HashMap<TemplateName, HostTemplate>,
    pub fail_pause: Option<HostError>,
    pub fail_resume: Option<HostError>,
    pub fail_snapshot: Option<HostError>,
    pub fail_fork: Option<HostError>,
    pub pauses: usize,
    pub resumes: usize,
    /// Deadlines sent with creates, forks and resumes.
    pub deadlines: Vec<i64>,
    pub forks: usize,
    /// Templates DeleteTemplate was asked for.
    pub template_deletes: Vec<TemplateName>,
    /// Processes that List reports and Connect re-attaches to (they survive pauses).
    pub procs: Vec<ProcInfo>,
}

impl FakeHost {
    /// A host with room for 64 sandboxes, 64 vCPUs, 64 GiB and 1 TiB.
    pub fn new() -> Arc<Self> {
        Self::with_capacity(64, 65536, 1 << 20)
    }

    /// A host with `vcpus`, `memory_mb` and `disk_mb` of free capacity, 64 slots.
    pub fn with_capacity(vcpus: u64, memory_mb: u64, disk_mb: u64) -> Arc<Self> {
        let host = FakeHost {
            host_id: Some(HostId::generate()),
            ..Default::default()
        };
        host.st().limits = HostCapacity {
            memory_capacity_mb: memory_mb,
            vcpus_capacity: vcpus,
            disk_free_mb: disk_mb,
            max_sandboxes: 64,
            ..Default::default()
        };
        Arc::new(host)
    }

    /// Capacity and use as the agent would report them now.
    fn capacity(&self, st: &FakeState) -> HostCapacity {
        let mut c = st.limits;
        for (id, (vcpus, memory_mb, disk_mb)) in &st.shapes {
            c.disk_free_mb = c.disk_free_mb.saturating_sub(u64::from(*disk_mb));
            if !st.paused.contains(id) {
                c.vcpus_used += u64::from(*vcpus);
                c.memory_used_mb += u64::from(*memory_mb);
                c.vm_sandboxes += 1;
            }
        }
        c
    }
    pub fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }
}

#[async_trait]
impl HostClient for FakeHost {
    fn url(&self) -> &str {
        "http://fake-agent"
    }
    async fn info(&self) -> Result<HostInfo, HostError> {
        let st = self.st();
        if st.fail_info {
            return Err(HostError::Transport("connection refused".into()));
        }
        Ok(HostInfo {
            host_id: self.host_id.clone().unwrap(),
            vmm: "qemu".into(),
            accel: "tcg".into(),
            templates: std::iter::once("minimal".parse().unwrap())
                .chain(st.templates.keys().cloned())
                .collect(),
            running: st.sandboxes.len() as u32,
            capacity: self.capacity(&st),
            warm: st.warm.clone(),
            vm_sandboxes: st
                .shapes
                .keys()
                .filter(|id| !st.paused.contains(*id))
                .cloned()
                .collect(),
        })
    }
    async fn create_sandbox(&self, spec: CreateSpec) -> Result<(), HostError> {
        let delay = self.st().create_delay;
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let mut st = self.st();
        st.creates += 1;
        if let Some(e) = st.fail_create.clone() {
            return Err(e);
        }
        st.deadlines.push(spec.expires_at_unix_ms);
        if spec.template.as_str() != "minimal" && !st.templates.contains_key(&spec.template) {
            return Err(HostError::Rpc {
                code: ErrorCode::NotFound,
                message: format!("template {} not on this host", spec.template),
            });
        }
        let c = self.capacity(&st);
        let fits = c.vm_sandboxes < c.max_sandboxes
            && c.memory_used_mb + u64::from(spec.memory_mb) <= c.memory_capacity_mb
            && c.vcpus_used + u64::from(spec.vcpus) <= c.vcpus_capacity
            && u64::from(spec.disk_size_mb) <= c.disk_free_mb;
        if !fits {
            return Err(HostError::Rpc {
                code: ErrorCode::ResourceExhausted,
                message: "host capacity: the fake host is full".into(),
            });
        }
        st.shapes.insert(
            spec.sandbox_id.clone(),
            (spec.vcpus, spec.memory_mb, spec.disk_size_mb),
        );
        st.made_from.insert(spec.sandbox_id.clone(), spec.template);
        st.sandboxes.insert(spec.sandbox_id);
        Ok(())
    }
    async fn destroy_sandbox(&self, id: &SandboxId) -> Result<bool, HostError> {
        let mut st = self.st();
        st.destroys += 1;
        st.failed.remove(id);
        st.paused.remove(id);
        st.made_from.remove(id);
        st.shapes.remove(id);
        Ok(st.sandboxes.remove(id))
    }
    async fn list_sandboxes(&self) -> Result<Vec<HostSandbox>, HostError> {
        let st = self.st();
        Ok(st
            .sandboxes
            .iter()
            .map(|id| HostSandbox {
                id: id.clone(),
                failure: st.failed.get(id).cloned(),
                phase: if st.paused.contains(id) {
                    HostPhase::Paused
                } else {
                    HostPhase::Running
                },
            })
            .collect())
    }
    async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), HostError> {
        let mut st = self.st();
        st.pauses += 1;
        if !st.sandboxes.contains(id) {
            return Err(not_found(id));
        }
        if st.paused.contains(id) {
            return Err(precondition("the sandbox is paused"));
        }
        if let Some(e) = st.fail_pause.clone() {
            return Err(e);
        }
        st.paused.insert(id.clone());
        Ok(())
    }
    async fn resume_sandbox(&self, id: &SandboxId, expires: i64) -> Result<(), HostError> {
        let mut st = self.st();
        st.resumes += 1;
        if !st.sandboxes.contains(id) {
            return Err(not_found(id));
        }
        if !st.paused.contains(id) {
            return Err(precondition("the sandbox is not paused"));
        }
        if let Some(e) = st.fail_resume.clone() {
            return Err(e);
        }
        st.deadlines.push(expires);
        st.paused.remove(id);
        Ok(())
    }
    async fn snapshot_sandbox(
        &self,
        id: &SandboxId,
        template: &TemplateName,
        memory: bool,
    ) -> Result<HostTemplate, HostError> {
        let mut st = self.st();
        if !st.sandboxes.contains(id) {
            return Err(not_found(id));
        }
        if st.templates.contains_key(template) {
            return Err(HostError::Rpc {
                code: ErrorCode::AlreadyExists,
                message: format!("template {template} exists"),
            });
        }
        if let Some(e) = st.fail_snapshot.clone() {
            return Err(e);
        }
        let t = HostTemplate {
            name: template.clone(),
            allocated_bytes: 3 << 20,
            apparent_bytes: 64 << 20,
            has_memory: memory,
            source_sandbox_id: Some(id.clone()),
            vcpus: 1,
            memory_mb: 256,
            disk_size_mb: 512,
            in_use: 0,
        };
        st.templates.insert(template.clone(), t.clone());
        Ok(t)
    }
    async fn fork_sandbox(&self, id: &SandboxId, copies: Vec<CreateSpec>) -> Result<(), HostError> {
        let mut st = self.st();
        st.forks += 1;
        if !st.sandboxes.contains(id) {
            return Err(not_found(id));
        }
        if st.paused.contains(id) {
            return Err(precondition("the sandbox is paused"));
        }
        if let Some(e) = st.fail_fork.clone() {
            return Err(e);
        }
        for c in copies {
            st.deadlines.push(c.expires_at_unix_ms);
            st.shapes
                .insert(c.sandbox_id.clone(), (c.vcpus, c.memory_mb, c.disk_size_mb));
            st.made_from.insert(c.sandbox_id.clone(), c.template);
            st.sandboxes.insert(c.sandbox_id);
        }
        Ok(())
    }
    async fn list_templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        Ok(self.st().templates.values().cloned().collect())
    }
    async fn delete_template(&self, template: &TemplateName) -> Result<bool, HostError> {
        let mut st = self.st();
        st.template_deletes.push(template.clone());
        if st.made_from.values().any(|t| t == template) {
            return Err(precondition("the template is in use"));
        }
        if template.as_str() == "minimal" {
            return Err(HostError::Rpc {
                code: ErrorCode::PermissionDenied,
                message: "template minimal is built in and cannot be deleted".into(),
            });
        }
        Ok(st.templates.remove(template).is_some())
    }
    async fn list_processes(&self, id: &SandboxId) -> Result<Vec<ProcInfo>, HostError> {
        let st = self.st();
        if !st.sandboxes.contains(id) || st.paused.contains(id) {
            return Err(not_found(id));
        }
        Ok(st.procs.clone())
    }
    async fn connect_process(
        &self,
        id: &SandboxId,
        pid: u32,
        _deadline: std::time::Duration,
    ) -> Result<ProcEvents, HostError> {
        let st = self.st();
        if !st.sandboxes.contains(id) || st.paused.contains(id) {
            return Err(not_found(id));
        }
        if !st.procs.iter().any(|p| p.pid == pid) {
            return Err(HostError::Rpc {
                code: ErrorCode::NotFound,
                message: format!("process with pid {pid} not found"),
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Ok(ProcEvent::Stdout(Bytes::from_static(
            b"still counting\n",
        ))))
        .unwrap();
        tx.send(Ok(ProcEvent::Exited {
            exit_code: 0,
            error: None,
        }))
        .unwrap();
        Ok(tokio_stream_from(rx))
    }
    async fn start_process(
        &self,
        _id: &SandboxId,
        spec: ProcSpec,
    ) -> Result<ProcEvents, HostError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let pid = 42;
        tx.send(Ok(ProcEvent::Started { pid })).unwrap();
        match spec.cmd.as_str() {
            "sleep" => self.st().killers.push(tx),
            "cat" => self.st().cats.push(tx),
            _ => {
                tx.send(Ok(ProcEvent::Stdout(Bytes::from_static(b"hi\n"))))
                    .unwrap();
                tx.send(Ok(ProcEvent::Stderr(Bytes::from_static(&[0xff, 0xfe]))))
                    .unwrap();
                tx.send(Ok(ProcEvent::Exited {
                    exit_code: 3,
                    error: None,
                }))
                .unwrap();
            }
        }
        Ok(tokio_stream_from(rx))
    }
    async fn send_signal(
        &self,
        _: &SandboxId,
        _: &str,
        pid: u32,
        s: Signal,
    ) -> Result<(), HostError> {
        let mut st = self.st();
        st.signals.push((pid, s));
        for k in st.killers.drain(..) {
            let _ = k.send(Ok(ProcEvent::Exited {
                exit_code: 137,
                error: None,
            }));
        }
        Ok(())
    }
    async fn send_input(
        &self,
        _: &SandboxId,
        _: &str,
        _: u32,
        d: Bytes,
        _: bool,
    ) -> Result<(), HostError> {
        self.st().stdin.extend_from_slice(&d);
        Ok(())
    }
    async fn close_stdin(&self, _: &SandboxId, _: &str, _: u32) -> Result<(), HostError> {
        let mut st = self.st();
        let data = st.stdin.clone();
        for k in st.cats.drain(..) {
            let _ = k.send(Ok(ProcEvent::Stdout(Bytes::from(data.clone()))));
            let _ = k.send(Ok(ProcEvent::Exited {
                exit_code: 0,
                error: None,
            }));
        }
        Ok(())
    }
    async fn resize_pty(
        &self,
        _: &SandboxId,
        _: &str,
        _: u32,
        _: u32,
        _: u32,
    ) -> Result<(), HostError> {
        Ok(())
    }
    async fn upload_file(
        &self,
        _: &SandboxId,
        _: &str,
        path: &str,
        mut body: ByteStream,
    ) -> Result<(), HostError> {
        let mut data = Vec::new();
        while let Some(chunk) = body.next().await {
            data.extend_from_slice(&chunk?);
        }
        let mut st = self.st();
        st.uploads.push((path.to_owned(), data.len()));
        st.files.push((path.to_owned(), data));
        Ok(())
    }
    async fn download_file(
        &self,
        _: &SandboxId,
        _: &str,
        path: &str,
    ) -> Result<(Option<u64>, ByteStream), HostError> {
        let st = self.st();
        let Some((_, data)) = st.files.iter().rev().find(|(p, _)| p == path) else {
            return Err(HostError::Http {
                status: 404,
                message: format!("{path}: no such file"),
            });
        };
        let data = Bytes::from(data.clone());
        Ok((
            Some(data.len() as u64),
            futures::stream::iter([Ok(data)]).boxed(),
        ))
    }

    /// Answers for the guest: 200 with what arrived (port, method, path and query,
    /// headers, body) as JSON, so tests see what the proxy passed on; a sandbox the
    /// host does not hold is a 404 like the agent's.
    async fn proxy(
        &self,
        id: &SandboxId,
        port: u16,
        req: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, HostError> {
        if !self.st().sandboxes.contains(id) {
            return Err(HostError::Http {
                status: 404,
                message: format!("sandbox {id} is not on this host"),
            });
        }
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| HostError::Transport(e.to_string()))?
            .to_bytes();
        let headers: serde_json::Map<String, Value> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    Value::String(v.to_str().unwrap_or("?").to_owned()),
                )
            })
            .collect();
        let echo = json!({
            "port": port,
            "method": parts.method.as_str(),
            "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            "headers": headers,
            "body": String::from_utf8_lossy(&body),
        });
        Ok(http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(echo.to_string()))
            .expect("a valid response"))
    }

    /// Two console lines per sandbox the host holds.
    async fn console(&self, id: &SandboxId, limit: usize) -> Result<Vec<(i64, String)>, HostError> {
        if !self.st().sandboxes.contains(id) {
            return Err(not_found(id));
        }
        let lines = vec![
            (1_700_000_000_000, format!("[    0.000000] booting {id}")),
            (1_700_000_000_001, "hearth-guest: ready".to_owned()),
        ];
        Ok(lines.into_iter().rev().take(limit).rev().collect())
    }

    /// A fixed sample per sandbox the host holds (one vCPU, 256 MiB, 1 GiB disk).
    async fn metrics(&self, id: &SandboxId) -> Result<SandboxMetrics, HostError> {
        if !self.st().sandboxes.contains(id) {
            return Err(not_found(id));
        }
        Ok(SandboxMetrics {
            timestamp_unix: 1_700_000_000,
            cpu_count: 1,
            cpu_used_pct: 1.5,
            mem_used: 20 << 20,
            mem_total: 256 << 20,
            mem_cache: 8 << 20,
            disk_used: 100 << 20,
            disk_total: 1 << 30,
        })
    }
}

pub fn tokio_stream_from(
    mut rx: mpsc::UnboundedReceiver<Result<ProcEvent, HostError>>,
) -> ProcEvents {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

pub struct Env {
    pub router: axum::Router,
    pub state: AppState,
    /// The first of `hosts`.
    pub host: Arc<FakeHost>,
    pub hosts: Vec<Arc<FakeHost>>,
    pub key_a: String,
    pub key_b: String,
    /// An admin key of team a.
    pub key_admin: String,
    pub team_a: TeamId,
    pub team_b: TeamId,
}

pub async fn env() -> Env {
    env_with(Policy::default()).await
}

pub async fn env_with(policy: Policy) -> Env {
    env_hosts(policy, vec![FakeHost::new()]).await
}

/// The real router over `hosts` (at least one), registered as at start.
pub async fn env_hosts(policy: Policy, hosts: Vec<Arc<FakeHost>>) -> Env {
    // SQLite in memory, or PostgreSQL with HEARTH_TEST_DATABASE=postgres (scripts/test.sh
    // runs this suite on both).
    let db = hearth_db::testing::test_db().await;
    let team_a = db.create_team("a").await.unwrap().id;
    let team_b = db.create_team("b").await.unwrap().id;
    let key = |team, admin| NewApiKey::new(team, "k", admin);
    let (_, key_a) = db.create_api_key(&key(team_a, false)).await.unwrap();
    let (_, key_b) = db.create_api_key(&key(team_b, false)).await.unwrap();
    let (_, key_admin) = db.create_api_key(&key(team_a, true)).await.unwrap();
    let host = hosts[0].clone();
    let app = App::new(
        db,
        hosts
            .iter()
            .map(|h| h.clone() as Arc<dyn HostClient>)
            .collect(),
        SandboxLimits::default(),
        1024,
    )
    .with_policy(policy);
    let state = AppState::new(app);
    // Registers the host and its templates, as at start.
    state.app().reconcile_once().await.unwrap();
    Env {
        router: router(state.clone()),
        state,
        host,
        hosts,
        key_a,
        key_b,
        key_admin,
        team_a,
        team_b,
    }
}

impl Env {
    pub async fn call(
        &self,
        method: &str,
        uri: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.send(req).await
    }

    /// `GET uri` with `key`.
    pub async fn get(&self, key: &str, uri: &str) -> (StatusCode, Value) {
        self.call("GET", uri, Some(key), None).await
    }

    /// `POST uri` with `key` and a JSON body.
    pub async fn post(&self, key: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", uri, Some(key), Some(body)).await
    }

    /// `POST uri` with `key` and no body.
    pub async fn post_empty(&self, key: &str, uri: &str) -> (StatusCode, Value) {
        self.call("POST", uri, Some(key), None).await
    }

    /// `DELETE uri` with `key`.
    pub async fn delete(&self, key: &str, uri: &str) -> (StatusCode, Value) {
        self.call("DELETE", uri, Some(key), None).await
    }

    pub async fn send(&self, req: Request<Body>) -> (StatusCode, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    }

    pub async fn create(&self) -> String {
        let (s, v) = self
            .call(
                "POST",
                "/v1/sandboxes",
                Some(&self.key_a),
                Some(json!({"template": "minimal"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    pub async fn row_count(&self) -> usize {
        self.state
            .app()
            .db
            .list_sandboxes(self.team_a)
            .await
            .unwrap()
            .len()
    }
}

/// The body of a call that must answer `want` (the body is shown when it does not).
pub fn expect(want: StatusCode, (status, v): (StatusCode, Value)) -> Value {
    assert_eq!(status, want, "{v}");
    v
}

pub fn assert_error(status: StatusCode, v: &Value, want: StatusCode, code: &str, needle: &str) {
    assert_eq!(status, want, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
}

fn not_found(id: &SandboxId) -> HostError {
    HostError::Rpc {
        code: ErrorCode::NotFound,
        message: format!("sandbox {id} not found"),
    }
}

fn precondition(m: &str) -> HostError {
    HostError::Rpc {
        code: ErrorCode::FailedPrecondition,
        message: m.to_owned(),
    }
}

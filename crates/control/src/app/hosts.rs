//! Host agents as the control plane sees them: the narrow [`HostClient`] trait, its one
//! real implementation ([`AgentHostClient`], Connect RPC + the agent's envd proxy), and
//! the [`Hosts`] registry with the scheduler.
//!
//! Everything the control plane asks of a host goes through [`HostClient`], so the
//! scheduler can pick among many hosts and the logic above can be unit-tested with a
//! hand-written fake. This module does not touch the database.
//!
//! Everything that comes back through a host agent's proxy is written by a guest, and
//! a guest may be hostile: no HTTP redirect is ever followed (a `3xx` is an error,
//! so the agent token never leaves for another address), error bodies are read up to
//! [`MAX_ERROR_BODY`] only, every call has a deadline (file bodies, which a user asked
//! for, stream through with an idle timeout instead of a total one), Connect messages
//! are bounded by [`MAX_RPC_MESSAGE`], and guest text in error messages is escaped and
//! cut by [`sanitize`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use bytes::Bytes;
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use connectrpc::ErrorCode;
use futures::stream::BoxStream;
use futures::StreamExt;
use hearth_proto::hearth::agent::v1 as agent;
use hearth_proto::process;
use hearth_proto::AGENT_TOKEN_HEADER;
use hearth_types::{HostId, SandboxId, TeamId, TemplateName};

/// A failed call to a host agent or, through its proxy, a guest agent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HostError {
    /// The RPC reached the far side and it answered with an error code.
    #[error("{code:?}: {message}")]
    Rpc { code: ErrorCode, message: String },
    /// A plain HTTP call (files) answered with a non-success status (a redirect is
    /// reported as 502: it is never followed).
    #[error("HTTP {status}: {message}")]
    Http { status: u16, message: String },
    /// The call did not get an answer (connection refused, reset, bad URL).
    #[error("{0}")]
    Transport(String),
}

/// Largest error body read from a host or guest; the rest is not read.
pub const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest Connect message accepted from a host or guest (process output arrives in
/// small chunks; this only stops a hostile peer from making us buffer without end).
pub const MAX_RPC_MESSAGE: usize = 8 * 1024 * 1024;
/// Characters of guest or host text kept in an error message.
pub const MAX_MESSAGE_CHARS: usize = 500;
/// No byte of a file body for this long ends the transfer.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Guest text made fit for an error message or a log line: control characters
/// escaped (`\n`, `\u{1b}`), cut to [`MAX_MESSAGE_CHARS`] with a `…` mark.
pub fn sanitize(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n >= MAX_MESSAGE_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl HostError {
    fn from_connect(e: connectrpc::ConnectError) -> Self {
        let message = e
            .message
            .as_deref()
            .map(sanitize)
            .unwrap_or_else(|| e.code.as_str().to_owned());
        HostError::Rpc {
            code: e.code,
            message,
        }
    }

    /// Whether the far side said the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            HostError::Rpc {
                code: ErrorCode::NotFound,
                ..
            } | HostError::Http { status: 404, .. }
        )
    }
}

/// What a host agent says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub host_id: HostId,
    pub vmm: String,
    pub accel: String,
    pub templates: Vec<TemplateName>,
    pub running: u32,
}

/// What the control plane asks a host to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSpec {
    pub sandbox_id: SandboxId,
    pub team_id: TeamId,
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub expires_at_unix_ms: i64,
    pub env: std::collections::BTreeMap<String, String>,
}

/// One event of a process started in a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcEvent {
    Started {
        pid: u32,
    },
    Stdout(Bytes),
    Stderr(Bytes),
    /// Output of a PTY (stdout and stderr merged).
    Pty(Bytes),
    Exited {
        exit_code: i32,
        error: Option<String>,
    },
}

/// A process running in a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub pid: u32,
    pub cmd: String,
    pub args: Vec<String>,
    pub cwd: Option<String>,
    pub tag: Option<String>,
}

/// What to start in a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcSpec {
    pub cmd: String,
    pub args: Vec<String>,
    pub env: std::collections::BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: String,
    pub stdin: bool,
    pub pty: Option<(u32, u32)>,
    /// Hard limit for the whole call (the Connect deadline).
    pub deadline: Duration,
}

pub type ProcEvents = BoxStream<'static, Result<ProcEvent, HostError>>;
pub type ByteStream = BoxStream<'static, Result<Bytes, HostError>>;

/// Signals the API lets a client send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// A sandbox as its host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSandbox {
    pub id: SandboxId,
    /// `Some` when the host holds it in error (its VM died, shut down or rebooted
    /// itself): the host's message, already free of host details.
    pub failure: Option<String>,
    pub phase: HostPhase,
}

/// Where a listed sandbox is on its host (failed ones carry `failure` instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostPhase {
    /// Starting or running (or failed, see `failure`).
    #[default]
    Running,
    /// Paused: no VM, its memory and disk kept.
    Paused,
    /// Pausing, resuming or stopping: the host is working on it.
    Changing,
}

/// A template as its host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTemplate {
    /// The host-level name.
    pub name: TemplateName,
    pub allocated_bytes: u64,
    pub apparent_bytes: u64,
    pub has_memory: bool,
    pub source_sandbox_id: Option<SandboxId>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    /// Sandboxes on the host that depend on it.
    pub in_use: u32,
}

/// One sample of a sandbox's use, as its guest agent reported it (checked, never
/// trusted: see [`SandboxMetrics::from_guest`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxMetrics {
    /// When the guest took it (unix seconds, the guest's clock, synced at `/init`).
    pub timestamp_unix: i64,
    pub cpu_count: u32,
    /// 0 to 100 (all vCPUs together).
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// Largest metrics answer read from a guest.
const MAX_METRICS_BODY: usize = 16 * 1024;

impl SandboxMetrics {
    /// Parses a guest's `GET /metrics` JSON (envd's field names). A guest is hostile:
    /// fields missing, of the wrong type, negative, a percentage outside 0-100 or a
    /// used figure above its total are refused, not passed on.
    pub fn from_guest(text: &str) -> Result<Self, HostError> {
        let bad =
            |why: &str| HostError::Transport(format!("the guest's metrics are invalid: {why}"));
        let v: serde_json::Value = serde_json::from_str(text).map_err(|_| bad("not JSON"))?;
        let int = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| bad(k))
        };
        let m = SandboxMetrics {
            timestamp_unix: v
                .get("ts")
                .and_then(serde_json::Value::as_i64)
                .filter(|t| *t >= 0)
                .ok_or_else(|| bad("ts"))?,
            cpu_count: u32::try_from(int("cpu_count")?).map_err(|_| bad("cpu_count"))?,
            cpu_used_pct: v
                .get("cpu_used_pct")
                .and_then(serde_json::Value::as_f64)
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or_else(|| bad("cpu_used_pct"))?,
            mem_used: int("mem_used")?,
            mem_total: int("mem_total")?,
            mem_cache: int("mem_cache").unwrap_or(0),
            disk_used: int("disk_used")?,
            disk_total: int("disk_total")?,
        };
        if m.mem_used > m.mem_total || m.mem_cache > m.mem_total {
            return Err(bad("memory used above total"));
        }
        if m.disk_used > m.disk_total {
            return Err(bad("disk used above total"));
        }
        Ok(m)
    }
}

/// Everything the control plane asks of one host agent.
#[async_trait]
pub trait HostClient: Send + Sync + 'static {
    /// The agent's base URL (for logs and the `hosts` table).
    fn url(&self) -> &str;
    async fn info(&self) -> Result<HostInfo, HostError>;
    /// Boot a sandbox; returns once its guest agent answers.
    async fn create_sandbox(&self, spec: CreateSpec) -> Result<(), HostError>;
    /// Destroy a sandbox; `Ok(false)` when the host did not know it. Idempotent.
    async fn destroy_sandbox(&self, id: &SandboxId) -> Result<bool, HostError>;
    /// Sandboxes the host holds that are not stopped; failed ones carry why.
    async fn list_sandboxes(&self) -> Result<Vec<HostSandbox>, HostError>;
    /// Freeze, save and stop the VM, keeping memory and disk; a failure leaves it
    /// running.
    async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), HostError>;
    /// Restore a paused sandbox; `expires_at_unix_ms` 0 keeps the host's deadline. A
    /// failure leaves it paused, its snapshot intact.
    async fn resume_sandbox(
        &self,
        id: &SandboxId,
        expires_at_unix_ms: i64,
    ) -> Result<(), HostError>;
    /// Save a running or paused sandbox as the host-level template `template`.
    async fn snapshot_sandbox(
        &self,
        id: &SandboxId,
        template: &TemplateName,
        memory: bool,
    ) -> Result<HostTemplate, HostError>;
    /// Make one running copy of a running sandbox per spec (all or none).
    async fn fork_sandbox(&self, id: &SandboxId, copies: Vec<CreateSpec>) -> Result<(), HostError>;
    async fn list_templates(&self) -> Result<Vec<HostTemplate>, HostError>;
    /// Remove a host-level template; `Ok(false)` when the host did not have it; refused
    /// (`FailedPrecondition`) while a sandbox depends on it.
    async fn delete_template(&self, template: &TemplateName) -> Result<bool, HostError>;

    async fn start_process(&self, id: &SandboxId, spec: ProcSpec) -> Result<ProcEvents, HostError>;
    async fn send_signal(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        signal: Signal,
    ) -> Result<(), HostError>;
    async fn send_input(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        data: Bytes,
        pty: bool,
    ) -> Result<(), HostError>;
    async fn close_stdin(&self, id: &SandboxId, user: &str, pid: u32) -> Result<(), HostError>;
    /// Processes running in the guest (started by exec, before or after a pause).
    async fn list_processes(&self, id: &SandboxId) -> Result<Vec<ProcInfo>, HostError>;
    /// Re-attach to a running process: its output from now on and its end.
    async fn connect_process(
        &self,
        id: &SandboxId,
        pid: u32,
        deadline: Duration,
    ) -> Result<ProcEvents, HostError>;
    async fn resize_pty(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        cols: u32,
        rows: u32,
    ) -> Result<(), HostError>;

    /// Write `body` to `path` in the guest (parents created, overwritten).
    async fn upload_file(
        &self,
        id: &SandboxId,
        user: &str,
        path: &str,
        body: ByteStream,
    ) -> Result<(), HostError>;
    /// Read `path` from the guest as a stream.
    async fn download_file(
        &self,
        id: &SandboxId,
        user: &str,
        path: &str,
    ) -> Result<(Option<u64>, ByteStream), HostError>;

    /// Forward one HTTP request (path and query kept; a WebSocket upgrade spliced
    /// through) to `port` of the sandbox's guest: the sandbox proxy's last hop. The
    /// guest agent's port gets the sandbox's own access token from the host.
    async fn proxy(
        &self,
        id: &SandboxId,
        port: u16,
        req: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, HostError>;

    /// The last `limit` lines of the sandbox's serial console (escaped by the host),
    /// each with the time it was logged (unix ms).
    async fn console(&self, id: &SandboxId, limit: usize) -> Result<Vec<(i64, String)>, HostError>;

    /// A sample of the running sandbox's CPU, memory and disk use, from its guest.
    async fn metrics(&self, id: &SandboxId) -> Result<SandboxMetrics, HostError>;
}

/// The events of a process stream (Start or Connect: both carry `event`), without
/// keepalives.
macro_rules! proc_events {
    ($stream:expr) => {{
        use process::__buffa::oneof::process_event::{data_event::Output, Event};
        let events = futures::stream::unfold(Some($stream), |state| async move {
            let mut stream = state?;
            loop {
                match stream.message().await {
                    Ok(None) => return None,
                    Err(e) => return Some((Err(HostError::from_connect(e)), None)),
                    Ok(Some(msg)) => {
                        let msg = msg.to_owned_message();
                        let ev = match msg.event.into_option().and_then(|e| e.event) {
                            Some(Event::Start(s)) => ProcEvent::Started { pid: s.pid },
                            Some(Event::Data(d)) => match d.output {
                                Some(Output::Stdout(b)) => ProcEvent::Stdout(b.into()),
                                Some(Output::Stderr(b)) => ProcEvent::Stderr(b.into()),
                                Some(Output::Pty(b)) => ProcEvent::Pty(b.into()),
                                None => continue,
                            },
                            Some(Event::End(e)) => ProcEvent::Exited {
                                exit_code: e.exit_code,
                                error: e.error,
                            },
                            Some(Event::Keepalive(_)) | None => continue,
                        };
                        return Some((Ok(ev), Some(stream)));
                    }
                }
            }
        });
        events.boxed()
    }};
}

/// The real host agent: Connect RPC for lifecycle, the agent's envd reverse proxy
/// (`/sandboxes/{id}/envd/...`) for processes and files.
pub struct AgentHostClient {
    url: String,
    http: HttpClient,
    /// Plain HTTP/1.1 for the sandbox proxy (upgrades included).
    raw: super::host_proxy::RawClient,
    agent: agent::HostAgentClient<HttpClient>,
    files: reqwest::Client,
    token: Option<String>,
}

/// How long a lifecycle RPC may take (a TCG boot takes a few seconds; leave room).
const CREATE_TIMEOUT: Duration = Duration::from_secs(180);
const SHORT_TIMEOUT: Duration = Duration::from_secs(30);
/// Flattening a disk (and saving memory) of a large sandbox takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

impl AgentHostClient {
    /// `token`: the host agent's shared secret, sent on every call (RPC, proxy, files).
    pub fn new(url: &str, token: Option<&str>) -> Result<Self, HostError> {
        let url = url.trim_end_matches('/').to_owned();
        let uri: http::Uri = url
            .parse()
            .map_err(|e| HostError::Transport(format!("invalid agent URL {url:?}: {e}")))?;
        if uri.scheme().is_none() || uri.host().is_none() {
            return Err(HostError::Transport(format!(
                "invalid agent URL {url:?}: needs http://host:port"
            )));
        }
        let http = HttpClient::plaintext();
        let token = token.map(str::to_owned);
        let agent = agent::HostAgentClient::new(
            http.clone(),
            with_token(
                ClientConfig::new(uri)
                    .with_default_timeout(SHORT_TIMEOUT)
                    .with_default_max_message_size(MAX_RPC_MESSAGE),
                token.as_deref(),
            ),
        );
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &token {
            let mut v = reqwest::header::HeaderValue::from_str(t).map_err(|_| {
                HostError::Transport("agent token is not a valid header value".into())
            })?;
            v.set_sensitive(true);
            headers.insert(AGENT_TOKEN_HEADER, v);
        }
        // The connectrpc client (hyper) never follows redirects; this one is told not to.
        let files = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(BODY_IDLE_TIMEOUT)
            .default_headers(headers)
            .build()
            .map_err(|e| HostError::Transport(e.without_url().to_string()))?;
        Ok(Self {
            url,
            http,
            raw: super::host_proxy::raw_client(),
            agent,
            files,
            token,
        })
    }

    fn envd_base(&self, id: &SandboxId) -> String {
        format!("{}/sandboxes/{id}/envd", self.url)
    }

    fn process(&self, id: &SandboxId) -> Result<process::ProcessClient<HttpClient>, HostError> {
        let uri: http::Uri = self
            .envd_base(id)
            .parse()
            .map_err(|e| HostError::Transport(format!("envd URL: {e}")))?;
        Ok(process::ProcessClient::new(
            self.http.clone(),
            with_token(
                ClientConfig::new(uri)
                    .with_default_timeout(SHORT_TIMEOUT)
                    .with_default_max_message_size(MAX_RPC_MESSAGE),
                self.token.as_deref(),
            ),
        ))
    }
}

/// The wire form of a sandbox spec.
fn proto_spec(s: CreateSpec) -> agent::SandboxSpec {
    agent::SandboxSpec {
        sandbox_id: s.sandbox_id.to_string(),
        template: s.template.to_string(),
        vcpus: s.vcpus,
        memory_mb: s.memory_mb,
        disk_size_mb: s.disk_size_mb,
        expires_at_unix_ms: s.expires_at_unix_ms,
        env: s.env.into_iter().collect(),
        team_id: s.team_id.to_string(),
        ..Default::default()
    }
}

/// A host's template report; `None` when its name is not a valid template name.
fn host_template(t: &agent::TemplateInfo) -> Option<HostTemplate> {
    Some(HostTemplate {
        name: t.name.parse().ok()?,
        allocated_bytes: t.allocated_bytes,
        apparent_bytes: t.apparent_bytes,
        has_memory: t.has_memory,
        source_sandbox_id: t.source_sandbox_id.parse().ok(),
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        in_use: t.in_use,
    })
}

fn with_token(config: ClientConfig, token: Option<&str>) -> ClientConfig {
    match token {
        Some(t) => config.with_default_header(AGENT_TOKEN_HEADER, t.to_owned()),
        None => config,
    }
}

/// envd's convention: the Unix user rides in `Authorization: Basic base64("<user>:")`.
pub fn basic_user(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

fn selector(pid: u32) -> process::ProcessSelector {
    process::ProcessSelector {
        selector: Some(process::__buffa::oneof::process_selector::Selector::Pid(
            pid,
        )),
        ..Default::default()
    }
}

fn user_opts(user: &str) -> CallOptions {
    CallOptions::default().with_header("authorization", basic_user(user))
}

#[cfg(test)]
#[path = "hosts_tests.rs"]
mod tests;

#[async_trait]
impl HostClient for AgentHostClient {
    fn url(&self) -> &str {
        &self.url
    }

    async fn proxy(
        &self,
        id: &SandboxId,
        port: u16,
        req: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, HostError> {
        super::host_proxy::forward(&self.raw, &self.url, self.token.as_deref(), id, port, req).await
    }

    async fn console(&self, id: &SandboxId, limit: usize) -> Result<Vec<(i64, String)>, HostError> {
        let url = format!("{}/sandboxes/{id}/console", self.url);
        let resp = self
            .files
            .get(url)
            .query(&[("limit", limit)])
            .timeout(SHORT_TIMEOUT)
            .send()
            .await
            .map_err(|e| HostError::Transport(e.without_url().to_string()))?;
        let resp = check_status(resp).await?;
        let text = read_bounded(resp, 4 * 1024 * 1024).await;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| HostError::Transport(format!("console: not JSON: {e}")))?;
        Ok(v["lines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| Some((l["timestamp_ms"].as_i64()?, l["line"].as_str()?.to_owned())))
            .collect())
    }

    async fn info(&self) -> Result<HostInfo, HostError> {
        let r = self
            .agent
            .info(agent::InfoRequest::default())
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        let host_id = r.host_id.parse().map_err(|e| HostError::Rpc {
            code: ErrorCode::Internal,
            message: format!("agent reported a bad host ID: {e}"),
        })?;
        Ok(HostInfo {
            host_id,
            vmm: r.vmm,
            accel: r.accel,
            templates: r.templates.iter().filter_map(|t| t.parse().ok()).collect(),
            running: r.running,
        })
    }

    async fn create_sandbox(&self, s: CreateSpec) -> Result<(), HostError> {
        let spec = proto_spec(s);
        self.agent
            .create_sandbox_with_options(
                agent::CreateSandboxRequest {
                    spec: spec.into(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(CREATE_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn destroy_sandbox(&self, id: &SandboxId) -> Result<bool, HostError> {
        let r = self
            .agent
            .destroy_sandbox_with_options(
                agent::DestroySandboxRequest {
                    sandbox_id: id.to_string(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(Duration::from_secs(60)),
            )
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.existed)
    }

    async fn list_sandboxes(&self) -> Result<Vec<HostSandbox>, HostError> {
        let r = self
            .agent
            .list_sandboxes(agent::ListSandboxesRequest::default())
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.sandboxes
            .iter()
            .filter(|s| {
                !matches!(
                    s.state.as_known(),
                    Some(agent::SandboxState::SANDBOX_STATE_STOPPED)
                )
            })
            .filter_map(|s| {
                let id = s.spec.as_option()?.sandbox_id.parse().ok()?;
                let phase = match s.state.as_known() {
                    Some(agent::SandboxState::SANDBOX_STATE_PAUSED) => HostPhase::Paused,
                    Some(
                        agent::SandboxState::SANDBOX_STATE_PAUSING
                        | agent::SandboxState::SANDBOX_STATE_RESUMING
                        | agent::SandboxState::SANDBOX_STATE_STOPPING,
                    ) => HostPhase::Changing,
                    _ => HostPhase::Running,
                };
                let failure = matches!(
                    s.state.as_known(),
                    Some(agent::SandboxState::SANDBOX_STATE_ERROR)
                )
                .then(|| {
                    if s.error.is_empty() {
                        "the sandbox failed on its host".to_owned()
                    } else {
                        sanitize(&s.error)
                    }
                });
                Some(HostSandbox { id, failure, phase })
            })
            .collect())
    }

    async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), HostError> {
        self.agent
            .pause_sandbox_with_options(
                agent::PauseSandboxRequest {
                    sandbox_id: id.to_string(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(CREATE_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn resume_sandbox(
        &self,
        id: &SandboxId,
        expires_at_unix_ms: i64,
    ) -> Result<(), HostError> {
        self.agent
            .resume_sandbox_with_options(
                agent::ResumeSandboxRequest {
                    sandbox_id: id.to_string(),
                    expires_at_unix_ms,
                    ..Default::default()
                },
                CallOptions::default().with_timeout(CREATE_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn snapshot_sandbox(
        &self,
        id: &SandboxId,
        template: &TemplateName,
        memory: bool,
    ) -> Result<HostTemplate, HostError> {
        let r = self
            .agent
            .snapshot_sandbox_with_options(
                agent::SnapshotSandboxRequest {
                    sandbox_id: id.to_string(),
                    template: template.to_string(),
                    memory,
                    ..Default::default()
                },
                CallOptions::default().with_timeout(SNAPSHOT_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        let t = r.template.as_option().ok_or_else(|| HostError::Rpc {
            code: ErrorCode::Internal,
            message: "the host agent answered a snapshot without its template".into(),
        })?;
        host_template(t).ok_or_else(|| HostError::Rpc {
            code: ErrorCode::Internal,
            message: "the host agent reported a bad template name".into(),
        })
    }

    async fn fork_sandbox(&self, id: &SandboxId, copies: Vec<CreateSpec>) -> Result<(), HostError> {
        self.agent
            .fork_sandbox_with_options(
                agent::ForkSandboxRequest {
                    sandbox_id: id.to_string(),
                    copies: copies.into_iter().map(proto_spec).collect(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(CREATE_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn list_templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        let r = self
            .agent
            .list_templates(agent::ListTemplatesRequest::default())
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.templates.iter().filter_map(host_template).collect())
    }

    async fn delete_template(&self, template: &TemplateName) -> Result<bool, HostError> {
        let r = self
            .agent
            .delete_template_with_options(
                agent::DeleteTemplateRequest {
                    template: template.to_string(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(Duration::from_secs(60)),
            )
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.existed)
    }

    async fn start_process(&self, id: &SandboxId, spec: ProcSpec) -> Result<ProcEvents, HostError> {
        let client = self.process(id)?;
        let req = process::StartRequest {
            process: process::ProcessConfig {
                cmd: spec.cmd,
                args: spec.args,
                envs: spec.env.into_iter().collect(),
                cwd: spec.cwd,
                ..Default::default()
            }
            .into(),
            pty: spec
                .pty
                .map(|(cols, rows)| process::PTY {
                    size: process::pty::Size {
                        cols,
                        rows,
                        ..Default::default()
                    }
                    .into(),
                    ..Default::default()
                })
                .into(),
            stdin: Some(spec.stdin),
            ..Default::default()
        };
        let stream = client
            .start_with_options(req, user_opts(&spec.user).with_timeout(spec.deadline))
            .await
            .map_err(HostError::from_connect)?;
        Ok(proc_events!(stream))
    }

    async fn list_processes(&self, id: &SandboxId) -> Result<Vec<ProcInfo>, HostError> {
        let r = self
            .process(id)?
            .list_with_options(process::ListRequest::default(), user_opts("root"))
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.processes
            .iter()
            .map(|p| {
                let cfg = p.config.as_option();
                ProcInfo {
                    pid: p.pid,
                    cmd: cfg.map(|c| sanitize(&c.cmd)).unwrap_or_default(),
                    args: cfg
                        .map(|c| c.args.iter().map(|a| sanitize(a)).collect())
                        .unwrap_or_default(),
                    cwd: cfg.and_then(|c| c.cwd.as_deref().map(sanitize)),
                    tag: p.tag.as_deref().map(sanitize),
                }
            })
            .collect())
    }

    async fn connect_process(
        &self,
        id: &SandboxId,
        pid: u32,
        deadline: Duration,
    ) -> Result<ProcEvents, HostError> {
        let stream = self
            .process(id)?
            .connect_with_options(
                process::ConnectRequest {
                    process: selector(pid).into(),
                    ..Default::default()
                },
                user_opts("root").with_timeout(deadline),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(proc_events!(stream))
    }

    async fn send_signal(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        signal: Signal,
    ) -> Result<(), HostError> {
        let sig = match signal {
            Signal::Term => process::Signal::SIGNAL_SIGTERM,
            Signal::Kill => process::Signal::SIGNAL_SIGKILL,
        };
        self.process(id)?
            .send_signal_with_options(
                process::SendSignalRequest {
                    process: selector(pid).into(),
                    signal: sig.into(),
                    ..Default::default()
                },
                user_opts(user),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn send_input(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        data: Bytes,
        pty: bool,
    ) -> Result<(), HostError> {
        use process::__buffa::oneof::process_input::Input;
        let input = if pty {
            Input::Pty(data.to_vec())
        } else {
            Input::Stdin(data.to_vec())
        };
        self.process(id)?
            .send_input_with_options(
                process::SendInputRequest {
                    process: selector(pid).into(),
                    input: process::ProcessInput {
                        input: Some(input),
                        ..Default::default()
                    }
                    .into(),
                    ..Default::default()
                },
                user_opts(user),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn close_stdin(&self, id: &SandboxId, user: &str, pid: u32) -> Result<(), HostError> {
        self.process(id)?
            .close_stdin_with_options(
                process::CloseStdinRequest {
                    process: selector(pid).into(),
                    ..Default::default()
                },
                user_opts(user),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn resize_pty(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        cols: u32,
        rows: u32,
    ) -> Result<(), HostError> {
        self.process(id)?
            .update_with_options(
                process::UpdateRequest {
                    process: selector(pid).into(),
                    pty: process::PTY {
                        size: process::pty::Size {
                            cols,
                            rows,
                            ..Default::default()
                        }
                        .into(),
                        ..Default::default()
                    }
                    .into(),
                    ..Default::default()
                },
                user_opts(user),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn upload_file(
        &self,
        id: &SandboxId,
        user: &str,
        path: &str,
        body: ByteStream,
    ) -> Result<(), HostError> {
        let url = format!("{}/files", self.envd_base(id));
        let resp = self
            .files
            .post(url)
            .query(&[("path", path)])
            .header("authorization", basic_user(user))
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(transport)?;
        check_status(resp).await.map(|_| ())
    }

    async fn metrics(&self, id: &SandboxId) -> Result<SandboxMetrics, HostError> {
        let url = format!("{}/metrics", self.envd_base(id));
        let resp = self
            .files
            .get(url)
            .timeout(SHORT_TIMEOUT)
            .send()
            .await
            .map_err(transport)?;
        let resp = check_status(resp).await?;
        SandboxMetrics::from_guest(&read_bounded(resp, MAX_METRICS_BODY).await)
    }

    async fn download_file(
        &self,
        id: &SandboxId,
        user: &str,
        path: &str,
    ) -> Result<(Option<u64>, ByteStream), HostError> {
        let url = format!("{}/files", self.envd_base(id));
        let resp = self
            .files
            .get(url)
            .query(&[("path", path)])
            .header("authorization", basic_user(user))
            .send()
            .await
            .map_err(transport)?;
        let resp = check_status(resp).await?;
        let len = resp.content_length();
        let stream = resp.bytes_stream().map(|r| r.map_err(transport));
        Ok((len, stream.boxed()))
    }
}

/// A failed HTTP exchange, without its URL (no host addresses in API errors).
fn transport(e: reqwest::Error) -> HostError {
    let what = if e.is_timeout() {
        "the guest agent did not answer in time"
    } else if e.is_connect() {
        "the host agent is not reachable"
    } else if e.is_body() || e.is_decode() {
        "the transfer from the guest broke off"
    } else {
        "the call to the guest agent failed"
    };
    tracing::debug!(error = %e, "HTTP call through the host agent failed");
    HostError::Transport(what.to_owned())
}

/// A success passes; a redirect is refused (never followed); any other answer
/// becomes [`HostError::Http`] with the far side's message, read up to
/// [`MAX_ERROR_BODY`] and sanitized.
async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response, HostError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status.is_redirection() {
        // Reported as a bad gateway: the guest agent answered what it must not.
        return Err(HostError::Http {
            status: 502,
            message: format!(
                "the guest agent answered {} (redirects are not followed)",
                status.as_u16()
            ),
        });
    }
    let text = read_bounded(resp, MAX_ERROR_BODY).await;
    // envd answers errors as {"message": "...", "code": N}, the host agent's proxy as
    // {"error": {"code", "message"}}; fall back to the raw text.
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("message")
                .or_else(|| v.get("error").and_then(|e| e.get("message")))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or(text);
    Err(HostError::Http {
        status: status.as_u16(),
        message: sanitize(&message),
    })
}

/// At most `limit` bytes of `resp`'s body as (lossy) text, within [`SHORT_TIMEOUT`];
/// whatever is not read by then is dropped.
async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> String {
    let mut buf = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            let room = limit.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if buf.len() >= limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(SHORT_TIMEOUT, read).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// One registered host: its client and what it last said about itself.
#[derive(Clone)]
pub struct HostEntry {
    pub client: Arc<dyn HostClient>,
    pub info: Option<HostInfo>,
}

/// The host agents this control plane drives, and the scheduler over them.
#[derive(Clone)]
pub struct Hosts {
    entries: Arc<RwLock<Vec<HostEntry>>>,
}

impl Hosts {
    pub fn new(clients: Vec<Arc<dyn HostClient>>) -> Self {
        Self {
            entries: Arc::new(RwLock::new(
                clients
                    .into_iter()
                    .map(|client| HostEntry { client, info: None })
                    .collect(),
            )),
        }
    }

    pub fn entries(&self) -> Vec<HostEntry> {
        self.entries.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Remember what host `index` said about itself.
    pub fn set_info(&self, index: usize, info: HostInfo) {
        if let Ok(mut e) = self.entries.write() {
            if let Some(entry) = e.get_mut(index) {
                entry.info = Some(info);
            }
        }
    }

    /// The client of the host with ID `id`, if it is registered and has answered.
    pub fn get(&self, id: &HostId) -> Option<Arc<dyn HostClient>> {
        self.entries()
            .into_iter()
            .find(|e| e.info.as_ref().is_some_and(|i| &i.host_id == id))
            .map(|e| e.client)
    }

    /// Pick the host for a new sandbox of `template`: among hosts that answered and
    /// carry the template, the one with the fewest active sandboxes.
    pub fn pick(&self, template: &TemplateName, load: &HashMap<HostId, u64>) -> Option<HostId> {
        self.entries()
            .into_iter()
            .filter_map(|e| e.info)
            .filter(|i| i.templates.contains(template))
            .min_by_key(|i| {
                (
                    load.get(&i.host_id).copied().unwrap_or(0),
                    i.host_id.clone(),
                )
            })
            .map(|i| i.host_id)
    }
}

//! Host agents as the control plane sees them: the domain types and the narrow
//! [`HostClient`] trait (here), its one real implementation ([`AgentHostClient`], Connect
//! RPC + the agent's envd proxy, in `agent_client`), and the [`Hosts`] registry with the
//! scheduler (in `registry`, which keeps placements in flight; the choice itself is the
//! pure function of `placement`).
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

mod agent_client;
pub mod placement;
mod registry;

pub(crate) use agent_client::connector;
pub use agent_client::{basic_user, AgentHostClient, TlsMode};
pub use registry::{Enrolled, HostEntry, Hosts, Loads, Placement, PlacementRequest};

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use connectrpc::ErrorCode;
use futures::stream::BoxStream;
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

fn unimplemented_copy(template: &TemplateName) -> HostError {
    HostError::Rpc {
        code: ErrorCode::Unimplemented,
        message: format!("this host cannot copy templates ({template})"),
    }
}

/// Largest error body read from a host or guest; the rest is not read.
pub const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest Connect message accepted from a host or guest (process output arrives in
/// small chunks; this only stops a hostile peer from making us buffer without end).
pub const MAX_RPC_MESSAGE: usize = 8 * 1024 * 1024;
/// Characters of guest or host text kept in an error message.
pub const MAX_MESSAGE_CHARS: usize = 500;

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
    /// Admission capacity and use, as the agent's admission counts them.
    pub capacity: HostCapacity,
    /// Templates whose create of one shape restores instead of booting.
    pub warm: Vec<WarmShape>,
    /// The sandboxes counted in `capacity`'s use (holding a VM, pooled VMs left out).
    pub vm_sandboxes: std::collections::BTreeSet<SandboxId>,
}

/// A host's admission capacity and use (the agent's `Info`; the rules are
/// `hearth_agent::admission`'s). All zero for a host that reports none: it takes
/// nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCapacity {
    /// Guest memory the host may promise (host memory less its reserve, times the
    /// overcommit ratio).
    pub memory_capacity_mb: u64,
    pub memory_used_mb: u64,
    pub vcpus_capacity: u64,
    pub vcpus_used: u64,
    /// Free disk beyond the reserve, less disks still being made.
    pub disk_free_mb: u64,
    pub max_sandboxes: u32,
    /// Sandboxes holding a VM (what `max_sandboxes` limits), pooled VMs included.
    pub vm_sandboxes: u32,
    /// The part of the use held by pooled VMs, which give their place to creates.
    pub pooled_sandboxes: u32,
    pub pooled_memory_mb: u64,
    pub pooled_vcpus: u64,
}

/// A template whose create of exactly this shape restores a saved VM on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmShape {
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    /// Pooled VMs of it ready now.
    pub pooled: u32,
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
            // Older envd versions send no cache figure; a present one must be valid.
            mem_cache: match v.get("mem_cache") {
                None => 0,
                Some(_) => int("mem_cache")?,
            },
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
    /// Stream a host-level template's files (the agent's export format; see
    /// `hearth_agent`'s `template_copy`). Hosts that cannot: `Unimplemented`.
    async fn export_template(&self, template: &TemplateName) -> Result<ByteStream, HostError> {
        Err(unimplemented_copy(template))
    }
    /// Build a host-level template from an export stream, published whole or not
    /// at all; returns the bytes it takes.
    async fn import_template(
        &self,
        template: &TemplateName,
        body: ByteStream,
    ) -> Result<u64, HostError> {
        drop(body);
        Err(unimplemented_copy(template))
    }

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

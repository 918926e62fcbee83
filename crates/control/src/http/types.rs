//! Request and response bodies of the public API (the OpenAPI schemas).

use std::collections::BTreeMap;

use hearth_db::{SandboxRow, Template};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::app::exec::{ExecOutcome, ExecParams};
use crate::app::sandboxes::CreateParams;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always "ok".
    pub status: &'static str,
}

/// A JSON integer, also when written as a float without a fraction (`8.0`, as
/// Python's `json` writes floats; JSON Schema counts it as an integer too).
/// Out-of-range values pass through as sent, for the range check to quote.
fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(i) = n.as_i64() {
        return Ok(Some(i));
    }
    match n.as_f64() {
        // i64::MAX as f64 rounds up to 2^63, which is out of range: hence `<`.
        Some(f) if f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64 => {
            Ok(Some(f as i64))
        }
        _ => Err(serde::de::Error::custom(format!(
            "expected a whole number between -2^63 and 2^63-1, got {n}"
        ))),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Template name, e.g. "minimal".
    pub template: String,
    /// Default 1.
    #[serde(default, deserialize_with = "whole_number")]
    pub vcpus: Option<i64>,
    /// Default 256.
    #[serde(default, deserialize_with = "whole_number")]
    pub memory_mb: Option<i64>,
    /// Default 1024.
    #[serde(default, deserialize_with = "whole_number")]
    pub disk_size_mb: Option<i64>,
    /// Lifetime in seconds, after which the sandbox is destroyed. Default 300.
    #[serde(default, deserialize_with = "whole_number")]
    pub timeout_s: Option<i64>,
    /// Environment variables of every process in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// What happens when the time is up: "destroy" (default) or "pause" (kept paused
    /// for the paused retention period, then destroyed).
    pub on_timeout: Option<String>,
}

impl From<CreateSandboxRequest> for CreateParams {
    fn from(r: CreateSandboxRequest) -> Self {
        CreateParams {
            template: r.template,
            // Wide and unclamped: the range check quotes what was sent.
            vcpus: r.vcpus,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            timeout_s: r.timeout_s,
            env: r.env,
            metadata: r.metadata,
            on_timeout: r.on_timeout,
            ..Default::default()
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Sandbox {
    /// `sb-` and 16 lowercase letters or digits.
    pub id: String,
    pub team_id: String,
    pub template: String,
    /// pending | starting | running | paused | stopped | error
    pub state: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub timeout_s: u32,
    /// destroy | pause
    pub on_timeout: String,
    pub metadata: BTreeMap<String, String>,
    pub host_id: Option<String>,
    /// RFC 3339
    pub created_at: String,
    /// RFC 3339
    pub expires_at: String,
    pub error: Option<String>,
}

impl From<SandboxRow> for Sandbox {
    fn from(r: SandboxRow) -> Self {
        Sandbox {
            id: r.id.to_string(),
            team_id: r.team_id.to_string(),
            template: r.template.to_string(),
            state: r.state.to_string(),
            vcpus: r.vcpus,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_size_mb,
            timeout_s: r.timeout_s,
            on_timeout: r.on_timeout.to_string(),
            metadata: r.metadata,
            host_id: r.host_id.map(|h| h.to_string()),
            created_at: r.created_at.to_rfc3339(),
            expires_at: r.expires_at.to_rfc3339(),
            error: r.error,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
    /// Pass as `next_token` for the next page; null on the last page.
    pub next_token: Option<String>,
}

/// Which sandboxes `GET /v1/sandboxes` returns.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// Comma-separated states (pending, starting, running, paused, stopped, error).
    /// Default: pending, starting, running, paused.
    pub state: Option<String>,
    /// true: every state (ignored when `state` is given).
    pub all: Option<bool>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// The `next_token` of the previous page.
    pub next_token: Option<String>,
}

impl From<ListQuery> for crate::app::sandboxes::ListParams {
    fn from(q: ListQuery) -> Self {
        Self {
            state: q.state,
            all: q.all.unwrap_or(false),
            limit: q.limit,
            next_token: q.next_token,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    pub cols: u32,
    pub rows: u32,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments, e.g. ["sh","-c","echo hi"].
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory.
    pub cwd: Option<String>,
    /// Unix user in the guest. Default "root".
    pub user: Option<String>,
    /// Default 60, at most 3600. The process is killed when it passes.
    #[serde(default, deserialize_with = "whole_number")]
    pub timeout_s: Option<i64>,
    /// Text written to the process's stdin, which is then closed.
    pub stdin: Option<String>,
    /// WebSocket only: run under a PTY of this size.
    pub pty: Option<PtySize>,
}

impl From<ExecRequest> for ExecParams {
    fn from(r: ExecRequest) -> Self {
        ExecParams {
            cmd: r.cmd,
            env: r.env,
            cwd: r.cwd,
            user: r.user,
            timeout_s: r.timeout_s,
            stdin: r.stdin,
            pty: r.pty.map(|p| (p.cols, p.rows)),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// utf8 | base64
    pub stdout_encoding: &'static str,
    /// utf8 | base64
    pub stderr_encoding: &'static str,
    /// The output passed 16 MiB and was cut.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl From<ExecOutcome> for ExecResponse {
    fn from(o: ExecOutcome) -> Self {
        let (stdout, stdout_encoding) = o.stdout.encode();
        let (stderr, stderr_encoding) = o.stderr.encode();
        ExecResponse {
            exit_code: o.exit_code,
            stdout,
            stderr,
            stdout_encoding,
            stderr_encoding,
            stdout_truncated: o.stdout.truncated,
            stderr_truncated: o.stderr.truncated,
            timed_out: o.timed_out,
            duration_ms: o.duration_ms,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct FileQuery {
    /// Absolute path in the sandbox.
    pub path: Option<String>,
    /// User who owns a written file / whose permissions apply (default root).
    pub user: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateInfo {
    pub name: String,
    /// The platform team (all zeros) for built-in templates, else the team that made it.
    pub team_id: String,
    /// Apparent (sparse) size of its files in bytes.
    pub size_bytes: u64,
    /// Bytes it takes on its host's disk.
    pub allocated_bytes: u64,
    /// Carries memory: a sandbox of its shape starts by restore, not boot.
    pub has_memory: bool,
    /// `built-in` (a platform template from the hosts' images) or `snapshot` (made
    /// from the sandbox `source_sandbox_id`).
    pub source: String,
    /// The sandbox it was made from (null for built-in templates).
    pub source_sandbox_id: Option<String>,
    /// The host it was made on (null for built-in templates).
    pub host_id: Option<String>,
    /// Every host that holds it now (a snapshot's copies included), by ID.
    pub hosts: Vec<String>,
    /// The shape it was made from (0 when unknown); a sandbox from it gets these
    /// unless the request says otherwise, and at least its disk size.
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    /// RFC 3339
    pub created_at: String,
}

impl From<Template> for TemplateInfo {
    fn from(t: Template) -> Self {
        TemplateInfo {
            name: t.name.to_string(),
            team_id: t.team_id.to_string(),
            size_bytes: t.size_bytes,
            allocated_bytes: t.allocated_bytes,
            has_memory: t.has_memory,
            source: if t.source_sandbox_id.is_some() {
                "snapshot"
            } else {
                "built-in"
            }
            .to_owned(),
            source_sandbox_id: t.source_sandbox_id.map(|s| s.to_string()),
            host_id: t.location.map(|l| l.host_id.to_string()),
            hosts: t.hosts.iter().map(ToString::to_string).collect(),
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            disk_size_mb: t.disk_size_mb,
            created_at: t.created_at.to_rfc3339(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateInfo>,
}

/// Body of `POST /v1/sandboxes/{id}/resume` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// New lifetime in seconds, counted from the resume. Default: the sandbox's own.
    #[serde(default, deserialize_with = "whole_number")]
    pub timeout_s: Option<i64>,
}

/// Body of `POST /v1/sandboxes/{id}/timeout`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// Seconds from now after which the sandbox is destroyed (or paused).
    #[serde(default, deserialize_with = "whole_number")]
    pub timeout_s: Option<i64>,
}

/// Body of `POST /v1/sandboxes/{id}/snapshots`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The new template's name, unique in the team.
    pub name: String,
    /// Keep memory too (a warm template: its sandboxes start by restore). Default false.
    #[serde(default)]
    pub memory: bool,
}

/// Body of `POST /v1/sandboxes/{id}/fork` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// Copies to make, 1 to 16 (default 1).
    #[serde(default, deserialize_with = "whole_number")]
    pub count: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ForkResponse {
    /// The new copies, running.
    pub sandboxes: Vec<Sandbox>,
}

/// A process running in a sandbox.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessInfo {
    pub pid: u32,
    pub cmd: String,
    pub args: Vec<String>,
    pub cwd: Option<String>,
    pub tag: Option<String>,
}

impl From<crate::app::hosts::ProcInfo> for ProcessInfo {
    fn from(p: crate::app::hosts::ProcInfo) -> Self {
        ProcessInfo {
            pid: p.pid,
            cmd: p.cmd,
            args: p.args,
            cwd: p.cwd,
            tag: p.tag,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

/// How long `POST .../processes/{pid}/connect` streams at most.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ConnectQuery {
    /// Seconds, 1 to 3600 (default 60); the stream ends then, the process keeps running.
    pub timeout_s: Option<i64>,
}

/// Body of `POST /v1/keys` and `POST /v1/admin/teams/{id}/keys` (all optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// A label to tell keys apart (default "key").
    #[serde(default)]
    pub name: Option<String>,
    /// An admin key (only an admin key may make one).
    #[serde(default)]
    pub is_admin: bool,
    /// Lifetime in seconds; absent: the key never expires.
    #[serde(default, deserialize_with = "whole_number")]
    pub expires_in_s: Option<i64>,
}

impl From<CreateKeyRequest> for crate::app::accounts::KeyParams {
    fn from(r: CreateKeyRequest) -> Self {
        Self {
            name: r.name,
            is_admin: r.is_admin,
            expires_in_s: r.expires_in_s,
        }
    }
}

/// An API key as listed: never its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyInfo {
    pub id: String,
    pub team_id: String,
    pub name: String,
    /// `hk_` and the secret's first 8 characters, to recognise a key (null for keys
    /// made before prefixes were recorded).
    pub prefix: Option<String>,
    pub is_admin: bool,
    /// Neither revoked nor expired.
    pub active: bool,
    /// RFC 3339
    pub created_at: String,
    /// RFC 3339, exact to 30 s; null: never used.
    pub last_used_at: Option<String>,
    /// RFC 3339; null: never expires.
    pub expires_at: Option<String>,
    /// RFC 3339; null: not revoked.
    pub revoked_at: Option<String>,
    /// The key that made it (null: made at installation).
    pub created_by: Option<String>,
}

impl From<hearth_db::ApiKey> for ApiKeyInfo {
    fn from(k: hearth_db::ApiKey) -> Self {
        ApiKeyInfo {
            active: k.is_active(chrono::Utc::now()),
            id: k.id.to_string(),
            team_id: k.team_id.to_string(),
            name: k.name,
            prefix: k.prefix,
            is_admin: k.is_admin,
            created_at: k.created_at.to_rfc3339(),
            last_used_at: k.last_used_at.map(|t| t.to_rfc3339()),
            expires_at: k.expires_at.map(|t| t.to_rfc3339()),
            revoked_at: k.revoked_at.map(|t| t.to_rfc3339()),
            created_by: k.created_by.map(|c| c.to_string()),
        }
    }
}

/// A new key and its secret. The secret is shown this once and never again.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub key: ApiKeyInfo,
    /// The API key to send as `Authorization: Bearer …` or `X-API-Key`.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<ApiKeyInfo>,
}

/// Body of `POST /v1/admin/teams`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTeamRequest {
    /// Unique; lowercase letters, digits, '-' and '_'.
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamInfo {
    pub id: String,
    pub name: String,
    /// RFC 3339
    pub created_at: String,
}

impl From<hearth_db::Team> for TeamInfo {
    fn from(t: hearth_db::Team) -> Self {
        TeamInfo {
            id: t.id.to_string(),
            name: t.name,
            created_at: t.created_at.to_rfc3339(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TeamList {
    pub teams: Vec<TeamInfo>,
}

/// One sample of a running sandbox's use, taken by its guest agent.
#[derive(Debug, Serialize, ToSchema)]
pub struct SandboxMetricsInfo {
    /// When the guest took it (RFC 3339, the guest's clock).
    pub timestamp: String,
    pub cpu_count: u32,
    /// 0 to 100, all vCPUs together.
    pub cpu_used_pct: f64,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub mem_cache_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
}

impl From<crate::app::hosts::SandboxMetrics> for SandboxMetricsInfo {
    fn from(m: crate::app::hosts::SandboxMetrics) -> Self {
        SandboxMetricsInfo {
            timestamp: chrono::DateTime::from_timestamp(m.timestamp_unix, 0)
                .unwrap_or_default()
                .to_rfc3339(),
            cpu_count: m.cpu_count,
            cpu_used_pct: m.cpu_used_pct,
            mem_used_bytes: m.mem_used,
            mem_total_bytes: m.mem_total,
            mem_cache_bytes: m.mem_cache,
            disk_used_bytes: m.disk_used,
            disk_total_bytes: m.disk_total,
        }
    }
}

/// Which entries `GET /v1/audit` returns.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    /// Page size, 1 to 500 (default 100).
    pub limit: Option<i64>,
    /// Entries older than this entry ID (the `next_before` of the previous page).
    pub before: Option<i64>,
}

/// One thing done to one of the team's things.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntryInfo {
    /// Increasing with time.
    pub id: i64,
    /// RFC 3339
    pub at: String,
    pub team_id: String,
    /// The API key that did it; null: hearth itself (a sandbox's timeout, auto-resume).
    pub actor_key_id: Option<String>,
    /// sandbox.create | sandbox.delete | sandbox.pause | sandbox.resume | sandbox.fork |
    /// sandbox.snapshot | sandbox.timeout | template.delete | key.create | key.revoke |
    /// team.create
    pub action: String,
    /// The sandbox, key, template name or team it was done to.
    pub target: String,
    /// What else is worth knowing (e.g. the template of a create).
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl From<hearth_db::AuditEntry> for AuditEntryInfo {
    fn from(e: hearth_db::AuditEntry) -> Self {
        AuditEntryInfo {
            id: e.id,
            at: e.at.to_rfc3339(),
            team_id: e.team_id.to_string(),
            actor_key_id: e.actor_key_id.map(|k| k.to_string()),
            action: e.action,
            target: e.target,
            detail: e.detail,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditEntryInfo>,
    /// Pass as `before` for the next (older) page; null: no more.
    pub next_before: Option<i64>,
}

/// Where `GET /v1/events` starts.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct EventsQuery {
    /// Entries after this event ID (as `Last-Event-ID`, which wins); default: from now.
    pub after: Option<i64>,
}

//! Typed rows returned by the store.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use hearth_types::{ApiKeyId, HostId, SandboxId, TeamId, TemplateName};

pub use hearth_types::SandboxState;

/// What happens to a sandbox when its time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnTimeout {
    /// Destroyed (the default).
    #[default]
    Destroy,
    /// Paused by the control plane, kept for the paused retention period.
    Pause,
}

impl OnTimeout {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Destroy => "destroy",
            Self::Pause => "pause",
        }
    }
}

impl fmt::Display for OnTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `on_timeout` string that is neither `destroy` nor `pause`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("on_timeout must be \"destroy\" or \"pause\", got {0:?}")]
pub struct UnknownOnTimeout(pub String);

impl FromStr for OnTimeout {
    type Err = UnknownOnTimeout;
    fn from_str(s: &str) -> Result<Self, UnknownOnTimeout> {
        match s {
            "destroy" => Ok(Self::Destroy),
            "pause" => Ok(Self::Pause),
            other => Err(UnknownOnTimeout(other.chars().take(40).collect())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub id: TeamId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// An API key as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub team_id: TeamId,
    pub name: String,
    /// `hk_` and the first characters of the secret (None for keys older than prefixes).
    pub prefix: Option<String>,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The key that made it (None: bootstrap).
    pub created_by: Option<ApiKeyId>,
}

impl ApiKey {
    /// Neither revoked nor expired at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// What [`crate::Db::create_api_key`] records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    pub team: TeamId,
    pub name: String,
    pub is_admin: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_by: Option<ApiKeyId>,
}

impl NewApiKey {
    /// A key of `team` that never expires, made at bootstrap.
    pub fn new(team: TeamId, name: &str, is_admin: bool) -> Self {
        Self {
            team,
            name: name.to_owned(),
            is_admin,
            expires_at: None,
            created_by: None,
        }
    }
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// Whose thing it is.
    pub team_id: TeamId,
    /// The key that did it (`None`: hearth itself, e.g. at a sandbox's timeout).
    pub actor_key_id: Option<ApiKeyId>,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
}

/// Who an API key speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub team_id: TeamId,
    pub key_id: ApiKeyId,
    pub is_admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub id: HostId,
    pub url: String,
    pub vmm: String,
    pub accel: String,
    pub last_seen_at: DateTime<Utc>,
    /// `None` for a static host (`--agent-url`), recorded by the reconciler.
    pub name: Option<String>,
    pub status: HostStatus,
    /// Set by an admin (`drain`): no new sandboxes, kept while unreachable.
    pub drain: bool,
    pub created_at: DateTime<Utc>,
    pub enrolled_at: Option<DateTime<Utc>>,
    pub enroll_expires_at: Option<DateTime<Utc>>,
    /// SHA-256 (hex) of the certificate issued at enrollment.
    pub cert_fingerprint: Option<String>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub load: HostLoad,
}

/// Where a host is in its life (`hosts.status`).
///
/// `pending` (created, token not used) -> `active` (enrolled) <-> `draining` (admin);
/// `active`/`draining` -> `unreachable` (no heartbeat for a while) -> back when it
/// answers; any -> `revoked` (final: its certificate is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostStatus {
    Pending,
    Active,
    Draining,
    Unreachable,
    Revoked,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Pending => "pending",
            HostStatus::Active => "active",
            HostStatus::Draining => "draining",
            HostStatus::Unreachable => "unreachable",
            HostStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => HostStatus::Pending,
            "active" => HostStatus::Active,
            "draining" => HostStatus::Draining,
            "unreachable" => HostStatus::Unreachable,
            "revoked" => HostStatus::Revoked,
            _ => return None,
        })
    }
}

/// A host's last reported capacity and load (its Info).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLoad {
    pub memory_capacity_mb: u64,
    pub memory_used_mb: u64,
    pub vcpu_capacity: u64,
    pub vcpus_used: u64,
    pub disk_free_mb: u64,
    pub running: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: TemplateName,
    pub team_id: TeamId,
    /// Apparent (sparse) size of its files.
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
    /// Where a team's snapshot lives (`None` for platform templates: on every host
    /// that lists them) and its name there.
    pub location: Option<TemplateLocation>,
    /// Carries memory: a sandbox of its shape starts by restore.
    pub has_memory: bool,
    /// Bytes allocated on the host's disk.
    pub allocated_bytes: u64,
    pub source_sandbox_id: Option<SandboxId>,
    /// The shape it was made from (0 when unknown).
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    /// The hosts that hold it now (`template_hosts`), by ID.
    pub hosts: Vec<HostId>,
}

/// The host that holds a team's snapshot and its host-level template name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateLocation {
    pub host_id: HostId,
    pub host_name: TemplateName,
}

/// A team's new snapshot, as the catalogue records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTemplate {
    pub name: TemplateName,
    pub team_id: TeamId,
    pub location: TemplateLocation,
    pub has_memory: bool,
    pub allocated_bytes: u64,
    pub apparent_bytes: u64,
    pub source_sandbox_id: SandboxId,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
}

/// What the control plane records when it accepts a create request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSandbox {
    pub id: SandboxId,
    pub team_id: TeamId,
    pub template: TemplateName,
    pub state: SandboxState,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub timeout_s: u32,
    pub on_timeout: OnTimeout,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub host_id: Option<HostId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The guest agent's port needs the sandbox's envd access token (E2B's `secure`).
    pub secure: bool,
    /// Traffic through the sandbox proxy resumes it when paused.
    pub auto_resume: bool,
}

/// A sandbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRow {
    pub id: SandboxId,
    pub team_id: TeamId,
    pub template: TemplateName,
    pub state: SandboxState,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub timeout_s: u32,
    pub on_timeout: OnTimeout,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub host_id: Option<HostId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// The guest agent's port needs the sandbox's envd access token (E2B's `secure`).
    pub secure: bool,
    /// Traffic through the sandbox proxy resumes it when paused.
    pub auto_resume: bool,
}

//! Typed rows returned by the store.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use hearth_types::{ApiKeyId, HostId, SandboxId, TeamId, TemplateName};

/// Lifecycle state of a sandbox as recorded in the database.
///
/// ```text
/// pending -> starting -> running <-> paused
/// running | paused -> stopped
/// any -> error
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxState {
    Pending,
    Starting,
    Running,
    Paused,
    Stopped,
    Error,
}

impl SandboxState {
    pub const ALL: [SandboxState; 6] = [
        Self::Pending,
        Self::Starting,
        Self::Running,
        Self::Paused,
        Self::Stopped,
        Self::Error,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }

    /// Whether the sandbox may hold resources on a host.
    pub fn is_active(&self) -> bool {
        matches!(
            self,
            Self::Pending | Self::Starting | Self::Running | Self::Paused
        )
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state string that is not one of [`SandboxState`]'s.
#[derive(Debug, thiserror::Error)]
#[error("unknown sandbox state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for SandboxState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Team {
    pub id: TeamId,
    pub name: String,
    pub created_at: DateTime<Utc>,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub name: TemplateName,
    pub team_id: TeamId,
    pub size_bytes: u64,
    pub created_at: DateTime<Utc>,
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
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub host_id: Option<HostId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
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
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub host_id: Option<HostId>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

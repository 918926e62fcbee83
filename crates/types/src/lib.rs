//! Typed IDs, validated names and resource limits shared by every hearth crate.
//!
//! Everything a user can type into the API passes through a parser here, so the
//! rules (what an ID looks like, what a template name may contain, how big a sandbox
//! may be) live in one place. This crate does no I/O.

mod ids;
mod limits;
mod state;

pub use ids::{ApiKeyId, HostId, IdError, SandboxId, TeamId, TemplateName, UserId, WebhookId};
pub use limits::{
    check_range, LimitError, QuotaExceeded, SandboxLimits, SandboxShape, TeamQuota, TeamUsage,
};
pub use state::{BadTransition, SandboxState, UnknownState};

/// The version of E2B's in-VM daemon `envd` whose API hearth's guest agent speaks in
/// full. E2B's SDKs turn features on by it (they read it from the create response).
pub const ENVD_VERSION: &str = "0.5.7";

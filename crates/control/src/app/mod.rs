//! Application logic: what each API operation does, independent of HTTP.
//!
//! Handlers in `http/` parse and call into [`App`]; [`App`] validates, talks to the
//! store (`hearth_db`) and to host agents (through [`hosts::HostClient`]). Nothing here
//! knows about status codes; errors are [`AppError`].

pub mod error;
pub mod exec;
pub mod files;
pub mod hosts;
pub mod reconcile;
pub mod sandboxes;
pub mod validate;

use std::sync::Arc;

use hearth_db::Db;
use hearth_types::SandboxLimits;

pub use error::{AppError, AppResult};
use hosts::{HostClient, Hosts};

/// Shared state of the control plane.
pub struct App {
    pub db: Db,
    pub hosts: Hosts,
    pub limits: SandboxLimits,
    pub max_upload_bytes: u64,
}

impl App {
    pub fn new(
        db: Db,
        hosts: Vec<Arc<dyn HostClient>>,
        limits: SandboxLimits,
        max_upload_bytes: u64,
    ) -> Self {
        Self {
            db,
            hosts: Hosts::new(hosts),
            limits,
            max_upload_bytes,
        }
    }
}

/// Create the default team and an admin API key on first start. Returns the key's
/// secret (shown once), or `None` when the installation already has API keys.
pub async fn bootstrap(db: &Db) -> AppResult<Option<String>> {
    if db.count_api_keys().await? > 0 {
        return Ok(None);
    }
    let team = db.create_team("default").await?;
    let (key_id, secret) = db.create_api_key(team.id, "admin", true).await?;
    tracing::info!(team_id = %team.id, %key_id, "bootstrapped default team and admin API key");
    Ok(Some(secret))
}

impl App {
    /// Templates `team` may use: its own and the platform's.
    pub async fn list_templates(
        &self,
        team: hearth_types::TeamId,
    ) -> AppResult<Vec<hearth_db::Template>> {
        Ok(self.db.list_templates(team).await?)
    }
}

//! Sandbox lifecycle: create, read, list, destroy.
//!
//! Create: validate -> insert row `starting` (with the chosen host) -> host
//! CreateSandbox -> `running`, or `error` with the host's message. Delete: host
//! DestroySandbox -> `stopped` (the row stays readable). Host calls run in a task of
//! their own so that a client that disconnects mid-request cannot leave a row
//! `starting` forever or a VM without its row updated.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Duration, Utc};
use hearth_db::{NewSandbox, SandboxRow, SandboxState};
use hearth_types::{SandboxId, SandboxShape, TeamId, TemplateName};

use tracing::Instrument;

use super::hosts::{CreateSpec, HostClient, HostError};
use super::{validate, App, AppError, AppResult};

/// A create request, still unchecked.
#[derive(Debug, Clone, Default)]
pub struct CreateParams {
    pub template: String,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub disk_size_mb: Option<u32>,
    pub timeout_s: Option<u32>,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
}

/// Parse a sandbox ID from a URL path segment.
pub fn parse_id(s: &str) -> AppResult<SandboxId> {
    s.parse()
        .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))
}

fn not_found(id: &SandboxId) -> AppError {
    AppError::NotFound(format!("sandbox '{id}' not found"))
}

impl App {
    pub async fn create_sandbox(
        self: &Arc<Self>,
        team: TeamId,
        p: CreateParams,
    ) -> AppResult<SandboxRow> {
        let template: TemplateName = p
            .template
            .parse()
            .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))?;
        let shape = SandboxShape::validate(
            &self.limits,
            p.vcpus,
            p.memory_mb,
            p.disk_size_mb,
            p.timeout_s,
        )
        .map_err(|e| AppError::InvalidArgument(e.to_string()))?;
        validate::env("env", &p.env)?;
        validate::metadata(&p.metadata)?;
        if self.db.get_template(team, &template).await?.is_none() {
            return Err(AppError::NotFound(format!(
                "template '{template}' not found"
            )));
        }
        let load = self.db.count_active_by_host().await?;
        let host_id = self.hosts.pick(&template, &load).ok_or_else(|| {
            AppError::Unavailable(format!(
                "no host agent that has template '{template}' is reachable"
            ))
        })?;
        let client = self
            .hosts
            .get(&host_id)
            .ok_or_else(|| AppError::Unavailable(format!("host {host_id} is not reachable")))?;

        let now = Utc::now();
        let row = NewSandbox {
            id: SandboxId::generate(),
            team_id: team,
            template: template.clone(),
            state: SandboxState::Starting,
            vcpus: shape.vcpus,
            memory_mb: shape.memory_mb,
            disk_size_mb: shape.disk_size_mb,
            timeout_s: shape.timeout_s,
            env: p.env.clone(),
            metadata: p.metadata,
            host_id: Some(host_id.clone()),
            created_at: now,
            expires_at: now + Duration::seconds(i64::from(shape.timeout_s)),
        };
        self.db.insert_sandbox(&row).await?;
        let spec = CreateSpec {
            sandbox_id: row.id.clone(),
            team_id: team,
            template,
            vcpus: shape.vcpus,
            memory_mb: shape.memory_mb,
            disk_size_mb: shape.disk_size_mb,
            expires_at_unix_ms: row.expires_at.timestamp_millis(),
            env: p.env,
        };
        let id = row.id.clone();
        let app = self.clone();
        // Out of the request's cancellation scope: the row must follow the host's answer.
        let outcome = tokio::spawn(async move { app.finish_create(&client, spec).await })
            .await
            .map_err(|e| AppError::Internal(format!("create task failed: {e}")))?;
        outcome?;
        self.db
            .get_sandbox(team, &id)
            .await?
            .ok_or_else(|| not_found(&id))
    }

    async fn finish_create(&self, client: &Arc<dyn HostClient>, spec: CreateSpec) -> AppResult<()> {
        let id = spec.sandbox_id.clone();
        let span = tracing::info_span!("create", sandbox_id = %id, host = client.url());
        match client.create_sandbox(spec).instrument(span).await {
            Ok(()) => {
                let moved = self
                    .db
                    .update_sandbox_state(
                        &id,
                        Some(&[SandboxState::Starting]),
                        SandboxState::Running,
                        None,
                    )
                    .await?;
                if !moved {
                    // Someone (a delete, the reconciler) changed it meanwhile: keep theirs.
                    tracing::warn!("sandbox left 'starting' while it booted");
                }
                tracing::info!("sandbox running");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "host failed to create sandbox");
                self.db
                    .update_sandbox_state(&id, None, SandboxState::Error, Some(&e.to_string()))
                    .await?;
                Err(AppError::Host {
                    context: "creating the sandbox failed".into(),
                    source: e,
                })
            }
        }
    }

    pub async fn get_sandbox(&self, team: TeamId, id: &SandboxId) -> AppResult<SandboxRow> {
        self.db
            .get_sandbox(team, id)
            .await?
            .ok_or_else(|| not_found(id))
    }

    pub async fn list_sandboxes(&self, team: TeamId) -> AppResult<Vec<SandboxRow>> {
        Ok(self.db.list_sandboxes(team).await?)
    }

    /// Destroy the VM and mark the row `stopped`. Idempotent.
    pub async fn delete_sandbox(self: &Arc<Self>, team: TeamId, id: &SandboxId) -> AppResult<()> {
        let row = self.get_sandbox(team, id).await?;
        let app = self.clone();
        tokio::spawn(async move { app.destroy_row(&row).await })
            .await
            .map_err(|e| AppError::Internal(format!("delete task failed: {e}")))?
    }

    /// Ask the row's host to destroy the sandbox, then mark it stopped.
    pub(crate) async fn destroy_row(&self, row: &SandboxRow) -> AppResult<()> {
        if let Some(host_id) = &row.host_id {
            if row.state != SandboxState::Stopped {
                let client = self.hosts.get(host_id).ok_or_else(|| {
                    AppError::Unavailable(format!(
                        "host {host_id} of sandbox {} is not reachable",
                        row.id
                    ))
                })?;
                match client.destroy_sandbox(&row.id).await {
                    Ok(existed) => {
                        tracing::info!(sandbox_id = %row.id, existed, "sandbox destroyed")
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(AppError::host("destroying the sandbox failed")(e)),
                }
            }
        }
        if row.state != SandboxState::Error {
            self.db.mark_sandbox_stopped(&row.id).await?;
        }
        Ok(())
    }

    /// The host of a sandbox that must be running for the operation (exec, files).
    pub(crate) async fn running_host(
        &self,
        team: TeamId,
        id: &SandboxId,
    ) -> AppResult<Arc<dyn HostClient>> {
        let row = self.get_sandbox(team, id).await?;
        match row.state {
            SandboxState::Running => {}
            SandboxState::Stopped => return Err(AppError::Conflict("sandbox is stopped".into())),
            other => {
                return Err(AppError::Conflict(format!(
                    "sandbox is {other}, not running"
                )))
            }
        }
        let host_id = row
            .host_id
            .ok_or_else(|| AppError::Internal(format!("running sandbox {id} has no host")))?;
        self.hosts
            .get(&host_id)
            .ok_or_else(|| AppError::Unavailable(format!("host {host_id} is not reachable")))
    }
}

/// Map a guest-side failure for an operation on `what` (a file, a process).
pub(crate) fn guest_error(context: &str, e: HostError) -> AppError {
    AppError::Host {
        context: context.to_owned(),
        source: e,
    }
}

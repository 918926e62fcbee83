//! Pause, resume, deadlines and fork of running sandboxes.
//!
//! Every state change is written before the host acts and reverted if the host fails
//! (`running -> paused` before PauseSandbox, `paused -> running` before
//! ResumeSandbox), so that the reconciler, which leaves rows alone for
//! `Policy::transition_grace` after a change, never takes a sandbox in the middle of
//! a pause or resume for a lost one, and which skips sandboxes with an operation in
//! flight on this control plane (`ops`). Every write is a compare-and-set through
//! the state table (`hearth_db`); each operation runs whole in a task of its own,
//! out of the request's cancellation scope, so a client that disconnects cannot
//! leave a row out of step with its host.
//!
//! Quotas: a paused sandbox counts against the team's number of sandboxes and disk,
//! not its vCPUs and memory; a resume takes them back in the same atomic step as its
//! `paused -> running`. A fork's copies are admitted together, all or none.

use std::sync::Arc;

use chrono::{Duration, Utc};
use connectrpc::ErrorCode;
use hearth_db::{Admission, NewSandbox, ResumeAdmission, SandboxRow, SandboxState};
use hearth_types::{check_range, SandboxId, TeamId};

use super::audit::action;
use super::hosts::{CreateSpec, HostClient, HostError};
use super::sandboxes::{not_found, HOST_NO_DEADLINE};
use super::{App, AppError, AppResult};

/// Most copies one fork makes.
pub const MAX_FORK: u32 = 16;

impl App {
    /// Pause a running sandbox (idempotent on a paused one).
    pub async fn pause_sandbox(
        self: &Arc<Self>,
        team: TeamId,
        id: &SandboxId,
    ) -> AppResult<SandboxRow> {
        let id = id.clone();
        self.detached("pause", move |app| async move {
            let started = std::time::Instant::now();
            let r = app.pause_op(team, &id).await;
            app.metrics
                .observe_op(super::metrics::Op::Pause, started, &r);
            r
        })
        .await
    }

    async fn pause_op(self: &Arc<Self>, team: TeamId, id: &SandboxId) -> AppResult<SandboxRow> {
        let app = self;
        let id = id.clone();
        {
            let row = app.get_sandbox(team, &id).await?;
            match row.state {
                SandboxState::Paused => return Ok(row),
                SandboxState::Running => {}
                other => {
                    return Err(AppError::Conflict(format!(
                        "sandbox is {other}: only a running sandbox can be paused"
                    )))
                }
            }
            let client = app.host_of(&row)?;
            app.pause_row(&id, &client).await?;
            app.audit(
                team,
                action::SANDBOX_PAUSE,
                id.as_str(),
                serde_json::Value::Null,
            )
            .await;
            app.get_sandbox(team, &id).await
        }
    }

    /// Mark `id` paused, ask its host to pause it, revert to running if the host
    /// fails. Used by the API and by the reconciler (on_timeout = pause).
    pub(crate) async fn pause_row(
        &self,
        id: &SandboxId,
        client: &Arc<dyn HostClient>,
    ) -> AppResult<()> {
        let _op = self.begin_op(id);
        if !self
            .db
            .transition_sandbox(id, SandboxState::Running, SandboxState::Paused, None)
            .await?
        {
            // Someone else moved it first: fine if that was a pause.
            let now = self.db.get_sandbox_unscoped(id).await?;
            return match now.map(|r| r.state) {
                Some(SandboxState::Paused) => Ok(()),
                Some(other) => Err(AppError::Conflict(format!(
                    "sandbox is {other}: only a running sandbox can be paused"
                ))),
                None => Err(not_found(id)),
            };
        }
        match client.pause_sandbox(id).await {
            Ok(()) => {
                tracing::info!(sandbox_id = %id, "sandbox paused");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %e, "host failed to pause the sandbox; it stays running");
                self.db
                    .transition_sandbox(id, SandboxState::Paused, SandboxState::Running, None)
                    .await?;
                Err(AppError::host(
                    "pausing the sandbox failed; it is still running",
                )(e))
            }
        }
    }

    /// Resume a paused sandbox with a new deadline from now (`timeout_s`, else its
    /// own lifetime).
    pub async fn resume_sandbox(
        self: &Arc<Self>,
        team: TeamId,
        id: &SandboxId,
        timeout_s: Option<i64>,
    ) -> AppResult<SandboxRow> {
        let id = id.clone();
        self.detached("resume", move |app| async move {
            let started = std::time::Instant::now();
            let r = app.resume_op(team, &id, timeout_s).await;
            app.metrics
                .observe_op(super::metrics::Op::Resume, started, &r);
            r
        })
        .await
    }

    async fn resume_op(
        &self,
        team: TeamId,
        id: &SandboxId,
        timeout_s: Option<i64>,
    ) -> AppResult<SandboxRow> {
        if let Some(t) = timeout_s {
            self.check_timeout(t)?;
        }
        let row = self.get_sandbox(team, id).await?;
        if row.state != SandboxState::Paused {
            return Err(AppError::Conflict(format!(
                "sandbox is {}: only a paused sandbox can be resumed",
                row.state
            )));
        }
        let client = self.host_of(&row)?;
        let timeout = timeout_s.map_or(row.timeout_s, |t| u32::try_from(t).unwrap_or(u32::MAX));
        let lifetime = Duration::seconds(i64::from(timeout));
        // Provisional while the host restores it; set from "running since" after.
        let provisional = Utc::now() + self.create_timeout() + lifetime;
        let _op = self.begin_op(id);
        match self
            .db
            .resume_within_quota(
                team,
                id,
                provisional,
                Some(timeout),
                &self.policy.team_quota,
            )
            .await?
        {
            ResumeAdmission::Admitted => {}
            ResumeAdmission::Refused(q) => return Err(AppError::QuotaExceeded(q.to_string())),
            ResumeAdmission::NotPaused => {
                let now = self.get_sandbox(team, id).await?;
                return Err(AppError::Conflict(format!(
                    "sandbox is {}: only a paused sandbox can be resumed",
                    now.state
                )));
            }
        }
        match client.resume_sandbox(id, HOST_NO_DEADLINE).await {
            Ok(()) => {
                self.db
                    .set_sandbox_deadline(team, id, Utc::now() + lifetime, timeout)
                    .await?;
                tracing::info!(sandbox_id = %id, "sandbox resumed");
                self.audit(
                    team,
                    action::SANDBOX_RESUME,
                    id.as_str(),
                    serde_json::json!({"timeout_s": timeout}),
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %e, "host failed to resume the sandbox; it stays paused");
                self.db
                    .transition_sandbox(id, SandboxState::Running, SandboxState::Paused, None)
                    .await?;
                return Err(AppError::host(
                    "resuming the sandbox failed; it is still paused with its state kept, retry the resume",
                )(e));
            }
        }
        self.get_sandbox(team, id).await
    }

    fn check_timeout(&self, t: i64) -> AppResult<u32> {
        check_range("timeout_s", Some(t), 0, 1, self.limits.max_timeout_s)
            .map_err(|e| AppError::InvalidArgument(e.to_string()))
    }

    /// Set-timeout / keep-alive: a running sandbox ends (or pauses) `timeout_s` from now.
    pub async fn set_sandbox_timeout(
        &self,
        team: TeamId,
        id: &SandboxId,
        timeout_s: Option<i64>,
    ) -> AppResult<SandboxRow> {
        let t =
            timeout_s.ok_or_else(|| AppError::InvalidArgument("timeout_s is required".into()))?;
        let timeout = self.check_timeout(t)?;
        let row = self.get_sandbox(team, id).await?;
        let conflict = |state: SandboxState| {
            AppError::Conflict(match state {
                SandboxState::Paused => "sandbox is paused: give the timeout to its resume (POST /v1/sandboxes/{id}/resume {\"timeout_s\": N})".to_owned(),
                other => format!("sandbox is {other}: only a running sandbox has a timeout to change"),
            })
        };
        if row.state != SandboxState::Running {
            return Err(conflict(row.state));
        }
        let expires = Utc::now() + Duration::seconds(i64::from(timeout));
        if !self
            .db
            .set_sandbox_deadline(team, id, expires, timeout)
            .await?
        {
            return Err(conflict(self.get_sandbox(team, id).await?.state));
        }
        self.get_sandbox(team, id).await
    }

    /// Make `count` running copies of a running sandbox on its host.
    pub async fn fork_sandbox(
        self: &Arc<Self>,
        team: TeamId,
        id: &SandboxId,
        count: Option<i64>,
    ) -> AppResult<Vec<SandboxRow>> {
        let id = id.clone();
        self.detached("fork", move |app| async move {
            let started = std::time::Instant::now();
            let r = app.fork_op(team, &id, count).await;
            app.metrics
                .observe_op(super::metrics::Op::Fork, started, &r);
            r
        })
        .await
    }

    async fn fork_op(
        &self,
        team: TeamId,
        id: &SandboxId,
        count: Option<i64>,
    ) -> AppResult<Vec<SandboxRow>> {
        let count = check_range("count", count, 1, 1, MAX_FORK)
            .map_err(|e| AppError::InvalidArgument(e.to_string()))?;
        let src = self.get_sandbox(team, id).await?;
        if src.state != SandboxState::Running {
            return Err(AppError::Conflict(format!(
                "sandbox is {}: only a running sandbox can be forked",
                src.state
            )));
        }
        let client = self.host_of(&src)?;
        let _op = self.begin_op(id);
        // The host-level template of the source (a team's snapshot has its own name there).
        let host_template = match self.db.get_template(team, &src.template).await? {
            Some(t) => t.location.map_or(src.template.clone(), |l| l.host_name),
            None => src.template.clone(),
        };
        let now = Utc::now();
        let lifetime = Duration::seconds(i64::from(src.timeout_s));
        let rows: Vec<NewSandbox> = (0..count)
            .map(|_| NewSandbox {
                id: SandboxId::generate(),
                team_id: team,
                template: src.template.clone(),
                state: SandboxState::Starting,
                vcpus: src.vcpus,
                memory_mb: src.memory_mb,
                disk_size_mb: src.disk_size_mb,
                timeout_s: src.timeout_s,
                on_timeout: src.on_timeout,
                env: src.env.clone(),
                metadata: src.metadata.clone(),
                host_id: src.host_id.clone(),
                created_at: now,
                expires_at: now + self.create_timeout() + lifetime,
                secure: src.secure,
                auto_resume: src.auto_resume,
            })
            .collect();
        match self
            .db
            .insert_sandboxes_within_quota(&rows, &self.policy.team_quota)
            .await?
        {
            Admission::Admitted => {}
            Admission::Refused(q) => return Err(AppError::QuotaExceeded(q.to_string())),
        }
        let specs: Vec<CreateSpec> = rows
            .iter()
            .map(|r| CreateSpec {
                sandbox_id: r.id.clone(),
                team_id: team,
                template: host_template.clone(),
                vcpus: r.vcpus,
                memory_mb: r.memory_mb,
                disk_size_mb: r.disk_size_mb,
                expires_at_unix_ms: HOST_NO_DEADLINE,
                env: r.env.clone(),
            })
            .collect();
        let ids: Vec<SandboxId> = rows.iter().map(|r| r.id.clone()).collect();
        self.finish_fork(&client, id, specs, &ids, lifetime).await?;
        let copies: Vec<&str> = ids.iter().map(|c| c.as_str()).collect();
        self.audit(
            team,
            action::SANDBOX_FORK,
            id.as_str(),
            serde_json::json!({"copies": copies}),
        )
        .await;
        let mut out = Vec::with_capacity(ids.len());
        for cid in &ids {
            out.push(self.get_sandbox(team, cid).await?);
        }
        Ok(out)
    }

    async fn finish_fork(
        &self,
        client: &Arc<dyn HostClient>,
        src: &SandboxId,
        specs: Vec<CreateSpec>,
        ids: &[SandboxId],
        lifetime: Duration,
    ) -> AppResult<()> {
        match client.fork_sandbox(src, specs).await {
            Ok(()) => {
                let expires = Utc::now() + lifetime;
                for id in ids {
                    if !self.db.mark_sandbox_running(id, expires).await? {
                        tracing::warn!(sandbox_id = %id, "fork copy left 'starting' while it was made");
                    }
                }
                tracing::info!(sandbox_id = %src, copies = ids.len(), "sandbox forked");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %src, error = %e, "host failed to fork the sandbox");
                // No orphans: the rows go (and their quota with them), and whatever the
                // host may have made of a copy is destroyed.
                self.db.delete_starting_sandboxes(ids).await?;
                for id in ids {
                    if let Err(d) = client.destroy_sandbox(id).await {
                        if !d.is_not_found() {
                            tracing::warn!(sandbox_id = %id, error = %d, "destroying a failed fork copy failed");
                        }
                    }
                }
                Err(match e {
                    HostError::Rpc {
                        code: ErrorCode::ResourceExhausted,
                        message,
                    } => AppError::CapacityExceeded(message),
                    other => AppError::host(
                        "forking the sandbox failed; the original is unchanged",
                    )(other),
                })
            }
        }
    }
}

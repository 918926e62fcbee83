//! The reconciler: brings the database in line with what hosts report. Idempotent;
//! runs at start and then on a timer; logs every change it makes.
//!
//! Each pass, per configured host: Info (record the host and its templates as platform
//! templates, except teams' snapshots, `snap-*`; when what it holds changed, which of
//! the catalogue's templates it holds); then, for rows `running` or `paused`
//! on that host:
//! - `running` that the host no longer lists -> `stopped`; `paused` that it no longer
//!   lists -> `error` ("lost");
//! - reported failed (VM died, shut down or rebooted itself) -> `error` with the host's
//!   message;
//! - `running` that the host lists paused, or `paused` that it lists running (a pause
//!   or resume cut off between host and database) -> what the host says, but only
//!   once the row has not changed for `Policy::transition_grace`, since the control
//!   plane writes the row before it calls the host; rows the host is pausing or
//!   resuming are left alone;
//! - `running` past its deadline: destroyed and `stopped`, or paused
//!   (`on_timeout: pause`); `paused` longer than `Policy::paused_retention`: destroyed.
//!
//! Rows with an operation in flight on this control plane (`ops`) are skipped; every
//! write here is a compare-and-set on the row as read (state and `updated_at`), so
//! a decision made from a read that a pause and resume have since overtaken is
//! dropped, not applied to the newer row.
//!
//! A host that does not answer is left alone: its rows keep their state until it is
//! back (a restarted agent re-adopts its VMs). An enrolled host marked `unreachable`
//! by the heartbeat (`app::fleet`) is skipped; once it has not answered for
//! `Policy::host_lost_after`, or when it is revoked, its running and paused rows
//! become `error` ("lost").
//!
//! Then, for all hosts: rows still `starting` past the create timeout (a control
//! plane that died mid-create) become `error` and their host is asked to destroy
//! them; rows `stopped` or `error` unchanged for the retention period are deleted.

use std::collections::HashMap;

use std::sync::Arc;

use chrono::Utc;
use hearth_db::{HostStatus, OnTimeout, SandboxRow, SandboxState};
use hearth_types::{HostId, SandboxId, TeamId, TemplateName};

use super::hosts::{HostClient, HostPhase, HostSandbox};
use super::templates::SNAPSHOT_PREFIX;
use super::{App, AppResult};

/// What one pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub hosts_seen: usize,
    pub lost: Vec<SandboxId>,
    pub expired: Vec<SandboxId>,
    /// Reported failed by their host (VM died or rebooted itself): now `error`.
    pub failed: Vec<SandboxId>,
    /// Left `starting` past the create timeout: now `error`.
    pub stale: Vec<SandboxId>,
    /// Rows of finished sandboxes deleted after the retention period.
    pub pruned: u64,
    /// Reached their deadline with `on_timeout: pause`: now paused.
    pub paused: Vec<SandboxId>,
    /// Paused longer than the paused retention: destroyed.
    pub retired: Vec<SandboxId>,
    /// Rows set to what their host holds after a pause or resume that was cut off
    /// (running <-> paused).
    pub corrected: Vec<SandboxId>,
}

impl ReconcileReport {
    /// Whether the pass changed any sandbox.
    pub fn changed(&self) -> bool {
        !self.lost.is_empty()
            || !self.failed.is_empty()
            || !self.expired.is_empty()
            || !self.stale.is_empty()
            || self.pruned > 0
            || !self.paused.is_empty()
            || !self.retired.is_empty()
            || !self.corrected.is_empty()
    }
}

impl App {
    /// One whole pass, as the leader (tests, and the first pass of a lone server).
    pub async fn reconcile_once(&self) -> AppResult<ReconcileReport> {
        self.reconcile_pass(true).await
    }

    /// One pass. Every control plane refreshes what it knows of the hosts (it schedules
    /// on it); only the leader (`lead`, see `hearth_db::Leadership`) changes sandboxes,
    /// so that replicas on one database never act twice on one row.
    pub async fn reconcile_pass(&self, lead: bool) -> AppResult<ReconcileReport> {
        let mut report = ReconcileReport::default();
        for entry in self.hosts.entries() {
            // An unreachable host is polled by the heartbeat, not here (a dead host
            // would hold every pass for its timeout); its rows wait for it, or are
            // lost after `Policy::host_lost_after` (`reconcile_lost_hosts`).
            if !entry.reachable() {
                continue;
            }
            let url = entry.client.url().to_owned();
            let asked = std::time::Instant::now();
            let info = match entry.client.info().await {
                Ok(info) => info,
                Err(e) => {
                    tracing::debug!(host = %url, error = %e, "host agent did not answer Info");
                    continue;
                }
            };
            // Announce a host when what it is changes, not when its load does.
            let changed = entry.info.as_ref().is_none_or(|old| {
                (&old.host_id, &old.vmm, &old.accel, &old.templates)
                    != (&info.host_id, &info.vmm, &info.accel, &info.templates)
            });
            if changed {
                tracing::info!(host = %url, host_id = %info.host_id, vmm = %info.vmm, accel = %info.accel,
                    templates = ?info.templates.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                    "host agent registered");
            }
            self.db
                .upsert_host(&info.host_id, &url, &info.vmm, &info.accel)
                .await?;
            // Teams' snapshots (host-level `snap-*` names) are in the catalogue
            // under their team's names, never platform templates.
            let platform: Vec<_> = info
                .templates
                .iter()
                .filter(|t| !t.as_str().starts_with(SNAPSHOT_PREFIX))
                .cloned()
                .collect();
            for t in &platform {
                self.db.upsert_template(TeamId::PLATFORM, t, 0).await?;
            }
            if changed {
                self.refresh_platform_templates(&entry.client, &platform)
                    .await;
                // Which of the catalogue's templates this host holds (before its
                // info is kept, so a failure here is retried at the next pass).
                self.db
                    .record_host_templates(&info.host_id, &info.templates)
                    .await?;
            }
            let host_id = info.host_id.clone();
            self.hosts.set_info(&entry.client, info, asked);
            report.hosts_seen += 1;
            if !lead {
                continue;
            }

            // Read intent before observing the host: a row that is `running` now was
            // created on the host already, so the listing below must contain it.
            let rows: Vec<_> = self
                .db
                .list_sandboxes_in_states(&[SandboxState::Running, SandboxState::Paused])
                .await?
                .into_iter()
                .filter(|r| r.host_id.as_ref() == Some(&host_id))
                .collect();
            let listed: HashMap<SandboxId, HostSandbox> = match entry.client.list_sandboxes().await
            {
                Ok(l) => l.into_iter().map(|s| (s.id.clone(), s)).collect(),
                Err(e) => {
                    tracing::warn!(host = %url, error = %e, "host agent did not list its sandboxes");
                    continue;
                }
            };
            for row in rows {
                // Its pause, resume, snapshot, fork or delete runs here now: what the
                // host says is on its way to the row.
                if self.op_in_flight(&row.id) {
                    continue;
                }
                let on_host = listed.get(&row.id);
                self.reconcile_row(&entry.client, &url, row.clone(), on_host, &mut report)
                    .await?;
            }
        }
        if !lead {
            return Ok(report);
        }
        self.reconcile_lost_hosts(&mut report).await?;
        self.reconcile_stale_starts(&mut report).await?;
        let keep =
            chrono::Duration::from_std(self.policy.retention).unwrap_or(chrono::Duration::days(7));
        report.pruned = self.db.prune_finished_sandboxes(Utc::now() - keep).await?;
        if report.pruned > 0 {
            tracing::info!(
                rows = report.pruned,
                "deleted rows of sandboxes finished before the retention period"
            );
        }
        Ok(report)
    }

    /// Running and paused rows of enrolled hosts that have not answered for
    /// `Policy::host_lost_after` (since their last heartbeat), or were revoked:
    /// `error` ("lost"). A host that misses a few heartbeats is only `unreachable`
    /// and its rows wait (a restarted agent re-adopts its VMs).
    async fn reconcile_lost_hosts(&self, report: &mut ReconcileReport) -> AppResult<()> {
        let after = chrono::Duration::from_std(self.policy.host_lost_after)
            .unwrap_or(chrono::Duration::seconds(60));
        let now = Utc::now();
        let lost: HashMap<HostId, &'static str> = self
            .db
            .list_hosts()
            .await?
            .into_iter()
            .filter_map(|h| match h.status {
                HostStatus::Revoked => Some((h.id, "lost: its host was revoked")),
                HostStatus::Unreachable
                    if h.last_heartbeat_at
                        .or(h.enrolled_at)
                        .is_none_or(|t| t + after <= now) =>
                {
                    Some((h.id, "lost: its host stopped answering"))
                }
                _ => None,
            })
            .collect();
        if lost.is_empty() {
            return Ok(());
        }
        let rows = self
            .db
            .list_sandboxes_in_states(&[SandboxState::Running, SandboxState::Paused])
            .await?;
        for row in rows {
            let Some(why) = row.host_id.as_ref().and_then(|h| lost.get(h)) else {
                continue;
            };
            if self
                .db
                .transition_sandbox(&row.id, row.state, SandboxState::Error, Some(why))
                .await?
            {
                tracing::warn!(sandbox_id = %row.id, host_id = ?row.host_id, reason = %why, "sandbox marked error");
                self.end_streams(&row.id);
                self.record_change(&row, SandboxState::Error, why).await;
                report.lost.push(row.id);
            }
        }
        Ok(())
    }

    /// Platform templates' sizes, memory and shape as the host reports them (hosts
    /// without ListTemplates are skipped).
    async fn refresh_platform_templates(
        &self,
        client: &Arc<dyn HostClient>,
        platform: &[TemplateName],
    ) {
        let Ok(list) = client.list_templates().await else {
            return;
        };
        for t in list.iter().filter(|t| platform.contains(&t.name)) {
            if let Err(e) = self
                .db
                .update_platform_template(
                    &t.name,
                    t.apparent_bytes,
                    t.allocated_bytes,
                    t.has_memory,
                    (t.vcpus, t.memory_mb, t.disk_size_mb),
                )
                .await
            {
                tracing::warn!(template = %t.name, error = %e, "recording a platform template failed");
            }
        }
    }

    /// One running or paused row against what its host lists.
    async fn reconcile_row(
        &self,
        client: &Arc<dyn HostClient>,
        url: &str,
        row: SandboxRow,
        listed: Option<&HostSandbox>,
        report: &mut ReconcileReport,
    ) -> AppResult<()> {
        let now = Utc::now();
        let grace = chrono::Duration::from_std(self.policy.transition_grace)
            .unwrap_or(chrono::Duration::seconds(240));
        let settled = row.updated_at + grace <= now;
        let state = row.state;
        match listed {
            None if state == SandboxState::Running => {
                let gone = self
                    .db
                    .transition_sandbox_unchanged(
                        &row.id,
                        state,
                        row.updated_at,
                        SandboxState::Stopped,
                        None,
                    )
                    .await?;
                if gone {
                    tracing::info!(sandbox_id = %row.id, host = %url,
                        "sandbox no longer on its host (reaped or lost): marked stopped");
                    self.end_streams(&row.id);
                    self.record_change(&row, SandboxState::Stopped, "lost on its host")
                        .await;
                    report.lost.push(row.id);
                }
            }
            // A paused sandbox its host no longer has: its state is gone.
            None if settled => {
                let why = "lost: its host no longer holds the paused sandbox";
                if self
                    .db
                    .transition_sandbox_unchanged(
                        &row.id,
                        state,
                        row.updated_at,
                        SandboxState::Error,
                        Some(why),
                    )
                    .await?
                {
                    tracing::warn!(sandbox_id = %row.id, host = %url, "paused sandbox lost on its host: marked error");
                    self.record_change(&row, SandboxState::Error, why).await;
                    report.lost.push(row.id);
                }
            }
            None => {}
            Some(HostSandbox {
                failure: Some(why), ..
            }) => {
                // Its VM died, shut down or rebooted itself: an error the user
                // sees; the host keeps its resources until the row is deleted.
                let failed = self
                    .db
                    .transition_sandbox_unchanged(
                        &row.id,
                        state,
                        row.updated_at,
                        SandboxState::Error,
                        Some(why),
                    )
                    .await?;
                if failed {
                    tracing::info!(sandbox_id = %row.id, host = %url, reason = %why,
                        "sandbox failed on its host: marked error");
                    self.end_streams(&row.id);
                    self.record_change(&row, SandboxState::Error, why).await;
                    report.failed.push(row.id);
                }
            }
            Some(h) => match (state, h.phase) {
                // The host is working on it, or a change of ours may still be on its way.
                (_, HostPhase::Changing) => {}
                (SandboxState::Running, HostPhase::Paused)
                | (SandboxState::Paused, HostPhase::Running)
                    if !settled => {}
                (SandboxState::Running, HostPhase::Paused) => {
                    self.correct(&row, SandboxState::Paused, report).await?
                }
                (SandboxState::Paused, HostPhase::Running) => {
                    self.correct(&row, SandboxState::Running, report).await?
                }
                (SandboxState::Running, HostPhase::Running) if row.expires_at <= now => {
                    self.expire(client, &row, report).await
                }
                (SandboxState::Paused, HostPhase::Paused) if settled => {
                    let keep = chrono::Duration::from_std(self.policy.paused_retention)
                        .unwrap_or(chrono::Duration::days(30));
                    if row.updated_at + keep <= now {
                        match self.destroy_row(&row).await {
                            Ok(()) => {
                                tracing::info!(sandbox_id = %row.id, "paused past its retention: destroyed");
                                self.record_change(
                                    &row,
                                    SandboxState::Stopped,
                                    "paused past its retention: destroyed",
                                )
                                .await;
                                report.retired.push(row.id);
                            }
                            Err(e) => {
                                tracing::warn!(sandbox_id = %row.id, error = %e, "destroying a retired paused sandbox failed")
                            }
                        }
                    }
                }
                _ => {}
            },
        }
        Ok(())
    }

    /// The row says `row.state`, its host (settled) says `to`: the host is right.
    async fn correct(
        &self,
        row: &SandboxRow,
        to: SandboxState,
        report: &mut ReconcileReport,
    ) -> AppResult<()> {
        if self
            .db
            .transition_sandbox_unchanged(&row.id, row.state, row.updated_at, to, None)
            .await?
        {
            tracing::warn!(sandbox_id = %row.id, from = %row.state, to = %to,
                "row did not match its host after an interrupted pause or resume: corrected");
            self.record_change(row, to, "set to what its host holds")
                .await;
            report.corrected.push(row.id.clone());
        }
        Ok(())
    }

    /// Record that hearth ended a sandbox's time (`then`: paused or destroyed).
    async fn record_timeout(&self, row: &SandboxRow, then: &str) {
        self.audit_as(
            None,
            row.team_id,
            super::audit::action::SANDBOX_TIMEOUT,
            row.id.as_str(),
            serde_json::json!({ "then": then }),
        )
        .await;
    }

    /// Record a change of state made by hearth itself (no key) in the audit log, from
    /// which the team's event stream reads.
    async fn record_change(&self, row: &SandboxRow, to: SandboxState, why: &str) {
        self.audit_as(
            None,
            row.team_id,
            super::audit::action::SANDBOX_STATE,
            row.id.as_str(),
            serde_json::json!({"from": row.state.to_string(), "to": to.to_string(), "reason": why}),
        )
        .await;
    }

    /// A running sandbox past its deadline: paused or destroyed, as it asked.
    async fn expire(
        &self,
        client: &Arc<dyn HostClient>,
        row: &SandboxRow,
        report: &mut ReconcileReport,
    ) {
        match row.on_timeout {
            OnTimeout::Pause => match self.pause_row(&row.id, client).await {
                Ok(()) => {
                    tracing::info!(sandbox_id = %row.id, "sandbox reached its timeout: paused");
                    report.paused.push(row.id.clone());
                    self.record_timeout(row, "paused").await;
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %row.id, error = %e, "pausing an expired sandbox failed")
                }
            },
            OnTimeout::Destroy => match self.destroy_row(row).await {
                Ok(()) => {
                    tracing::info!(sandbox_id = %row.id, "sandbox expired: destroyed and marked stopped");
                    report.expired.push(row.id.clone());
                    self.record_timeout(row, "destroyed").await;
                }
                Err(e) => {
                    tracing::warn!(sandbox_id = %row.id, error = %e, "destroying expired sandbox failed")
                }
            },
        }
    }

    /// `starting` rows older than the create timeout: no create is waiting on them
    /// any more (it has its own, shorter deadline), so the control plane that wrote
    /// them died. Mark them `error` and free what their host may hold.
    async fn reconcile_stale_starts(&self, report: &mut ReconcileReport) -> AppResult<()> {
        let timeout = chrono::Duration::from_std(self.policy.create_timeout)
            .unwrap_or(chrono::Duration::seconds(240));
        let cutoff = Utc::now() - timeout;
        let rows = self
            .db
            .list_sandboxes_in_states(&[SandboxState::Starting])
            .await?;
        for row in rows.into_iter().filter(|r| r.created_at < cutoff) {
            let message = format!(
                "did not finish starting within {} s",
                self.policy.create_timeout.as_secs()
            );
            if !self
                .db
                .update_sandbox_state(
                    &row.id,
                    &[SandboxState::Starting],
                    SandboxState::Error,
                    Some(&message),
                )
                .await?
            {
                continue;
            }
            tracing::warn!(sandbox_id = %row.id, "sandbox stuck in 'starting': marked error");
            self.record_change(&row, SandboxState::Error, &message)
                .await;
            if let Some(client) = row.host_id.as_ref().and_then(|h| self.hosts.get(h)) {
                match client.destroy_sandbox(&row.id).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        tracing::warn!(sandbox_id = %row.id, error = %e, "destroying a stuck sandbox failed")
                    }
                }
            }
            report.stale.push(row.id);
        }
        Ok(())
    }
}

//! The reconciler: brings the database in line with what hosts report. Idempotent;
//! runs at start and then on a timer; logs every change it makes.
//!
//! Each pass, per configured host: Info (record the host and its templates as platform
//! templates); then rows `running` on that host that the host no longer lists become
//! `stopped`, rows the host reports failed (VM died, shut down or rebooted itself)
//! become `error` with the host's message; and expired rows are destroyed on their
//! host and marked `stopped`.
//! A host that does not answer is left alone: its rows keep their state until it is
//! back (a restarted agent re-adopts its VMs).
//!
//! Then, for all hosts: rows still `starting` past the create timeout (a control
//! plane that died mid-create) become `error` and their host is asked to destroy
//! them; rows `stopped` or `error` unchanged for the retention period are deleted.

use std::collections::HashMap;

use chrono::Utc;
use hearth_db::SandboxState;
use hearth_types::{SandboxId, TeamId};

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
}

impl ReconcileReport {
    /// Whether the pass changed any sandbox.
    pub fn changed(&self) -> bool {
        !self.lost.is_empty()
            || !self.failed.is_empty()
            || !self.expired.is_empty()
            || !self.stale.is_empty()
            || self.pruned > 0
    }
}

impl App {
    pub async fn reconcile_once(&self) -> AppResult<ReconcileReport> {
        let mut report = ReconcileReport::default();
        for (index, entry) in self.hosts.entries().into_iter().enumerate() {
            let url = entry.client.url().to_owned();
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
            for t in &info.templates {
                self.db.upsert_template(TeamId::PLATFORM, t, 0).await?;
            }
            let host_id = info.host_id.clone();
            self.hosts.set_info(index, info);
            report.hosts_seen += 1;

            // Read intent before observing the host: a row that is `running` now was
            // created on the host already, so the listing below must contain it.
            let rows: Vec<_> = self
                .db
                .list_running_sandboxes()
                .await?
                .into_iter()
                .filter(|r| r.host_id.as_ref() == Some(&host_id))
                .collect();
            let listed: HashMap<SandboxId, Option<String>> = match entry
                .client
                .list_sandboxes()
                .await
            {
                Ok(l) => l.into_iter().map(|s| (s.id, s.failure)).collect(),
                Err(e) => {
                    tracing::warn!(host = %url, error = %e, "host agent did not list its sandboxes");
                    continue;
                }
            };
            let now = Utc::now();
            for row in rows {
                match listed.get(&row.id) {
                    None => {
                        if self
                            .db
                            .update_sandbox_state(
                                &row.id,
                                Some(&[SandboxState::Running]),
                                SandboxState::Stopped,
                                None,
                            )
                            .await?
                        {
                            tracing::info!(sandbox_id = %row.id, host = %url,
                                "sandbox no longer on its host (reaped or lost): marked stopped");
                            self.end_streams(&row.id);
                            report.lost.push(row.id);
                        }
                        continue;
                    }
                    Some(Some(why)) => {
                        // Its VM died, shut down or rebooted itself: an error the user
                        // sees; the host keeps its resources until the row is deleted.
                        if self
                            .db
                            .update_sandbox_state(
                                &row.id,
                                Some(&[SandboxState::Running]),
                                SandboxState::Error,
                                Some(why),
                            )
                            .await?
                        {
                            tracing::info!(sandbox_id = %row.id, host = %url, reason = %why,
                                "sandbox failed on its host: marked error");
                            self.end_streams(&row.id);
                            report.failed.push(row.id);
                        }
                        continue;
                    }
                    Some(None) => {}
                }
                if row.expires_at <= now {
                    match self.destroy_row(&row).await {
                        Ok(()) => {
                            tracing::info!(sandbox_id = %row.id, "sandbox expired: destroyed and marked stopped");
                            report.expired.push(row.id);
                        }
                        Err(e) => {
                            tracing::warn!(sandbox_id = %row.id, error = %e, "destroying expired sandbox failed")
                        }
                    }
                }
            }
        }
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
                    Some(&[SandboxState::Starting]),
                    SandboxState::Error,
                    Some(&message),
                )
                .await?
            {
                continue;
            }
            tracing::warn!(sandbox_id = %row.id, "sandbox stuck in 'starting': marked error");
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

//! The templates catalogue: platform templates (built in on every host that lists
//! them) and each team's snapshots, which live on the host that made them under a
//! host-level name the control plane picks (`snap-` + 16 random characters), so that
//! team names never clash on a host and a team never learns another's.
//!
//! Snapshot: host SnapshotSandbox first, then the catalogue row; a host failure
//! leaves no row, and a row that cannot be written (the name was taken meanwhile)
//! deletes the host's new template again. Delete: refused while an active sandbox of
//! the team uses the template (checked here, and the host refuses too).

use std::sync::Arc;

use hearth_db::{DbError, NewTemplate, Principal, Template, TemplateLocation};
use hearth_types::{SandboxId, TeamId, TemplateName};
use rand::Rng;

use super::audit::action;
use super::{App, AppError, AppResult};
use hearth_db::SandboxState;
use serde_json::Value;

/// Prefix of host-level names of teams' snapshots; never a platform template's.
pub const SNAPSHOT_PREFIX: &str = "snap-";

/// A fresh host-level template name: `snap-` + 16 of `[a-z0-9]`.
fn host_level_name() -> AppResult<TemplateName> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..16)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{SNAPSHOT_PREFIX}{suffix}")
        .parse()
        .map_err(|e: hearth_types::IdError| AppError::Internal(e.to_string()))
}

fn parse_name(name: &str) -> AppResult<TemplateName> {
    name.parse()
        .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))
}

fn template_not_found(name: &str) -> AppError {
    AppError::NotFound(format!("template '{name}' not found"))
}

impl App {
    /// Templates `team` may use: its own and the platform's.
    pub async fn list_templates(&self, team: TeamId) -> AppResult<Vec<Template>> {
        Ok(self.db.list_templates(team).await?)
    }

    /// The template `name` as `team` sees it: its own, else the platform's; another
    /// team's is not found.
    pub async fn get_template(&self, team: TeamId, name: &str) -> AppResult<Template> {
        let name = parse_name(name)?;
        self.db
            .get_template(team, &name)
            .await?
            .ok_or_else(|| template_not_found(name.as_str()))
    }

    /// Save sandbox `id` (running or paused) as the team's template `name`; runs to
    /// its end even when the client goes away.
    pub async fn snapshot_sandbox(
        self: &Arc<Self>,
        team: TeamId,
        id: &SandboxId,
        name: &str,
        memory: bool,
    ) -> AppResult<Template> {
        let (id, name) = (id.clone(), name.to_owned());
        self.detached("snapshot", move |app| async move {
            app.snapshot_op(team, &id, &name, memory).await
        })
        .await
    }

    async fn snapshot_op(
        &self,
        team: TeamId,
        id: &SandboxId,
        name: &str,
        memory: bool,
    ) -> AppResult<Template> {
        let name = parse_name(name)?;
        if name.as_str().starts_with(SNAPSHOT_PREFIX) {
            return Err(AppError::InvalidArgument(format!(
                "template name must not start with '{SNAPSHOT_PREFIX}' (reserved)"
            )));
        }
        let row = self.get_sandbox(team, id).await?;
        if !matches!(row.state, SandboxState::Running | SandboxState::Paused) {
            return Err(AppError::Conflict(format!(
                "sandbox is {}: only a running or paused sandbox can be snapshotted",
                row.state
            )));
        }
        if let Some(t) = self.db.get_template(team, &name).await? {
            return Err(AppError::Conflict(if t.team_id.is_platform() {
                format!("'{name}' is the name of a platform template: pick another name")
            } else {
                format!("template '{name}' already exists: pick another name or delete it first")
            }));
        }
        let client = self.host_of(&row)?;
        let host_id = row
            .host_id
            .clone()
            .ok_or_else(|| AppError::Internal(format!("sandbox {id} has no host")))?;
        let host_name = host_level_name()?;
        let _op = self.begin_op(id);
        let made = client
            .snapshot_sandbox(id, &host_name, memory)
            .await
            .map_err(AppError::host("snapshotting the sandbox failed"))?;
        let new = NewTemplate {
            name: name.clone(),
            team_id: team,
            location: TemplateLocation {
                host_id,
                host_name: host_name.clone(),
            },
            has_memory: made.has_memory,
            allocated_bytes: made.allocated_bytes,
            apparent_bytes: made.apparent_bytes,
            source_sandbox_id: id.clone(),
            vcpus: row.vcpus,
            memory_mb: row.memory_mb,
            disk_size_mb: if made.disk_size_mb > 0 {
                made.disk_size_mb
            } else {
                row.disk_size_mb
            },
        };
        match self.db.insert_template(&new).await {
            Ok(t) => {
                tracing::info!(sandbox_id = %id, template = %name, host_template = %host_name,
                    memory = made.has_memory, "snapshot saved as a template");
                self.audit(
                    team,
                    action::SANDBOX_SNAPSHOT,
                    id.as_str(),
                    serde_json::json!({"template": name.as_str(), "memory": made.has_memory}),
                )
                .await;
                Ok(t)
            }
            Err(e) => {
                // Not in the catalogue: the host's copy must not stay behind.
                if let Err(d) = client.delete_template(&host_name).await {
                    tracing::warn!(template = %host_name, error = %d, "removing an unrecorded snapshot failed");
                }
                Err(match e {
                    DbError::AlreadyExists { .. } => AppError::Conflict(format!(
                        "template '{name}' already exists: pick another name or delete it first"
                    )),
                    other => AppError::Db(other),
                })
            }
        }
    }

    /// Delete the template `name` as the caller sees it: the team's own (on its host
    /// and in the catalogue), or, for an admin, a platform template (on every host that
    /// lists it; a host refuses one built into its images). A non-admin naming a
    /// platform template gets [`AppError::Forbidden`] before any host is asked.
    pub async fn delete_template(&self, caller: &Principal, name: &str) -> AppResult<()> {
        let team = caller.team_id;
        let name = parse_name(name)?;
        let t = self
            .db
            .get_template(team, &name)
            .await?
            .ok_or_else(|| template_not_found(name.as_str()))?;
        if t.team_id.is_platform() {
            if !caller.is_admin {
                return Err(AppError::Forbidden(format!(
                    "template '{name}' is a platform template: only an admin can delete it"
                )));
            }
            return self.delete_platform_template(caller, &name).await;
        }
        let users = self.db.count_active_using_template(team, &name).await?;
        if users > 0 {
            return Err(AppError::Conflict(format!(
                "template '{name}' is used by {users} active sandbox(es): delete them first"
            )));
        }
        if let Some(loc) = &t.location {
            // Every host that holds it (where it was made and its copies), all
            // reachable before any is asked.
            let mut holders = t.hosts.clone();
            if !holders.contains(&loc.host_id) {
                holders.push(loc.host_id.clone());
            }
            let clients = holders
                .iter()
                .map(|h| {
                    self.hosts.get(h).ok_or_else(|| {
                        AppError::Unavailable(format!(
                            "host {h} (which holds template '{name}') is not reachable"
                        ))
                    })
                })
                .collect::<AppResult<Vec<_>>>()?;
            for client in clients {
                client
                    .delete_template(&loc.host_name)
                    .await
                    .map_err(AppError::host("deleting the template failed"))?;
            }
        }
        self.db.delete_team_template(team, &name).await?;
        tracing::info!(team_id = %team, template = %name, "template deleted");
        self.audit(team, action::TEMPLATE_DELETE, name.as_str(), Value::Null)
            .await;
        Ok(())
    }

    /// Remove platform template `name` from every host that lists it, then from the
    /// catalogue (a host that still lists it would bring the row back).
    async fn delete_platform_template(
        &self,
        caller: &Principal,
        name: &TemplateName,
    ) -> AppResult<()> {
        let users = self.db.count_active_using_platform_template(name).await?;
        if users > 0 {
            return Err(AppError::Conflict(format!(
                "platform template '{name}' is used by {users} active sandbox(es): delete them first"
            )));
        }
        for entry in self.hosts.entries() {
            let Some(info) = &entry.info else {
                continue;
            };
            if info.templates.contains(name) {
                entry
                    .client
                    .delete_template(name)
                    .await
                    .map_err(AppError::host(format!(
                        "deleting platform template '{name}' on host {}",
                        info.host_id
                    )))?;
            }
        }
        self.db.delete_platform_template(name).await?;
        tracing::info!(template = %name, by = %caller.key_id, "platform template deleted");
        self.audit_as(
            Some(&caller.key_id),
            TeamId::PLATFORM,
            action::TEMPLATE_DELETE,
            name.as_str(),
            Value::Null,
        )
        .await;
        Ok(())
    }
}

//! Copies of templates between hosts, for a sandbox placed on a host that lacks its
//! template: the control plane relays the source host's export stream into the
//! target host's import (`HostClient::export_template` / `import_template`),
//! chunk by chunk, never holding a file. The target checks sizes and checksums and
//! publishes the template whole or not at all; only then is the copy recorded in
//! the catalogue (`template_hosts`), which stays the source of truth.

use hearth_types::{HostId, TeamId, TemplateName};

use super::hosts::HostError;
use super::{App, AppError, AppResult};
use connectrpc::ErrorCode;

impl App {
    /// Make sure host `host` holds the template `name` as `team` sees it (the team's
    /// own, else the platform's), copying it there from a host that holds it when it
    /// does not. Returns the host-level name to create from on `host`. Idempotent;
    /// two copies racing end with one template (the second import finds it there).
    /// Callers run it out of a request's cancellation scope (as `create` does).
    pub async fn ensure_template_on(
        &self,
        host: &HostId,
        team: TeamId,
        name: &TemplateName,
    ) -> AppResult<TemplateName> {
        let t = self
            .db
            .get_template(team, name)
            .await?
            .ok_or_else(|| AppError::NotFound(format!("template '{name}' not found")))?;
        let host_name = t
            .location
            .as_ref()
            .map_or_else(|| name.clone(), |l| l.host_name.clone());
        // Platform templates are also held wherever a host lists them.
        let listed_by = |h: &HostId| {
            self.hosts.entries().into_iter().any(|e| {
                e.info
                    .as_ref()
                    .is_some_and(|i| &i.host_id == h && i.templates.contains(&host_name))
            })
        };
        if t.hosts.contains(host) || (t.team_id.is_platform() && listed_by(host)) {
            return Ok(host_name);
        }
        let target = self
            .hosts
            .get(host)
            .ok_or_else(|| AppError::Unavailable(format!("host {host} is not reachable")))?;
        let mut holders = t.hosts.clone();
        if t.team_id.is_platform() {
            holders.extend(
                self.hosts
                    .entries()
                    .into_iter()
                    .filter_map(|e| e.info)
                    .filter(|i| i.templates.contains(&host_name))
                    .map(|i| i.host_id),
            );
        }
        let (source_id, source) = holders
            .iter()
            .filter(|h| *h != host)
            .find_map(|h| self.hosts.get(h).map(|c| (h.clone(), c)))
            .ok_or_else(|| {
                AppError::Unavailable(format!(
                    "no reachable host holds template '{name}' to copy it from"
                ))
            })?;
        let started = std::time::Instant::now();
        let stream = source
            .export_template(&host_name)
            .await
            .map_err(AppError::host("reading the template from its host failed"))?;
        let bytes = match target.import_template(&host_name, stream).await {
            Ok(b) => b,
            // Another copy got there first: the host holds it now.
            Err(HostError::Http { status: 409, .. })
            | Err(HostError::Rpc {
                code: ErrorCode::AlreadyExists,
                ..
            }) => 0,
            Err(e) => {
                tracing::warn!(template = %name, from = %source_id, to = %host, error = %e,
                    "copying a template failed; the target kept nothing");
                return Err(AppError::host("copying the template to the host failed")(e));
            }
        };
        if !self
            .db
            .add_template_host(t.team_id, name, host, &host_name)
            .await?
        {
            // Deleted while it was copied: the copy must not stay behind.
            if let Err(e) = target.delete_template(&host_name).await {
                tracing::warn!(template = %host_name, host = %host, error = %e,
                    "removing the copy of a deleted template failed");
            }
            return Err(AppError::NotFound(format!("template '{name}' not found")));
        }
        tracing::info!(template = %name, host_template = %host_name, from = %source_id, to = %host,
            bytes, ms = started.elapsed().as_millis() as u64, "template copied between hosts");
        Ok(host_name)
    }
}

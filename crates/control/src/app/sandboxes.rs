//! Sandbox lifecycle: create, read, list, destroy.
//!
//! Create: validate -> check the team's quota and insert the row `starting`, without a
//! host, in one atomic step (`hearth_db`) -> pick a host and reserve its capacity
//! (`hosts::placement`; a refusal deletes the row) -> record the host -> host
//! CreateSandbox -> `running`, with
//! the lifetime (`timeout_s`) counted from then. A create that is refused (validation,
//! quota, unknown template, no host, host out of capacity) leaves no row; a host that
//! fails otherwise leaves an `error` row (pruned after the retention period) and is
//! asked to destroy what it may hold. Delete: host DestroySandbox (also for `stopped`
//! and `error` rows, so their slot and disk are freed) -> `stopped`, and the sandbox's
//! exec streams end at once. Both run whole in a task of their own (`ops`), so that
//! a client that disconnects mid-request cannot leave a row `starting` or a VM
//! without its row updated.
//!
//! Expiry: the control plane reaps at `expires_at`, set to "running since + timeout_s"
//! when the boot finishes, so a short `timeout_s` never ends a sandbox while it boots.
//! It owns every deadline: the host agent is given none (`expires_at_unix_ms` 0), since
//! a deadline can move (`POST .../timeout`, resume) and the agent has no call to move
//! it, and a sandbox with `on_timeout: pause` must be paused, not destroyed, at expiry.
//! A sandbox whose control plane is gone therefore stays until it is back.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use chrono::{Duration, Utc};
use connectrpc::ErrorCode;
use hearth_db::{
    Admission, NewSandbox, OnTimeout, PageCursor, SandboxRow, SandboxState, TemplateLocation,
};
use hearth_types::{check_range, SandboxId, SandboxShape, TeamId, TemplateName};

use tracing::Instrument;

use super::audit::{self, action};
use super::hosts::placement::{Need, NoPlacement};
use super::hosts::{
    CreateSpec, HostClient, HostError, Loads, Placement, PlacementRequest, SandboxMetrics,
};
use super::{validate, App, AppError, AppResult};
use serde_json::Value;

/// A create request, still unchecked. Numbers are as sent (wide, unclamped), so that
/// an error can quote them.
#[derive(Debug, Clone, Default)]
pub struct CreateParams {
    pub template: String,
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub disk_size_mb: Option<i64>,
    pub timeout_s: Option<i64>,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    /// "destroy" (default) or "pause".
    pub on_timeout: Option<String>,
    /// The guest agent's port needs the sandbox's envd access token through the
    /// sandbox proxy (E2B's `secure`); default true.
    pub secure: Option<bool>,
    /// Traffic through the sandbox proxy resumes the sandbox when it is paused.
    pub auto_resume: bool,
}

/// Parse a sandbox ID from a URL path segment.
pub fn parse_id(s: &str) -> AppResult<SandboxId> {
    s.parse()
        .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))
}

/// A list request, still unchecked.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    /// Comma-separated states; default: the active ones (pending, starting, running, paused).
    pub state: Option<String>,
    /// Every state (ignored when `state` is given).
    pub all: bool,
    /// Page size: default 100, 1 to 1000.
    pub limit: Option<i64>,
    /// From the previous page's `next_token`.
    pub next_token: Option<String>,
}

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

/// One page of a listing and the token of the next, if any.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub sandboxes: Vec<SandboxRow>,
    pub next_token: Option<String>,
}

const ACTIVE: [SandboxState; 4] = [
    SandboxState::Pending,
    SandboxState::Starting,
    SandboxState::Running,
    SandboxState::Paused,
];

/// The opaque page token: base64url of `v1:<created_at ms>:<id>`.
fn encode_token(c: &PageCursor) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("v1:{}:{}", c.created_at_ms, c.id))
}

fn decode_token(t: &str) -> AppResult<PageCursor> {
    let bad = || AppError::InvalidArgument("next_token is not a token this API gave out".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = raw.splitn(3, ':');
    let (Some("v1"), Some(ms), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    Ok(PageCursor {
        created_at_ms: ms.parse().map_err(|_| bad())?,
        id: id.parse().map_err(|_| bad())?,
    })
}

/// `expires_at_unix_ms` for the host: no deadline of its own.
pub(crate) const HOST_NO_DEADLINE: i64 = 0;

/// `on_timeout` as sent: default destroy.
pub(crate) fn parse_on_timeout(s: Option<&str>) -> AppResult<OnTimeout> {
    match s {
        None => Ok(OnTimeout::Destroy),
        Some(s) => s
            .parse()
            .map_err(|e: hearth_db::UnknownOnTimeout| AppError::InvalidArgument(e.to_string())),
    }
}

pub(crate) fn not_found(id: &SandboxId) -> AppError {
    AppError::NotFound(format!("sandbox '{id}' not found"))
}

impl App {
    /// Create a sandbox (see the module docs); runs to its end even when the
    /// client goes away.
    pub async fn create_sandbox(
        self: &Arc<Self>,
        team: TeamId,
        p: CreateParams,
    ) -> AppResult<SandboxRow> {
        self.detached("create", move |app| async move {
            let started = std::time::Instant::now();
            let r = app.create_op(team, p).await;
            app.metrics
                .observe_op(super::metrics::Op::Create, started, &r);
            r
        })
        .await
    }

    async fn create_op(self: &Arc<Self>, team: TeamId, p: CreateParams) -> AppResult<SandboxRow> {
        let template: TemplateName = p
            .template
            .parse()
            .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))?;
        // What was sent is checked before anything is looked up; the template's
        // defaults are filled in (and checked again) below.
        SandboxShape::validate_wide(
            &self.limits,
            p.vcpus,
            p.memory_mb,
            p.disk_size_mb,
            p.timeout_s,
        )
        .map_err(|e| AppError::InvalidArgument(e.to_string()))?;
        let on_timeout = parse_on_timeout(p.on_timeout.as_deref())?;
        validate::env("env", &p.env)?;
        validate::metadata(&p.metadata)?;
        let Some(tpl) = self.db.get_template(team, &template).await? else {
            return Err(AppError::NotFound(format!(
                "template '{template}' not found"
            )));
        };
        // A template brings its disk size (the smallest disk it fits) and, when it
        // carries memory, the shape it restores into.
        let disk_size_mb = match p.disk_size_mb {
            Some(d) if tpl.disk_size_mb > 0 && d < i64::from(tpl.disk_size_mb) => {
                return Err(AppError::InvalidArgument(format!(
                    "disk_size_mb must be at least {} for template '{template}', got {d}",
                    tpl.disk_size_mb
                )))
            }
            Some(d) => Some(d),
            // A warm template's disk is the size its saved guest knows (another
            // size boots instead of restoring).
            None if tpl.has_memory && tpl.disk_size_mb > 0 => Some(i64::from(tpl.disk_size_mb)),
            // Others get the API's default unless their image is larger (the guest
            // grows the image to its disk at boot): the default shape is the one a
            // built-in template's warm variant and pool serve.
            None if tpl.disk_size_mb > SandboxShape::DEFAULT_DISK_MB => {
                Some(i64::from(tpl.disk_size_mb.max(self.limits.min_disk_mb)))
            }
            None => None,
        };
        let warm = |asked: Option<i64>, of_template: u32| match asked {
            None if tpl.has_memory && of_template > 0 => Some(i64::from(of_template)),
            other => other,
        };
        let shape = SandboxShape::validate_wide(
            &self.limits,
            warm(p.vcpus, tpl.vcpus),
            warm(p.memory_mb, tpl.memory_mb),
            disk_size_mb,
            p.timeout_s,
        )
        .map_err(|e| AppError::InvalidArgument(e.to_string()))?;
        let now = Utc::now();
        let lifetime = Duration::seconds(i64::from(shape.timeout_s));
        // The team's quota first, then a host: a create the quota refuses never
        // holds host capacity, not even for a moment (a burst over quota would
        // otherwise crowd out creates within it). The row waits without a host.
        let row = NewSandbox {
            id: SandboxId::generate(),
            team_id: team,
            template: template.clone(),
            state: SandboxState::Starting,
            vcpus: shape.vcpus,
            memory_mb: shape.memory_mb,
            disk_size_mb: shape.disk_size_mb,
            timeout_s: shape.timeout_s,
            on_timeout,
            env: p.env.clone(),
            metadata: p.metadata,
            host_id: None,
            created_at: now,
            // Provisional: reset to "running since + timeout_s" once it runs.
            expires_at: now + self.create_timeout() + lifetime,
            secure: p.secure.unwrap_or(true),
            auto_resume: p.auto_resume,
        };
        match self
            .db
            .insert_sandbox_within_quota(&row, &self.policy.team_quota)
            .await?
        {
            Admission::Admitted => {}
            Admission::Refused(q) => return Err(AppError::QuotaExceeded(q.to_string())),
        }
        let id = row.id.clone();
        let app = self.clone();
        let location = tpl.location.clone();
        let env = p.env;
        // Out of the request's cancellation scope: the row must follow the placement
        // and the host's answer.
        let outcome = tokio::spawn(audit::keep_caller(async move {
            let need = Need {
                vcpus: shape.vcpus,
                memory_mb: shape.memory_mb,
                disk_size_mb: shape.disk_size_mb,
            };
            let placed = app
                .place(&row.id, team, &template, location.as_ref(), need)
                .await;
            let (placement, host_template) = match placed {
                Ok(p) => p,
                Err(e) => {
                    // Nothing was asked of any host: leave no row behind.
                    app.db.delete_starting_sandbox(&row.id).await?;
                    return Err(e);
                }
            };
            let host_id = placement.host_id().clone();
            let Some(client) = app.hosts.get(&host_id) else {
                app.db.delete_starting_sandbox(&row.id).await?;
                return Err(AppError::Unavailable(format!(
                    "host {host_id} (which holds template '{template}') is not reachable"
                )));
            };
            if !app.db.set_sandbox_host(&row.id, &host_id).await? {
                return Err(AppError::Conflict(format!(
                    "sandbox {} was deleted while it was being placed",
                    row.id
                )));
            }
            let spec = CreateSpec {
                sandbox_id: row.id.clone(),
                team_id: team,
                template: host_template,
                vcpus: shape.vcpus,
                memory_mb: shape.memory_mb,
                disk_size_mb: shape.disk_size_mb,
                // The control plane owns every deadline (see module docs).
                expires_at_unix_ms: HOST_NO_DEADLINE,
                env,
            };
            let r = app.finish_create(&client, spec, lifetime).await;
            if r.is_ok() {
                // Held until the host's next report counts the sandbox itself.
                placement.landed();
                let detail = serde_json::json!({"template": template.as_str()});
                app.audit(team, action::SANDBOX_CREATE, row.id.as_str(), detail)
                    .await;
            }
            r
        }))
        .await
        .map_err(|e| AppError::Internal(format!("create task failed: {e}")))?;
        outcome?;
        self.db
            .get_sandbox(team, &id)
            .await?
            .ok_or_else(|| not_found(&id))
    }

    /// The host for a new sandbox of `template` (see [`super::hosts::placement`]), its
    /// capacity reserved, and the template's name there. A team's snapshot lives on one
    /// host under its host-level name: only that host may take it.
    async fn place(
        &self,
        sandbox: &SandboxId,
        team: TeamId,
        template: &TemplateName,
        location: Option<&TemplateLocation>,
        need: Need,
    ) -> AppResult<(Placement, TemplateName)> {
        let loads = Loads {
            all: self.db.count_active_by_host().await?,
            team: self.db.count_team_active_by_host(team).await?,
        };
        let (only, host_template) = match location {
            Some(loc) => (Some(&loc.host_id), loc.host_name.clone()),
            None => (None, template.clone()),
        };
        let req = PlacementRequest {
            sandbox,
            team,
            template: &host_template,
            need,
            only,
        };
        match self.hosts.pick(&req, &loads) {
            Ok(p) => Ok((p, host_template)),
            Err(e @ NoPlacement::NoCapacity { .. }) => {
                Err(AppError::CapacityExceeded(e.to_string()))
            }
            // Never the snapshot's host-level name: teams do not see it.
            Err(_) if location.is_some() => Err(AppError::Unavailable(format!(
                "the host that holds template '{template}' is not reachable"
            ))),
            Err(e) => Err(AppError::Unavailable(e.to_string())),
        }
    }

    pub(crate) fn create_timeout(&self) -> Duration {
        Duration::from_std(self.policy.create_timeout).unwrap_or(Duration::seconds(240))
    }

    async fn finish_create(
        &self,
        client: &Arc<dyn HostClient>,
        spec: CreateSpec,
        lifetime: Duration,
    ) -> AppResult<()> {
        let id = spec.sandbox_id.clone();
        let span = tracing::info_span!("create", sandbox_id = %id, host = client.url());
        match client.create_sandbox(spec).instrument(span.clone()).await {
            Ok(()) => {
                let _g = span.enter();
                if self
                    .db
                    .mark_sandbox_running(&id, Utc::now() + lifetime)
                    .await?
                {
                    tracing::info!("sandbox running");
                } else {
                    // Someone (a delete, the reconciler) changed it meanwhile: keep theirs.
                    tracing::warn!("sandbox left 'starting' while it booted");
                }
                Ok(())
            }
            Err(e) if refused_by_host(&e) => {
                // Nothing was created: leave no row behind.
                tracing::info!(parent: &span, error = %e, "host refused the sandbox");
                self.db.delete_starting_sandbox(&id).await?;
                Err(match e {
                    HostError::Rpc {
                        code: ErrorCode::ResourceExhausted,
                        message,
                    } => AppError::CapacityExceeded(message),
                    other => AppError::host("creating the sandbox failed")(other),
                })
            }
            Err(e) => {
                tracing::warn!(parent: &span, error = %e, "host failed to create sandbox");
                self.db
                    .update_sandbox_state(
                        &id,
                        &[SandboxState::Starting],
                        SandboxState::Error,
                        Some(&e.to_string()),
                    )
                    .await?;
                // Whatever the host holds of it (disk, slot) is freed now, not at expiry.
                if let Err(d) = client.destroy_sandbox(&id).await {
                    if !d.is_not_found() {
                        tracing::warn!(parent: &span, error = %d, "destroying the failed sandbox failed");
                    }
                }
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

    /// The last `limit` lines of a running sandbox's console (its logs).
    pub async fn sandbox_console(
        &self,
        row: &SandboxRow,
        limit: usize,
    ) -> AppResult<Vec<(i64, String)>> {
        let host = self.host_of(row)?;
        host.console(&row.id, limit)
            .await
            .map_err(|source| AppError::Host {
                context: "reading the console".into(),
                source,
            })
    }

    /// A sample of a running sandbox's CPU, memory and disk use from its guest.
    pub async fn sandbox_metrics(&self, row: &SandboxRow) -> AppResult<SandboxMetrics> {
        let host = self.host_of(row)?;
        host.metrics(&row.id)
            .await
            .map_err(|source| AppError::Host {
                context: "reading the sandbox's metrics".into(),
                source,
            })
    }

    /// One page of `team`'s sandboxes, newest first (see [`ListParams`]).
    pub async fn list_sandboxes(&self, team: TeamId, p: ListParams) -> AppResult<ListPage> {
        let limit = check_range("limit", p.limit, DEFAULT_PAGE, 1, MAX_PAGE)
            .map_err(|e| AppError::InvalidArgument(e.to_string()))?;
        let states: Vec<SandboxState> = match p.state.as_deref() {
            Some(list) => list
                .split(',')
                .map(|s| {
                    s.trim().parse().map_err(|_| {
                        AppError::InvalidArgument(format!(
                            "state must be a comma-separated list of pending, starting, running, paused, stopped, error; got {:?}",
                            s.chars().take(40).collect::<String>()
                        ))
                    })
                })
                .collect::<AppResult<_>>()?,
            None if p.all => Vec::new(),
            None => ACTIVE.to_vec(),
        };
        let after = p.next_token.as_deref().map(decode_token).transpose()?;
        let page = self
            .db
            .list_sandboxes_page(team, &states, limit, after.as_ref())
            .await?;
        Ok(ListPage {
            sandboxes: page.rows,
            next_token: page.next.as_ref().map(encode_token),
        })
    }

    /// Destroy the VM and mark the row `stopped`. Idempotent.
    pub async fn delete_sandbox(self: &Arc<Self>, team: TeamId, id: &SandboxId) -> AppResult<()> {
        let id = id.clone();
        self.detached("delete", move |app| async move {
            let row = app.get_sandbox(team, &id).await?;
            app.destroy_row(&row).await?;
            // Deleting an ended sandbox again (idempotent) is not another act.
            if !matches!(row.state, SandboxState::Stopped | SandboxState::Error) {
                app.audit(team, action::SANDBOX_DELETE, row.id.as_str(), Value::Null)
                    .await;
            }
            Ok(())
        })
        .await
    }

    /// Ask the row's host to destroy the sandbox (whatever its state: a `stopped` or
    /// `error` sandbox may still hold a slot or disk there; the call is idempotent), mark
    /// it stopped unless it is `error`, and end its exec streams.
    pub(crate) async fn destroy_row(&self, row: &SandboxRow) -> AppResult<()> {
        // The reconciler must not take the sandbox its host no longer lists for lost.
        let _op = self.begin_op(&row.id);
        if let Some(host_id) = &row.host_id {
            match self.hosts.get(host_id) {
                Some(client) => match client.destroy_sandbox(&row.id).await {
                    Ok(existed) => {
                        tracing::info!(sandbox_id = %row.id, existed, "sandbox destroyed")
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) if row.state.is_active() => {
                        return Err(AppError::host("destroying the sandbox failed")(e))
                    }
                    Err(e) => {
                        tracing::warn!(sandbox_id = %row.id, error = %e, "host did not destroy a finished sandbox")
                    }
                },
                None if row.state.is_active() => {
                    return Err(AppError::Unavailable(format!(
                        "host {host_id} of sandbox {} is not reachable",
                        row.id
                    )))
                }
                // Finished and its host is away: nothing to do here until it is back.
                None => {
                    tracing::warn!(sandbox_id = %row.id, host = %host_id, "host of a finished sandbox is not reachable; not destroyed there")
                }
            }
        }
        if row.state != SandboxState::Error {
            self.db.mark_sandbox_stopped(&row.id).await?;
        }
        self.end_streams(&row.id);
        Ok(())
    }

    /// The host of a running sandbox and the token that ends this operation's stream
    /// when the sandbox is destroyed. The state is checked again after the token is
    /// taken, so a destroy in between is never missed; only running sandboxes get an
    /// entry (destroy and the reconciler remove it).
    pub(crate) async fn running_stream(
        &self,
        team: TeamId,
        id: &SandboxId,
    ) -> AppResult<(Arc<dyn HostClient>, tokio_util::sync::CancellationToken)> {
        self.running_host(team, id).await?;
        let ended = self.stream_token(id);
        match self.running_host(team, id).await {
            Ok(host) => Ok((host, ended)),
            Err(e) => {
                self.end_streams(id);
                Err(e)
            }
        }
    }

    /// The client of the host that holds `row`.
    pub(crate) fn host_of(&self, row: &SandboxRow) -> AppResult<Arc<dyn HostClient>> {
        let host_id = row
            .host_id
            .as_ref()
            .ok_or_else(|| AppError::Internal(format!("sandbox {} has no host", row.id)))?;
        self.hosts
            .get(host_id)
            .ok_or_else(|| AppError::Unavailable(format!("host {host_id} is not reachable")))
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
            SandboxState::Paused => {
                return Err(AppError::Conflict(
                    "sandbox is paused: resume it first (POST /v1/sandboxes/{id}/resume)".into(),
                ))
            }
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

/// Whether a host's answer to CreateSandbox means it created nothing: it refused the
/// request (out of capacity, or a spec it does not accept).
fn refused_by_host(e: &HostError) -> bool {
    matches!(
        e,
        HostError::Rpc {
            code: ErrorCode::ResourceExhausted | ErrorCode::InvalidArgument | ErrorCode::NotFound,
            ..
        }
    )
}

/// Map a guest-side failure for an operation on `what` (a file, a process).
pub(crate) fn guest_error(context: &str, e: HostError) -> AppError {
    AppError::Host {
        context: context.to_owned(),
        source: e,
    }
}

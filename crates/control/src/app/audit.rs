//! The audit log: who (which API key) did what to which of a team's things.
//!
//! The key behind a request is set once by the API's auth middlewares ([`as_caller`])
//! and read where an operation succeeds ([`App::audit`]), so that every edge (the
//! `/v1` API, E2B's API) records the same entries from the same place: the app
//! method that did the work. Work spawned to outlive its request takes the key with
//! it ([`caller`] before the spawn). Entries are written after the operation
//! succeeded; a failure to write one is logged, never turned into the operation's
//! failure (the sandbox was created; saying otherwise would be a lie).

use std::future::Future;

use hearth_db::AuditEntry;
use hearth_types::{ApiKeyId, TeamId};
use serde_json::Value;

use super::{App, AppError, AppResult};

tokio::task_local! {
    static CALLER: ApiKeyId;
}

/// Run `f` on behalf of the API key `key`.
pub async fn as_caller<F: Future>(key: ApiKeyId, f: F) -> F::Output {
    CALLER.scope(key, f).await
}

/// The API key of the request being served (`None` outside one: the reconciler).
pub fn caller() -> Option<ApiKeyId> {
    CALLER.try_with(Clone::clone).ok()
}

/// What the log records (the `action` column).
pub mod action {
    pub const SANDBOX_CREATE: &str = "sandbox.create";
    pub const SANDBOX_DELETE: &str = "sandbox.delete";
    pub const SANDBOX_PAUSE: &str = "sandbox.pause";
    pub const SANDBOX_RESUME: &str = "sandbox.resume";
    pub const SANDBOX_FORK: &str = "sandbox.fork";
    pub const SANDBOX_SNAPSHOT: &str = "sandbox.snapshot";
    /// Destroyed or paused by hearth at its timeout (no key).
    pub const SANDBOX_TIMEOUT: &str = "sandbox.timeout";
    /// Another change of state hearth made (lost, failed on its host, corrected, stuck
    /// starting): `detail` has `from`, `to` and `reason`.
    pub const SANDBOX_STATE: &str = "sandbox.state";
    pub const TEMPLATE_DELETE: &str = "template.delete";
    pub const KEY_CREATE: &str = "key.create";
    pub const KEY_REVOKE: &str = "key.revoke";
    pub const TEAM_CREATE: &str = "team.create";
    pub const USER_CREATE: &str = "user.create";
    pub const USER_DISABLE: &str = "user.disable";
    pub const USER_LOGIN: &str = "user.login";
    pub const WEBHOOK_CREATE: &str = "webhook.create";
    pub const WEBHOOK_DELETE: &str = "webhook.delete";
}

/// Most entries one page returns.
pub const MAX_AUDIT_PAGE: u32 = 500;
pub const DEFAULT_AUDIT_PAGE: u32 = 100;

/// One page of a team's audit log.
#[derive(Debug, Clone)]
pub struct AuditPageOf {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; `None` on the last page.
    pub next_before: Option<i64>,
}

impl App {
    /// Record that `actor` did `action` to `target` of `team` (`detail` an object;
    /// null is recorded as `{}`).
    pub(crate) async fn audit_as(
        &self,
        actor: Option<&ApiKeyId>,
        team: TeamId,
        action: &str,
        target: &str,
        detail: Value,
    ) {
        let detail = match detail {
            Value::Null => Value::Object(Default::default()),
            other => other,
        };
        if let Err(e) = self
            .db
            .append_audit(team, actor, action, target, &detail)
            .await
        {
            tracing::error!(%team, action, target, error = %e, "writing an audit entry failed");
        }
    }

    /// Record that the current request's key did `action` to `target` of `team`.
    pub(crate) async fn audit(&self, team: TeamId, action: &str, target: &str, detail: Value) {
        self.audit_as(caller().as_ref(), team, action, target, detail)
            .await
    }

    /// A page of `team`'s audit log, newest first: entries before `before` (an entry
    /// ID from an earlier page), and where the next page starts.
    pub async fn list_audit(
        &self,
        team: TeamId,
        before: Option<i64>,
        limit: Option<i64>,
    ) -> AppResult<AuditPageOf> {
        let limit =
            hearth_types::check_range("limit", limit, DEFAULT_AUDIT_PAGE, 1, MAX_AUDIT_PAGE)
                .map_err(|e| AppError::InvalidArgument(e.to_string()))?;
        if let Some(b) = before {
            if b < 1 {
                return Err(AppError::InvalidArgument(format!(
                    "before must be an entry ID (1 or more), got {b}"
                )));
            }
        }
        // One entry more than asked says whether an older page exists.
        let mut entries = self
            .db
            .list_audit(team, before, limit.saturating_add(1))
            .await?;
        let next_before = if entries.len() > limit as usize {
            entries.truncate(limit as usize);
            entries.last().map(|e| e.id)
        } else {
            None
        };
        Ok(AuditPageOf {
            entries,
            next_before,
        })
    }
}

/// `f` with the current request's key, for work spawned to outlive the request.
pub fn keep_caller<F: Future>(f: F) -> impl Future<Output = F::Output> {
    let key = caller();
    async move {
        match key {
            Some(k) => CALLER.scope(k, f).await,
            None => f.await,
        }
    }
}

/// How often an open event stream looks for new entries.
pub const EVENTS_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// Entries one look reads at most (more are read at the next, without waiting).
const EVENTS_BATCH: u32 = 100;

/// An open `GET /v1/events` stream: the team's audit entries after `last`, as they
/// are written. Read from the database, so every control plane on it sees what any
/// other wrote. Holds one of the team's event-stream slots until dropped.
pub struct EventStream {
    app: std::sync::Arc<App>,
    team: TeamId,
    last: i64,
    buffered: std::collections::VecDeque<AuditEntry>,
    _permit: super::concurrency::Permit,
}

impl EventStream {
    /// The next entry; waits for one. `None` when the database fails (logged): the
    /// client reconnects with the last ID it saw and loses nothing.
    pub async fn next(&mut self) -> Option<AuditEntry> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                self.last = e.id;
                return Some(e);
            }
            match self
                .app
                .db
                .list_audit_after(self.team, self.last, EVENTS_BATCH)
                .await
            {
                Ok(v) if v.is_empty() => tokio::time::sleep(EVENTS_POLL).await,
                Ok(v) => self.buffered.extend(v),
                Err(e) => {
                    tracing::warn!(team = %self.team, error = %e, "event stream ends: reading the audit log failed");
                    return None;
                }
            }
        }
    }
}

impl App {
    /// Open the team's event stream after entry `after` (a `Last-Event-ID`), or from
    /// now when `None`.
    pub async fn open_events(
        self: &std::sync::Arc<Self>,
        team: TeamId,
        after: Option<i64>,
    ) -> AppResult<EventStream> {
        if let Some(a) = after {
            if a < 0 {
                return Err(AppError::InvalidArgument(format!(
                    "after must be an event ID (0 or more), got {a}"
                )));
            }
        }
        let permit = self.permit(team, super::concurrency::Kind::Events)?;
        let last = match after {
            Some(a) => a,
            None => self.db.latest_audit_id().await?,
        };
        Ok(EventStream {
            app: self.clone(),
            team,
            last,
            buffered: Default::default(),
            _permit: permit,
        })
    }
}

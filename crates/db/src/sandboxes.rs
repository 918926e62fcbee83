//! Sandbox rows. Every read a team makes is scoped by its team ID in SQL.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use hearth_types::{HostId, SandboxId, TeamId};
use sqlx::Row;

use crate::keys::{ms_to_time, parse_team};
use crate::{flag, now_ms, Db, DbError, NewSandbox, Result, SandboxRow, SandboxState};

/// States a sandbox row may hold (the agent's transient ones never reach the database).
pub const STORED: [SandboxState; 6] = [
    SandboxState::Pending,
    SandboxState::Starting,
    SandboxState::Running,
    SandboxState::Paused,
    SandboxState::Stopped,
    SandboxState::Error,
];

/// Where a page of a listing ends: the next page starts after this row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at_ms: i64,
    pub id: SandboxId,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPage {
    pub rows: Vec<SandboxRow>,
    pub next: Option<PageCursor>,
}

/// The columns of a row, in the order `INSERT` binds them.
const INSERT_COLUMNS: &str = "id, team_id, template, state, vcpus, memory_mb, disk_size_mb, timeout_s, \
    env_json, metadata_json, host_id, created_at, expires_at, error, updated_at, on_timeout, secure, auto_resume";
/// The same columns as read back (booleans through `CAST`, see the crate docs).
const COLUMNS: &str = "id, team_id, template, state, vcpus, memory_mb, disk_size_mb, timeout_s, \
    env_json, metadata_json, host_id, created_at, expires_at, error, updated_at, on_timeout, \
    CAST(secure AS INTEGER) AS secure, CAST(auto_resume AS INTEGER) AS auto_resume";

impl Db {
    /// Insert a row without any admission check (tests, imports). Creates go through
    /// [`Db::insert_sandbox_within_quota`].
    pub async fn insert_sandbox(&self, s: &NewSandbox) -> Result<()> {
        insert_row(&self.pool, s).await
    }

    /// The sandbox `id` if it belongs to `team`. Another team's sandbox is `None`,
    /// exactly like a missing one.
    pub async fn get_sandbox(&self, team: TeamId, id: &SandboxId) -> Result<Option<SandboxRow>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE id = $1 AND team_id = $2"
        ))
        .bind(id.as_str())
        .bind(team.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(sandbox_from_row).transpose()
    }

    /// A sandbox by ID regardless of team (background tasks only, never a request path).
    pub async fn get_sandbox_unscoped(&self, id: &SandboxId) -> Result<Option<SandboxRow>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(sandbox_from_row).transpose()
    }

    /// All sandboxes of `team`, newest first.
    pub async fn list_sandboxes(&self, team: TeamId) -> Result<Vec<SandboxRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE team_id = $1 ORDER BY created_at DESC, id"
        ))
        .bind(team.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// One page of `team`'s sandboxes in one of `states` (all states when empty),
    /// newest first, at most `limit`, starting after `after`. `next` is set when more
    /// rows follow.
    pub async fn list_sandboxes_page(
        &self,
        team: TeamId,
        states: &[SandboxState],
        limit: u32,
        after: Option<&PageCursor>,
    ) -> Result<SandboxPage> {
        let mut sql = format!("SELECT {COLUMNS} FROM sandboxes WHERE team_id = $1");
        let mut n = 1;
        if !states.is_empty() {
            let ph: Vec<String> = (0..states.len())
                .map(|i| format!("${}", n + 1 + i))
                .collect();
            n += states.len();
            sql.push_str(&format!(" AND state IN ({})", ph.join(", ")));
        }
        if after.is_some() {
            sql.push_str(&format!(
                " AND (created_at < ${a} OR (created_at = ${a} AND id > ${b}))",
                a = n + 1,
                b = n + 2
            ));
            n += 2;
        }
        sql.push_str(&format!(" ORDER BY created_at DESC, id LIMIT ${}", n + 1));
        let mut q = sqlx::query(&sql).bind(team.to_string());
        for s in states {
            q = q.bind(s.as_str());
        }
        if let Some(c) = after {
            q = q.bind(c.created_at_ms).bind(c.id.as_str().to_owned());
        }
        let rows = q.bind(i64::from(limit) + 1).fetch_all(&self.pool).await?;
        let mut rows: Vec<SandboxRow> = rows.iter().map(sandbox_from_row).collect::<Result<_>>()?;
        let next = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(|r| PageCursor {
                created_at_ms: r.created_at.timestamp_millis(),
                id: r.id.clone(),
            })
        } else {
            None
        };
        Ok(SandboxPage { rows, next })
    }

    /// Delete rows that are `stopped` or `error` and have not changed after `before`
    /// (retention). Returns how many went.
    pub async fn prune_finished_sandboxes(&self, before: DateTime<Utc>) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM sandboxes WHERE state IN ('stopped', 'error') AND updated_at <= $1",
        )
        .bind(before.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// `starting` -> `running`, with the lifetime counted from now: `expires_at` is
    /// set to `expires_at` here. Returns false when the row was no longer `starting`.
    pub async fn mark_sandbox_running(
        &self,
        id: &SandboxId,
        expires_at: DateTime<Utc>,
    ) -> Result<bool> {
        self.transition_with_deadline(
            id,
            SandboxState::Starting,
            SandboxState::Running,
            expires_at,
            None,
        )
        .await
    }

    /// `from` -> `to` (a transition the state table allows) with a new deadline and,
    /// with `timeout_s`, a new lifetime. Compare-and-set: false when the row was not
    /// in `from`.
    pub async fn transition_with_deadline(
        &self,
        id: &SandboxId,
        from: SandboxState,
        to: SandboxState,
        expires_at: DateTime<Utc>,
        timeout_s: Option<u32>,
    ) -> Result<bool> {
        from.transition(to)?;
        let r = sqlx::query(
            "UPDATE sandboxes SET state = $1, error = NULL, expires_at = $2, \
             timeout_s = COALESCE($3, timeout_s), updated_at = $4 WHERE id = $5 AND state = $6",
        )
        .bind(to.as_str())
        .bind(expires_at.timestamp_millis())
        .bind(timeout_s.map(i64::from))
        .bind(now_ms())
        .bind(id.as_str())
        .bind(from.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// One state change of sandbox `id`: `from` -> `to`, which the state table must
    /// allow, recording `error` (cleared when `None`). Compare-and-set on `from`, so of
    /// two concurrent writers one wins and the other gets false.
    pub async fn transition_sandbox(
        &self,
        id: &SandboxId,
        from: SandboxState,
        to: SandboxState,
        error: Option<&str>,
    ) -> Result<bool> {
        self.update_sandbox_state(id, &[from], to, error).await
    }

    /// [`Db::transition_sandbox`] only if the row has not changed since it was read
    /// (`seen` is the `updated_at` the caller read): a background task that decided
    /// from an older read must not undo a change made since (a pause and a resume
    /// in between leave the same state, not the same row).
    pub async fn transition_sandbox_unchanged(
        &self,
        id: &SandboxId,
        from: SandboxState,
        seen: DateTime<Utc>,
        to: SandboxState,
        error: Option<&str>,
    ) -> Result<bool> {
        from.transition(to)?;
        if !STORED.contains(&to) {
            return Err(DbError::NotStored { state: to });
        }
        let r = sqlx::query(
            "UPDATE sandboxes SET state = $1, error = $2, updated_at = $3 \
             WHERE id = $4 AND state = $5 AND updated_at = $6",
        )
        .bind(to.as_str())
        .bind(error)
        .bind(now_ms())
        .bind(id.as_str())
        .bind(from.as_str())
        .bind(seen.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// New deadline (and lifetime) of a `running` sandbox of `team`. False when it is
    /// not (or no longer) running.
    pub async fn set_sandbox_deadline(
        &self,
        team: TeamId,
        id: &SandboxId,
        expires_at: DateTime<Utc>,
        timeout_s: u32,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE sandboxes SET expires_at = $1, timeout_s = $2, updated_at = $3 \
             WHERE id = $4 AND team_id = $5 AND state = 'running'",
        )
        .bind(expires_at.timestamp_millis())
        .bind(i64::from(timeout_s))
        .bind(now_ms())
        .bind(id.as_str())
        .bind(team.to_string())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Active sandboxes of `team` made from its template `name`.
    pub async fn count_active_using_template(
        &self,
        team: TeamId,
        name: &hearth_types::TemplateName,
    ) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sandboxes WHERE team_id = $1 AND template = $2 \
             AND state IN ('pending', 'starting', 'running', 'paused')",
        )
        .bind(team.to_string())
        .bind(name.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Sandboxes of every team by state (states without any left out).
    pub async fn count_sandboxes_by_state(&self) -> Result<HashMap<SandboxState, u64>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM sandboxes GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let mut out = HashMap::new();
        for r in rows {
            let state: SandboxState = r.try_get::<&str, _>("state")?.parse().map_err(
                |e: hearth_types::UnknownState| DbError::Corrupt {
                    column: "sandboxes.state",
                    source: Box::new(e),
                },
            )?;
            out.insert(state, u64::try_from(r.try_get::<i64, _>("n")?).unwrap_or(0));
        }
        Ok(out)
    }

    /// Active sandboxes of every team made from the platform template `name`.
    pub async fn count_active_using_platform_template(
        &self,
        name: &hearth_types::TemplateName,
    ) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sandboxes s WHERE s.template = $1 \
             AND s.state IN ('pending', 'starting', 'running', 'paused') \
             AND NOT EXISTS (SELECT 1 FROM templates t WHERE t.team_id = s.team_id AND t.name = $1)",
        )
        .bind(name.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Record the host a `starting` sandbox was placed on: its row is admitted by the
    /// team's quota first, without a host, and placed after. False when the row is no
    /// longer `starting` (a delete came first) or has a host already.
    pub async fn set_sandbox_host(&self, id: &SandboxId, host: &HostId) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE sandboxes SET host_id = $1 WHERE id = $2 AND state = 'starting' \
             AND host_id IS NULL",
        )
        .bind(host.as_str())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Delete the row of sandbox `id` (any team) if it is still `starting`: a create
    /// that was refused after its row was reserved leaves nothing behind (a row that a
    /// delete has meanwhile marked `stopped` stays).
    pub async fn delete_starting_sandbox(&self, id: &SandboxId) -> Result<bool> {
        let r = sqlx::query("DELETE FROM sandboxes WHERE id = $1 AND state = 'starting'")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// [`Db::delete_starting_sandbox`] for several rows (a failed fork); returns how
    /// many went.
    pub async fn delete_starting_sandboxes(&self, ids: &[SandboxId]) -> Result<u64> {
        let mut n = 0;
        for id in ids {
            n += u64::from(self.delete_starting_sandbox(id).await?);
        }
        Ok(n)
    }

    /// Every sandbox in one of `states`, any team (reconciler, scheduler).
    pub async fn list_sandboxes_in_states(
        &self,
        states: &[SandboxState],
    ) -> Result<Vec<SandboxRow>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=states.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE state IN ({}) ORDER BY created_at, id",
            placeholders.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for s in states {
            q = q.bind(s.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Every `running` sandbox of every team (the reconciler's view of intent).
    pub async fn list_running_sandboxes(&self) -> Result<Vec<SandboxRow>> {
        self.list_sandboxes_in_states(&[SandboxState::Running])
            .await
    }

    /// Active sandboxes (pending, starting, running, paused) per host: the scheduler's load.
    pub async fn count_active_by_host(&self) -> Result<HashMap<HostId, u64>> {
        self.active_by_host(None).await
    }

    /// `team`'s active sandboxes per host: the scheduler spreads a team over hosts.
    pub async fn count_team_active_by_host(&self, team: TeamId) -> Result<HashMap<HostId, u64>> {
        self.active_by_host(Some(team)).await
    }

    async fn active_by_host(&self, team: Option<TeamId>) -> Result<HashMap<HostId, u64>> {
        const ACTIVE: &str = "host_id IS NOT NULL \
             AND state IN ('pending', 'starting', 'running', 'paused')";
        let rows = match team {
            None => {
                sqlx::query(&format!(
                    "SELECT host_id, COUNT(*) AS n FROM sandboxes WHERE {ACTIVE} GROUP BY host_id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
            Some(team) => {
                sqlx::query(&format!(
                    "SELECT host_id, COUNT(*) AS n FROM sandboxes \
                     WHERE team_id = $1 AND {ACTIVE} GROUP BY host_id"
                ))
                .bind(team.to_string())
                .fetch_all(&self.pool)
                .await?
            }
        };
        let mut out = HashMap::new();
        for r in &rows {
            let host: HostId = r
                .try_get::<&str, _>("host_id")?
                .parse()
                .map_err(DbError::corrupt("sandboxes.host_id"))?;
            out.insert(host, r.try_get::<i64, _>("n")?.max(0) as u64);
        }
        Ok(out)
    }

    /// Move sandbox `id` to `to`, recording `error` (cleared when `None`), when its
    /// current state is one of `from` from which the state table allows `to` (a
    /// compare-and-set guard; states the table forbids are left out, and asking only
    /// for forbidden ones is an error). Returns whether a row changed.
    pub async fn update_sandbox_state(
        &self,
        id: &SandboxId,
        from: &[SandboxState],
        to: SandboxState,
        error: Option<&str>,
    ) -> Result<bool> {
        let allowed: Vec<SandboxState> = from
            .iter()
            .copied()
            .filter(|f| STORED.contains(f) && f.can_become(to))
            .collect();
        if allowed.is_empty() {
            let from = from.first().copied().unwrap_or(to);
            return Err(from
                .transition(to)
                .err()
                .map_or(DbError::NotStored { state: from }, DbError::BadTransition));
        }
        if !STORED.contains(&to) {
            return Err(DbError::NotStored { state: to });
        }
        let mut sql = String::from(
            "UPDATE sandboxes SET state = $1, error = $2, updated_at = $3 WHERE id = $4",
        );
        let ph: Vec<String> = (0..allowed.len()).map(|i| format!("${}", i + 5)).collect();
        sql.push_str(&format!(" AND state IN ({})", ph.join(", ")));
        let mut q = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(error)
            .bind(now_ms())
            .bind(id.as_str());
        for s in &allowed {
            q = q.bind(s.as_str());
        }
        Ok(q.execute(&self.pool).await?.rows_affected() > 0)
    }

    /// Mark a sandbox `stopped` unless it already is stopped or in error.
    pub async fn mark_sandbox_stopped(&self, id: &SandboxId) -> Result<bool> {
        self.update_sandbox_state(
            id,
            &[
                SandboxState::Pending,
                SandboxState::Starting,
                SandboxState::Running,
                SandboxState::Paused,
            ],
            SandboxState::Stopped,
            None,
        )
        .await
    }

    /// Delete the row of a sandbox of `team`. Returns whether it existed.
    pub async fn delete_sandbox(&self, team: TeamId, id: &SandboxId) -> Result<bool> {
        let r = sqlx::query("DELETE FROM sandboxes WHERE id = $1 AND team_id = $2")
            .bind(id.as_str())
            .bind(team.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }
}

/// Insert the row of `s` through `exec` (the pool or an open transaction).
pub(crate) async fn insert_row<'e, E>(exec: E, s: &NewSandbox) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let env = serde_json::to_string(&s.env).map_err(|e| DbError::Corrupt {
        column: "sandboxes.env_json",
        source: Box::new(e),
    })?;
    let metadata = serde_json::to_string(&s.metadata).map_err(|e| DbError::Corrupt {
        column: "sandboxes.metadata_json",
        source: Box::new(e),
    })?;
    let now = now_ms();
    sqlx::query(&format!(
        "INSERT INTO sandboxes ({INSERT_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, NULL, $14, $15, $16, $17)"
    ))
    .bind(s.id.as_str())
    .bind(s.team_id.to_string())
    .bind(s.template.as_str())
    .bind(s.state.as_str())
    .bind(i64::from(s.vcpus))
    .bind(i64::from(s.memory_mb))
    .bind(i64::from(s.disk_size_mb))
    .bind(i64::from(s.timeout_s))
    .bind(env)
    .bind(metadata)
    .bind(s.host_id.as_ref().map(|h| h.as_str().to_owned()))
    .bind(s.created_at.timestamp_millis())
    .bind(s.expires_at.timestamp_millis())
    .bind(now)
    .bind(s.on_timeout.as_str())
    .bind(s.secure)
    .bind(s.auto_resume)
    .execute(exec)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => DbError::AlreadyExists {
            what: format!("sandbox {}", s.id),
        },
        _ => DbError::Query(e),
    })?;
    Ok(())
}

fn u32_col(r: &sqlx::any::AnyRow, column: &'static str) -> Result<u32> {
    let v: i64 = r.try_get(column)?;
    u32::try_from(v).map_err(|e| DbError::Corrupt {
        column,
        source: Box::new(e),
    })
}

fn json_map(r: &sqlx::any::AnyRow, column: &'static str) -> Result<BTreeMap<String, String>> {
    let s: &str = r.try_get(column)?;
    serde_json::from_str(s).map_err(|e| DbError::Corrupt {
        column,
        source: Box::new(e),
    })
}

fn time_col(r: &sqlx::any::AnyRow, column: &'static str) -> Result<DateTime<Utc>> {
    Ok(ms_to_time(r.try_get(column)?))
}

fn sandbox_from_row(r: &sqlx::any::AnyRow) -> Result<SandboxRow> {
    let state: &str = r.try_get("state")?;
    Ok(SandboxRow {
        id: r
            .try_get::<&str, _>("id")?
            .parse()
            .map_err(DbError::corrupt("sandboxes.id"))?,
        team_id: parse_team("sandboxes.team_id", r.try_get("team_id")?)?,
        template: r
            .try_get::<&str, _>("template")?
            .parse()
            .map_err(DbError::corrupt("sandboxes.template"))?,
        state: state.parse().map_err(|e| DbError::Corrupt {
            column: "sandboxes.state",
            source: Box::new(e),
        })?,
        vcpus: u32_col(r, "vcpus")?,
        memory_mb: u32_col(r, "memory_mb")?,
        disk_size_mb: u32_col(r, "disk_size_mb")?,
        timeout_s: u32_col(r, "timeout_s")?,
        env: json_map(r, "env_json")?,
        metadata: json_map(r, "metadata_json")?,
        host_id: r
            .try_get::<Option<&str>, _>("host_id")?
            .map(str::parse)
            .transpose()
            .map_err(DbError::corrupt("sandboxes.host_id"))?,
        created_at: time_col(r, "created_at")?,
        expires_at: time_col(r, "expires_at")?,
        error: r.try_get("error")?,
        updated_at: time_col(r, "updated_at")?,
        on_timeout: r
            .try_get::<&str, _>("on_timeout")?
            .parse()
            .map_err(|e| DbError::Corrupt {
                column: "sandboxes.on_timeout",
                source: Box::new(e),
            })?,
        secure: flag(r, "secure")?,
        auto_resume: flag(r, "auto_resume")?,
    })
}

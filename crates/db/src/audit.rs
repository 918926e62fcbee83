//! The audit log: append and read, never change.

use hearth_types::{ApiKeyId, TeamId};
use sqlx::Row;

use crate::keys::{ms_to_time, parse_team};
use crate::{now_ms, AuditEntry, Db, DbError, Result, AUDIT_LOCK};

impl Db {
    /// Append one entry; returns its ID.
    pub async fn append_audit(
        &self,
        team: TeamId,
        actor: Option<&ApiKeyId>,
        action: &str,
        target: &str,
        detail: &serde_json::Value,
    ) -> Result<i64> {
        // Readers of the event stream page by ID (`id > last seen`), so IDs must become
        // visible in the order they were given. SQLite has one writer at a time; on
        // PostgreSQL a sequence value can commit after a larger one, so appends take a
        // lock of their own around the insert and its commit.
        let mut tx = self.begin_locked(AUDIT_LOCK).await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit_log (at, team_id, actor_key_id, action, target, detail_json) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(now_ms())
        .bind(team.to_string())
        .bind(actor.map(|a| a.as_str().to_owned()))
        .bind(action)
        .bind(target)
        .bind(detail.to_string())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Up to `limit` of `team`'s entries older than entry `before` (all when `None`),
    /// newest first.
    pub async fn list_audit(
        &self,
        team: TeamId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, team_id, actor_key_id, action, target, detail_json FROM audit_log \
             WHERE team_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(team.to_string())
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Up to `limit` of `team`'s entries newer than entry `after`, oldest first (the
    /// event stream's read).
    pub async fn list_audit_after(
        &self,
        team: TeamId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, team_id, actor_key_id, action, target, detail_json FROM audit_log \
             WHERE team_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(team.to_string())
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// The newest entry ID of any team (0 when the log is empty).
    pub async fn latest_audit_id(&self) -> Result<i64> {
        let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM audit_log")
            .fetch_one(&self.pool)
            .await?;
        Ok(id.unwrap_or(0))
    }
}

fn entry_from_row(r: &sqlx::any::AnyRow) -> Result<AuditEntry> {
    let detail: String = r.try_get("detail_json")?;
    Ok(AuditEntry {
        id: r.try_get("id")?,
        at: ms_to_time(r.try_get("at")?),
        team_id: parse_team("audit_log.team_id", r.try_get("team_id")?)?,
        actor_key_id: r
            .try_get::<Option<&str>, _>("actor_key_id")?
            .map(str::parse)
            .transpose()
            .map_err(DbError::corrupt("audit_log.actor_key_id"))?,
        action: r.try_get("action")?,
        target: r.try_get("target")?,
        detail: serde_json::from_str(&detail)
            .ok()
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::Value::Object(Default::default())),
    })
}

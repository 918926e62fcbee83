//! A team's webhooks: where to POST its audit entries, and how far delivery has got.

use chrono::{DateTime, Utc};
use hearth_types::{TeamId, WebhookId};
use rand::distributions::Alphanumeric;
use rand::Rng;
use sqlx::Row;

use crate::keys::{ms_to_time, parse_team};
use crate::{now_ms, Db, DbError, Result};

/// A webhook as its team sees it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: WebhookId,
    pub team_id: TeamId,
    pub url: String,
    /// Action patterns: `*`, `sandbox.*`, or an exact action such as `sandbox.create`.
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// The last audit entry delivered (or skipped as not matching).
    pub cursor: i64,
    pub failures: u32,
    pub last_error: Option<String>,
    pub last_delivery_at: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
}

impl Webhook {
    /// Whether an entry with `action` goes to this webhook.
    pub fn wants(&self, action: &str) -> bool {
        self.events.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => action.starts_with(prefix),
            None => p == action,
        })
    }
}

const COLUMNS: &str = "id, team_id, url, events, created_at, cursor_id, failures, last_error, \
    last_delivery_at, disabled_at";

fn from_row(r: &sqlx::any::AnyRow) -> Result<Webhook> {
    let events: String = r.try_get("events")?;
    Ok(Webhook {
        id: r
            .try_get::<&str, _>("id")?
            .parse()
            .map_err(DbError::corrupt("webhooks.id"))?,
        team_id: parse_team("webhooks.team_id", r.try_get("team_id")?)?,
        url: r.try_get("url")?,
        events: events.split(',').map(str::to_owned).collect(),
        created_at: ms_to_time(r.try_get("created_at")?),
        cursor: r.try_get("cursor_id")?,
        failures: u32::try_from(r.try_get::<i64, _>("failures")?).unwrap_or(u32::MAX),
        last_error: r.try_get("last_error")?,
        last_delivery_at: r
            .try_get::<Option<i64>, _>("last_delivery_at")?
            .map(ms_to_time),
        disabled_at: r.try_get::<Option<i64>, _>("disabled_at")?.map(ms_to_time),
    })
}

impl Db {
    /// Add a webhook of `team` that gets entries from now on; returns it and its
    /// signing secret (shown once).
    pub async fn create_webhook(
        &self,
        team: TeamId,
        url: &str,
        events: &[String],
    ) -> Result<(Webhook, String)> {
        let id = WebhookId::generate();
        let secret: String = format!(
            "whsec_{}",
            rand::thread_rng()
                .sample_iter(&Alphanumeric)
                .take(40)
                .map(char::from)
                .collect::<String>()
        );
        let now = now_ms();
        let cursor = self.latest_audit_id().await?;
        sqlx::query(
            "INSERT INTO webhooks (id, team_id, url, secret, events, created_at, cursor_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.as_str())
        .bind(team.to_string())
        .bind(url)
        .bind(&secret)
        .bind(events.join(","))
        .bind(now)
        .bind(cursor)
        .execute(&self.pool)
        .await?;
        let hook = self
            .get_webhook(team, &id)
            .await?
            .ok_or_else(|| DbError::AlreadyExists {
                what: format!("webhook {id} vanished"),
            })?;
        Ok((hook, secret))
    }

    /// `team`'s webhooks, oldest first.
    pub async fn list_webhooks(&self, team: TeamId) -> Result<Vec<Webhook>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM webhooks WHERE team_id = $1 ORDER BY created_at, id"
        ))
        .bind(team.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Webhook `id` of `team`.
    pub async fn get_webhook(&self, team: TeamId, id: &WebhookId) -> Result<Option<Webhook>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM webhooks WHERE id = $1 AND team_id = $2"
        ))
        .bind(id.as_str())
        .bind(team.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Remove webhook `id` of `team`; whether it existed.
    pub async fn delete_webhook(&self, team: TeamId, id: &WebhookId) -> Result<bool> {
        let r = sqlx::query("DELETE FROM webhooks WHERE id = $1 AND team_id = $2")
            .bind(id.as_str())
            .bind(team.to_string())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Every webhook still delivering, with its secret (the delivery worker's read).
    pub async fn active_webhooks(&self) -> Result<Vec<(Webhook, String)>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS}, secret FROM webhooks WHERE disabled_at IS NULL ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((from_row(r)?, r.try_get::<String, _>("secret")?)))
            .collect()
    }

    /// Delivery of everything up to entry `cursor` succeeded (or was not wanted).
    pub async fn webhook_delivered(&self, id: &WebhookId, cursor: i64, sent: bool) -> Result<()> {
        sqlx::query(
            "UPDATE webhooks SET cursor_id = $1, failures = 0, last_error = NULL, \
             last_delivery_at = CASE WHEN $2 = 1 THEN $3 ELSE last_delivery_at END WHERE id = $4",
        )
        .bind(cursor)
        .bind(i64::from(sent))
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A delivery failed with `error`; after `disable_after` failures in a row the
    /// webhook is disabled. Returns the failures so far.
    pub async fn webhook_failed(
        &self,
        id: &WebhookId,
        error: &str,
        disable_after: u32,
    ) -> Result<u32> {
        let n: i64 = sqlx::query_scalar(
            "UPDATE webhooks SET failures = failures + 1, last_error = $1, \
             disabled_at = CASE WHEN failures + 1 >= $2 THEN $3 ELSE disabled_at END \
             WHERE id = $4 RETURNING failures",
        )
        .bind(error)
        .bind(i64::from(disable_after))
        .bind(now_ms())
        .bind(id.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

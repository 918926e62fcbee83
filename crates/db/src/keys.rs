//! Teams and API keys. Only the SHA-256 of a key's secret is stored.

use chrono::{DateTime, Utc};
use hearth_types::{ApiKeyId, TeamId, UserId};
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::{flag, now_ms, ApiKey, Db, DbError, NewApiKey, Principal, Result, Team};

/// Prefix of every API key secret.
pub const KEY_PREFIX: &str = "hk_";
const KEY_RANDOM_LEN: usize = 32;
/// Characters of the random part shown (after [`KEY_PREFIX`]) to tell keys apart.
pub const VISIBLE_PREFIX_LEN: usize = 8;
/// A key's `last_used_at` is exact to this many milliseconds.
pub const LAST_USED_GRANULARITY_MS: i64 = 30_000;

const KEY_COLUMNS: &str =
    "id, team_id, name, prefix, CAST(is_admin AS INTEGER) AS is_admin, created_at, last_used_at, expires_at, revoked_at, created_by";

fn opt_time(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.map(ms_to_time)
}

fn team_from_row(r: &sqlx::any::AnyRow) -> Result<Team> {
    Ok(Team {
        id: parse_team("teams.id", r.try_get("id")?)?,
        name: r.try_get("name")?,
        created_at: ms_to_time(r.try_get("created_at")?),
    })
}

fn key_from_row(r: &sqlx::any::AnyRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r
            .try_get::<&str, _>("id")?
            .parse()
            .map_err(DbError::corrupt("api_keys.id"))?,
        team_id: parse_team("api_keys.team_id", r.try_get("team_id")?)?,
        name: r.try_get("name")?,
        prefix: r.try_get("prefix")?,
        is_admin: flag(r, "is_admin")?,
        created_at: ms_to_time(r.try_get("created_at")?),
        last_used_at: opt_time(r.try_get("last_used_at")?),
        expires_at: opt_time(r.try_get("expires_at")?),
        revoked_at: opt_time(r.try_get("revoked_at")?),
        created_by: r
            .try_get::<Option<&str>, _>("created_by")?
            .map(str::parse)
            .transpose()
            .map_err(DbError::corrupt("api_keys.created_by"))?,
    })
}

fn hash_secret(plaintext: &str) -> String {
    hex::encode(Sha256::digest(plaintext.as_bytes()))
}

pub(crate) fn ms_to_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

pub(crate) fn parse_team(column: &'static str, s: &str) -> Result<TeamId> {
    s.parse().map_err(DbError::corrupt(column))
}

impl Db {
    /// Create a team with a fresh UUID.
    pub async fn create_team(&self, name: &str) -> Result<Team> {
        let id = TeamId::generate();
        let now = now_ms();
        sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id.to_string())
            .bind(name)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.is_unique_violation() => DbError::AlreadyExists {
                    what: format!("team '{name}'"),
                },
                _ => DbError::Query(e),
            })?;
        Ok(Team {
            id,
            name: name.to_owned(),
            created_at: ms_to_time(now),
        })
    }

    /// Teams other than the platform team.
    pub async fn list_teams(&self) -> Result<Vec<Team>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at FROM teams WHERE id <> $1 ORDER BY created_at, id",
        )
        .bind(TeamId::PLATFORM.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(team_from_row).collect()
    }

    /// The team `id` (the platform team too), if it exists.
    pub async fn get_team(&self, id: TeamId) -> Result<Option<Team>> {
        let row = sqlx::query("SELECT id, name, created_at FROM teams WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(team_from_row).transpose()
    }

    /// The team named `name` (names are unique), if it exists.
    pub async fn get_team_by_name(&self, name: &str) -> Result<Option<Team>> {
        let row = sqlx::query("SELECT id, name, created_at FROM teams WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(team_from_row).transpose()
    }

    /// Create an API key. Returns it and its secret, which is shown to the caller once
    /// and never stored (only its SHA-256 is).
    pub async fn create_api_key(&self, k: &NewApiKey) -> Result<(ApiKey, String)> {
        self.create_key_of_kind(k, "api", None).await
    }

    /// [`Db::create_api_key`] of `kind` (`api`, or `session` for `user`'s sign-in).
    pub(crate) async fn create_key_of_kind(
        &self,
        k: &NewApiKey,
        kind: &str,
        user: Option<&UserId>,
    ) -> Result<(ApiKey, String)> {
        let id = ApiKeyId::generate();
        let random: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(KEY_RANDOM_LEN)
            .map(char::from)
            .collect();
        let plaintext = format!("{KEY_PREFIX}{random}");
        let prefix = format!("{KEY_PREFIX}{}", &random[..VISIBLE_PREFIX_LEN]);
        let now = now_ms();
        sqlx::query(
            "INSERT INTO api_keys (id, team_id, name, secret_sha256, is_admin, created_at, \
             prefix, expires_at, created_by, kind, user_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(id.as_str())
        .bind(k.team.to_string())
        .bind(&k.name)
        .bind(hash_secret(&plaintext))
        .bind(k.is_admin)
        .bind(now)
        .bind(&prefix)
        .bind(k.expires_at.map(|t| t.timestamp_millis()))
        .bind(k.created_by.as_ref().map(|c| c.as_str().to_owned()))
        .bind(kind)
        .bind(user.map(|u| u.as_str().to_owned()))
        .execute(&self.pool)
        .await?;
        let key = ApiKey {
            id,
            team_id: k.team,
            name: k.name.clone(),
            prefix: Some(prefix),
            is_admin: k.is_admin,
            created_at: ms_to_time(now),
            last_used_at: None,
            expires_at: k.expires_at,
            revoked_at: None,
            created_by: k.created_by.clone(),
        };
        Ok((key, plaintext))
    }

    /// `team`'s API keys, revoked and expired ones too, oldest first (not users'
    /// sign-in sessions).
    pub async fn list_api_keys(&self, team: TeamId) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE team_id = $1 AND kind = 'api' \
             ORDER BY created_at, id"
        ))
        .bind(team.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    /// The API key `id` (any team), if it exists.
    pub async fn get_api_key(&self, id: &ApiKeyId) -> Result<Option<ApiKey>> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// Revoke the key `id`: from now on it authenticates no request. Returns whether
    /// this call revoked it (false: unknown, or revoked before).
    pub async fn revoke_api_key(&self, id: &ApiKeyId) -> Result<bool> {
        let r =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms())
                .bind(id.as_str())
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Admin keys that still authenticate (neither revoked nor expired), all teams.
    pub async fn count_active_admin_keys(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE is_admin AND kind = 'api' AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $1)",
        )
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    /// The principal an API key secret speaks for, or `None` for an unknown, revoked
    /// or expired key. Records the time of use, to [`LAST_USED_GRANULARITY_MS`].
    pub async fn authenticate(&self, plaintext: &str) -> Result<Option<Principal>> {
        // Keys are looked up by hash: no secret ever reaches a comparison.
        let hash = hash_secret(plaintext);
        let now = now_ms();
        let Some(row) = sqlx::query(
            "SELECT id, team_id, CAST(is_admin AS INTEGER) AS is_admin, last_used_at FROM api_keys \
             WHERE secret_sha256 = $1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(&hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let key_id: ApiKeyId = row
            .try_get::<&str, _>("id")?
            .parse()
            .map_err(DbError::corrupt("api_keys.id"))?;
        let principal = Principal {
            team_id: parse_team("api_keys.team_id", row.try_get("team_id")?)?,
            key_id,
            is_admin: flag(&row, "is_admin")?,
        };
        // A write per request would serialize every request on SQLite's write lock:
        // the time of use is refreshed when it is older than the granularity.
        let last: Option<i64> = row.try_get("last_used_at")?;
        if last.is_none_or(|l| now - l >= LAST_USED_GRANULARITY_MS) {
            sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
                .bind(now)
                .bind(principal.key_id.as_str())
                .execute(&self.pool)
                .await?;
        }
        Ok(Some(principal))
    }

    /// Number of API keys (all teams): zero means the installation was never bootstrapped.
    pub async fn count_api_keys(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await?;
        Ok(n.max(0) as u64)
    }
}

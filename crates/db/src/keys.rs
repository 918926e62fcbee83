//! Teams and API keys. Only the SHA-256 of a key's secret is stored.

use chrono::{DateTime, Utc};
use hearth_types::{ApiKeyId, TeamId};
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::{now_ms, Db, DbError, Principal, Result, Team};

/// Prefix of every API key secret.
pub const KEY_PREFIX: &str = "hk_";
const KEY_RANDOM_LEN: usize = 32;

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
            .await?;
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
        rows.iter()
            .map(|r| {
                Ok(Team {
                    id: parse_team("teams.id", r.try_get("id")?)?,
                    name: r.try_get("name")?,
                    created_at: ms_to_time(r.try_get("created_at")?),
                })
            })
            .collect()
    }

    /// Create an API key for `team`. Returns its public ID and the secret, which is
    /// shown to the caller once and never stored.
    pub async fn create_api_key(
        &self,
        team: TeamId,
        name: &str,
        is_admin: bool,
    ) -> Result<(ApiKeyId, String)> {
        let id = ApiKeyId::generate();
        let random: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(KEY_RANDOM_LEN)
            .map(char::from)
            .collect();
        let plaintext = format!("{KEY_PREFIX}{random}");
        sqlx::query(
            "INSERT INTO api_keys (id, team_id, name, secret_sha256, is_admin, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.as_str())
        .bind(team.to_string())
        .bind(name)
        .bind(hash_secret(&plaintext))
        .bind(is_admin)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok((id, plaintext))
    }

    /// The principal an API key secret speaks for, or `None` for an unknown key.
    /// Records the time of use.
    pub async fn authenticate(&self, plaintext: &str) -> Result<Option<Principal>> {
        // Keys are looked up by hash: no secret ever reaches a comparison.
        let hash = hash_secret(plaintext);
        let Some(row) =
            sqlx::query("SELECT id, team_id, is_admin FROM api_keys WHERE secret_sha256 = $1")
                .bind(&hash)
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
            is_admin: row.try_get("is_admin")?,
        };
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(principal.key_id.as_str())
            .execute(&self.pool)
            .await?;
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

//! Users (people who sign in with an email and a password) and their sessions.
//!
//! Passwords are kept as argon2id hashes (PHC strings, a random salt each), computed
//! off the async threads. A session is an API key of kind `session` tied to its user:
//! it authenticates like any key (so team scoping, admin rights, revocation and the
//! audit log need nothing new), expires on its own, ends at logout, and every session
//! of a user ends when the user is disabled. Sessions are never listed with a team's
//! keys and never count as the last working admin key.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use chrono::{DateTime, Utc};
use hearth_types::{ApiKeyId, TeamId, UserId};
use sqlx::Row;

use crate::keys::{ms_to_time, parse_team};
use crate::{flag, now_ms, ApiKey, Db, DbError, NewApiKey, Result};

/// A user as listed: never the password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub team_id: TeamId,
    pub email: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
    pub disabled_at: Option<DateTime<Utc>>,
}

/// What [`Db::create_user`] records (the password is hashed there, never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewUser {
    pub team: TeamId,
    /// Compared and stored in lowercase.
    pub email: String,
    pub password: String,
    pub is_admin: bool,
}

/// A new session: the user, its session key and the key's secret (shown once, as a
/// cookie).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: User,
    pub key: ApiKey,
    pub secret: String,
}

/// The outcome of [`Db::login`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    Ok(Box<Session>),
    /// Unknown email, wrong password or disabled user: the caller cannot tell which.
    Refused,
}

const USER_COLUMNS: &str =
    "id, team_id, email, CAST(is_admin AS INTEGER) AS is_admin, created_at, disabled_at";
/// [`USER_COLUMNS`] of the `users u` side of a join.
const USER_COLUMNS_U: &str =
    "u.id, u.team_id, u.email, CAST(u.is_admin AS INTEGER) AS is_admin, u.created_at, u.disabled_at";

fn user_from_row(r: &sqlx::any::AnyRow) -> Result<User> {
    Ok(User {
        id: r
            .try_get::<&str, _>("id")?
            .parse()
            .map_err(DbError::corrupt("users.id"))?,
        team_id: parse_team("users.team_id", r.try_get("team_id")?)?,
        email: r.try_get("email")?,
        is_admin: flag(r, "is_admin")?,
        created_at: ms_to_time(r.try_get("created_at")?),
        disabled_at: r.try_get::<Option<i64>, _>("disabled_at")?.map(ms_to_time),
    })
}

/// A hash of `password` with a fresh salt (argon2id, the crate's default parameters),
/// computed on a blocking thread: it takes tens of milliseconds on purpose.
async fn hash_password(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .map_err(|e| DbError::Corrupt {
        column: "users.password_hash",
        source: Box::new(e),
    })?
    .map_err(|e| DbError::Corrupt {
        column: "users.password_hash",
        source: e.to_string().into(),
    })
}

/// Whether `password` matches `hash`; a hash that does not parse matches nothing.
async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|h| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &h)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Verified against when the email is unknown, so that a miss costs what a hit does
/// (no timing tells which emails have accounts). Any valid argon2id hash serves.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$\
    2pQeCxf3aW0Pp9r2n5VxGkq8y0y1E0xq7u2FQ0cQ1ZQ";

impl Db {
    /// Create a user. An email already in use (any team, any case) is `AlreadyExists`.
    pub async fn create_user(&self, u: &NewUser) -> Result<User> {
        let id = UserId::generate();
        let email = u.email.to_lowercase();
        let hash = hash_password(u.password.clone()).await?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO users (id, team_id, email, password_hash, is_admin, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id.as_str())
        .bind(u.team.to_string())
        .bind(&email)
        .bind(&hash)
        .bind(u.is_admin)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => DbError::AlreadyExists {
                what: format!("a user with email {email}"),
            },
            _ => DbError::Query(e),
        })?;
        Ok(User {
            id,
            team_id: u.team,
            email,
            is_admin: u.is_admin,
            created_at: ms_to_time(now),
            disabled_at: None,
        })
    }

    /// Every user (`team`: one team's), oldest first.
    pub async fn list_users(&self, team: Option<TeamId>) -> Result<Vec<User>> {
        let rows = match team {
            Some(t) => {
                sqlx::query(&format!(
                    "SELECT {USER_COLUMNS} FROM users WHERE team_id = $1 ORDER BY created_at, id"
                ))
                .bind(t.to_string())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {USER_COLUMNS} FROM users ORDER BY created_at, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(user_from_row).collect()
    }

    /// The user `id`, if it exists.
    pub async fn get_user(&self, id: &UserId) -> Result<Option<User>> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// The user a session key belongs to (`None` for a plain API key).
    pub async fn user_of_key(&self, key: &ApiKeyId) -> Result<Option<User>> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS_U} FROM users u JOIN api_keys k ON k.user_id = u.id WHERE k.id = $1"
        ))
        .bind(key.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// Disable user `id` and end all its sessions at once. Returns whether this call
    /// disabled it (false: unknown or disabled before).
    pub async fn disable_user(&self, id: &UserId) -> Result<bool> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let r =
            sqlx::query("UPDATE users SET disabled_at = $1 WHERE id = $2 AND disabled_at IS NULL")
                .bind(now)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
        sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    /// Check `email` and `password`; on success open a session of `ttl` for the user
    /// (an API key of kind `session` with the user's admin right).
    pub async fn login(&self, email: &str, password: &str, ttl: chrono::Duration) -> Result<Login> {
        let email = email.to_lowercase();
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS}, password_hash FROM users WHERE email = $1"
        ))
        .bind(&email)
        .fetch_optional(&self.pool)
        .await?;
        let (user, hash) = match &row {
            Some(r) => (
                Some(user_from_row(r)?),
                r.try_get::<String, _>("password_hash")?,
            ),
            None => (None, DUMMY_HASH.to_owned()),
        };
        let matches = verify_password(password.to_owned(), hash).await;
        let Some(user) = user.filter(|u| matches && u.disabled_at.is_none()) else {
            return Ok(Login::Refused);
        };
        let mut new = NewApiKey::new(
            user.team_id,
            &format!("session of {}", user.email),
            user.is_admin,
        );
        new.expires_at = Some(Utc::now() + ttl);
        let (key, secret) = self
            .create_key_of_kind(&new, "session", Some(&user.id))
            .await?;
        Ok(Login::Ok(Box::new(Session { user, key, secret })))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_dummy_hash_parses() {
        assert!(argon2::password_hash::PasswordHash::new(super::DUMMY_HASH).is_ok());
    }
}

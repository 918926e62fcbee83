//! Users: people who sign in (the dashboard) with an email and a password.
//!
//! Admins make users of any team (`/v1/admin/users`) and disable them, which ends their
//! sessions at once. A sign-in opens a session, an API key of kind `session` with the
//! user's team and admin right (see `hearth_db::users`), carried by the browser in an
//! `HttpOnly`, `SameSite=Strict` cookie; the auth middleware takes it where a request has
//! no API key. Failed sign-ins are throttled per email, and a miss costs the same
//! password check as a hit, so neither speed nor error tells which emails exist.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hearth_db::{DbError, Login, NewUser, Principal, User};
use hearth_types::{TeamId, UserId};

use super::accounts::require_admin;
use super::audit::action;
use super::{App, AppError, AppResult};

/// Longest email accepted (RFC 5321's path limit).
pub const MAX_EMAIL: usize = 254;
/// Password length bounds, in characters.
pub const MIN_PASSWORD: usize = 10;
pub const MAX_PASSWORD: usize = 256;
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Failed sign-ins per email within [`FAILURE_WINDOW`] before further tries are refused.
pub const MAX_FAILURES: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// What an admin asks for when making a user.
#[derive(Debug, Clone)]
pub struct UserParams {
    pub team: TeamId,
    pub email: String,
    pub password: String,
    pub is_admin: bool,
}

/// Who a request speaks for, as `GET /v1/me` tells it.
#[derive(Debug, Clone)]
pub struct Me {
    pub principal: Principal,
    pub team_name: String,
    /// Set when the request came with a session (a signed-in user).
    pub user: Option<User>,
}

/// Failed sign-ins per email (lowercase), in this process.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginThrottle {
    fn check(&self, email: &str) -> AppResult<()> {
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(email) {
            Some((n, since)) if *n >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW => {
                Err(AppError::RateLimited(format!(
                    "too many failed sign-ins for this email; try again in {} minutes",
                    (FAILURE_WINDOW - since.elapsed()).as_secs() / 60 + 1
                )))
            }
            _ => Ok(()),
        }
    }

    fn failed(&self, email: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        // Keep the map small: forget windows that are over.
        if map.len() > 10_000 {
            map.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let e = map.entry(email.to_owned()).or_insert((0, Instant::now()));
        if e.1.elapsed() >= FAILURE_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    fn succeeded(&self, email: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(email);
    }
}

/// An email as stored: trimmed, lowercase, one `@` with text on both sides, no spaces
/// or control characters, at most [`MAX_EMAIL`] bytes.
pub fn email(raw: &str) -> AppResult<String> {
    let e = raw.trim().to_lowercase();
    let ok = e.len() <= MAX_EMAIL
        && e.split('@').count() == 2
        && e.split('@').all(|p| !p.is_empty())
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if !ok {
        return Err(AppError::InvalidArgument(format!(
            "email must look like name@domain (at most {MAX_EMAIL} characters, no spaces)"
        )));
    }
    Ok(e)
}

fn password(p: &str) -> AppResult<()> {
    let n = p.chars().count();
    if !(MIN_PASSWORD..=MAX_PASSWORD).contains(&n) || p.chars().any(char::is_control) {
        return Err(AppError::InvalidArgument(format!(
            "password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters without control characters"
        )));
    }
    Ok(())
}

fn parse_user_id(id: &str) -> AppResult<UserId> {
    id.parse()
        .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))
}

impl App {
    /// Make a user (admins only).
    pub async fn create_user(&self, caller: &Principal, p: UserParams) -> AppResult<User> {
        require_admin(caller)?;
        let email = email(&p.email)?;
        password(&p.password)?;
        if p.team.is_platform() || self.db.get_team(p.team).await?.is_none() {
            return Err(AppError::NotFound(format!("team '{}' not found", p.team)));
        }
        let user = self
            .db
            .create_user(&NewUser {
                team: p.team,
                email,
                password: p.password,
                is_admin: p.is_admin,
            })
            .await
            .map_err(|e| match e {
                DbError::AlreadyExists { what } => AppError::Conflict(format!("{what} exists")),
                e => AppError::Db(e),
            })?;
        tracing::info!(user_id = %user.id, team_id = %user.team_id, admin = user.is_admin,
            by = %caller.key_id, "user created");
        self.audit(
            user.team_id,
            action::USER_CREATE,
            user.id.as_str(),
            serde_json::json!({"email": user.email, "admin": user.is_admin}),
        )
        .await;
        Ok(user)
    }

    /// Every user, or one team's (admins only).
    pub async fn list_users(
        &self,
        caller: &Principal,
        team: Option<TeamId>,
    ) -> AppResult<Vec<User>> {
        require_admin(caller)?;
        Ok(self.db.list_users(team).await?)
    }

    /// Disable a user and end its sessions (admins only). Idempotent.
    pub async fn disable_user(&self, caller: &Principal, id: &str) -> AppResult<User> {
        require_admin(caller)?;
        let user_id = parse_user_id(id)?;
        let not_found = || AppError::NotFound(format!("user '{user_id}' not found"));
        let user = self.db.get_user(&user_id).await?.ok_or_else(not_found)?;
        if self.db.disable_user(&user_id).await? {
            tracing::info!(%user_id, by = %caller.key_id, "user disabled; its sessions ended");
            self.audit(
                user.team_id,
                action::USER_DISABLE,
                user_id.as_str(),
                serde_json::json!({}),
            )
            .await;
        }
        self.db.get_user(&user_id).await?.ok_or_else(not_found)
    }

    /// Sign in: a new session's secret and when it expires, or 401 for any bad pair.
    pub async fn login(
        &self,
        raw_email: &str,
        pass: &str,
    ) -> AppResult<(User, String, chrono::DateTime<chrono::Utc>)> {
        // Malformed input is refused as bad credentials: no hint of what is on file.
        let (Ok(email), true) = (email(raw_email), pass.chars().count() <= MAX_PASSWORD) else {
            return Err(AppError::BadCredentials);
        };
        self.login_throttle.check(&email)?;
        let ttl = chrono::Duration::from_std(SESSION_TTL).unwrap_or(chrono::Duration::hours(12));
        match self.db.login(&email, pass, ttl).await? {
            Login::Ok(ok) => {
                let hearth_db::Session {
                    user,
                    key: session,
                    secret,
                } = *ok;
                self.login_throttle.succeeded(&email);
                tracing::info!(user_id = %user.id, session = %session.id, "user signed in");
                self.audit_as(
                    Some(&session.id),
                    user.team_id,
                    action::USER_LOGIN,
                    user.id.as_str(),
                    serde_json::json!({}),
                )
                .await;
                let expires = session.expires_at.unwrap_or_else(chrono::Utc::now);
                Ok((user, secret, expires))
            }
            Login::Refused => {
                self.login_throttle.failed(&email);
                Err(AppError::BadCredentials)
            }
        }
    }

    /// Sign out: end the session the request came with (a plain API key is refused:
    /// revoke keys with `DELETE /v1/keys/{id}`).
    pub async fn logout(&self, caller: &Principal) -> AppResult<()> {
        if self.db.user_of_key(&caller.key_id).await?.is_none() {
            return Err(AppError::InvalidArgument(
                "this request did not come with a session; API keys are revoked with DELETE /v1/keys/{key_id}"
                    .into(),
            ));
        }
        self.db.revoke_api_key(&caller.key_id).await?;
        Ok(())
    }

    /// Who the caller is.
    pub async fn me(&self, caller: &Principal) -> AppResult<Me> {
        let team = self.db.get_team(caller.team_id).await?;
        Ok(Me {
            principal: caller.clone(),
            team_name: team.map(|t| t.name).unwrap_or_default(),
            user: self.db.user_of_key(&caller.key_id).await?,
        })
    }
}

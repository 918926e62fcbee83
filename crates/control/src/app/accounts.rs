//! Teams and API keys: who may call the API, and what an admin may do besides.
//!
//! A key belongs to one team and may be an admin key. Any key manages its own team's
//! keys (make, list, revoke); only an admin key makes admin keys, teams, or keys of
//! other teams, and only an admin reaches `/v1/admin/*`. A revoked key stops working
//! on the next request (every request looks the key up; nothing is cached). The last
//! admin key that still works cannot be revoked, so an installation cannot lock its
//! operators out.

use chrono::{DateTime, Utc};
use hearth_db::{ApiKey, DbError, NewApiKey, Principal, Team, Template};
use hearth_types::{ApiKeyId, TeamId};

use super::audit::action;
use super::{App, AppError, AppResult};

/// Longest key name, in characters.
pub const MAX_KEY_NAME: usize = 64;
/// Longest team name (`[a-z0-9][a-z0-9_-]*`).
pub const MAX_TEAM_NAME: usize = 63;
/// Shortest and longest key lifetime a request may ask for.
pub const MIN_KEY_TTL_S: i64 = 60;
pub const MAX_KEY_TTL_S: i64 = 10 * 365 * 24 * 3600;

/// What a caller asks for when making a key.
#[derive(Debug, Clone, Default)]
pub struct KeyParams {
    pub name: Option<String>,
    pub is_admin: bool,
    /// Lifetime in seconds from now; `None`: never expires.
    pub expires_in_s: Option<i64>,
}

/// Refuse a caller that is not an admin.
pub fn require_admin(caller: &Principal) -> AppResult<()> {
    if caller.is_admin {
        Ok(())
    } else {
        Err(AppError::Forbidden(
            "this needs an admin API key (ask an operator: `hearth admin key create --admin`)"
                .into(),
        ))
    }
}

fn key_name(name: Option<&str>) -> AppResult<String> {
    let name = name.map(str::trim).unwrap_or("");
    if name.is_empty() {
        return Ok("key".into());
    }
    if name.chars().count() > MAX_KEY_NAME || name.chars().any(char::is_control) {
        return Err(AppError::InvalidArgument(format!(
            "name must be 1 to {MAX_KEY_NAME} characters without control characters"
        )));
    }
    Ok(name.to_owned())
}

/// A team name: lowercase letters, digits, '-' and '_', starting with a letter or
/// digit, and not a UUID (which `--team` reads as an ID).
pub fn team_name(name: &str) -> AppResult<String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TEAM_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(AppError::InvalidArgument(format!(
            "team name must be 1 to {MAX_TEAM_NAME} of [a-z0-9_-], starting with a letter or digit, got {:?}",
            name.chars().take(70).collect::<String>()
        )));
    }
    if name.parse::<TeamId>().is_ok() {
        return Err(AppError::InvalidArgument(
            "team name must not be a UUID (team IDs are UUIDs)".into(),
        ));
    }
    Ok(name.to_owned())
}

fn expiry(expires_in_s: Option<i64>, now: DateTime<Utc>) -> AppResult<Option<DateTime<Utc>>> {
    let Some(s) = expires_in_s else {
        return Ok(None);
    };
    if !(MIN_KEY_TTL_S..=MAX_KEY_TTL_S).contains(&s) {
        return Err(AppError::InvalidArgument(format!(
            "expires_in_s must be between {MIN_KEY_TTL_S} and {MAX_KEY_TTL_S} (10 years), got {s}"
        )));
    }
    Ok(Some(now + chrono::Duration::seconds(s)))
}

fn parse_key_id(id: &str) -> AppResult<ApiKeyId> {
    id.parse()
        .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))
}

fn key_not_found(id: &str) -> AppError {
    AppError::NotFound(format!(
        "API key '{}' not found",
        id.chars().take(40).collect::<String>()
    ))
}

impl App {
    /// Make a key of `team` for `caller`: its own team, or any team for an admin.
    pub async fn create_key(
        &self,
        caller: &Principal,
        team: TeamId,
        p: KeyParams,
    ) -> AppResult<(ApiKey, String)> {
        if team != caller.team_id {
            require_admin(caller)?;
        }
        if p.is_admin && !caller.is_admin {
            return Err(AppError::Forbidden(
                "only an admin key can make admin keys".into(),
            ));
        }
        let name = key_name(p.name.as_deref())?;
        let expires_at = expiry(p.expires_in_s, Utc::now())?;
        if team.is_platform() || self.db.get_team(team).await?.is_none() {
            return Err(AppError::NotFound(format!("team '{team}' not found")));
        }
        let (key, secret) = self
            .db
            .create_api_key(&NewApiKey {
                team,
                name,
                is_admin: p.is_admin,
                expires_at,
                created_by: Some(caller.key_id.clone()),
            })
            .await?;
        tracing::info!(team_id = %team, key_id = %key.id, admin = key.is_admin,
            by = %caller.key_id, "API key created");
        self.audit_as(
            Some(&caller.key_id),
            team,
            action::KEY_CREATE,
            key.id.as_str(),
            serde_json::json!({"name": key.name, "is_admin": key.is_admin,
                "expires_at": key.expires_at.map(|t| t.to_rfc3339())}),
        )
        .await;
        Ok((key, secret))
    }

    /// The keys of `caller`'s team (revoked and expired ones too).
    pub async fn list_keys(&self, caller: &Principal) -> AppResult<Vec<ApiKey>> {
        Ok(self.db.list_api_keys(caller.team_id).await?)
    }

    /// Revoke key `id`: one of the caller's team, or any for an admin. Revoking a key
    /// that is already revoked is not an error (the key stays revoked).
    pub async fn revoke_key(&self, caller: &Principal, id: &str) -> AppResult<ApiKey> {
        let key_id = parse_key_id(id)?;
        let key = self
            .db
            .get_api_key(&key_id)
            .await?
            .filter(|k| caller.is_admin || k.team_id == caller.team_id)
            .ok_or_else(|| key_not_found(id))?;
        if key.revoked_at.is_none()
            && key.is_admin
            && key.is_active(Utc::now())
            && self.db.count_active_admin_keys().await? <= 1
        {
            return Err(AppError::Conflict(
                "this is the last working admin key: make another admin key first".into(),
            ));
        }
        if self.db.revoke_api_key(&key_id).await? {
            tracing::info!(team_id = %key.team_id, %key_id, by = %caller.key_id, "API key revoked");
            self.audit_as(
                Some(&caller.key_id),
                key.team_id,
                action::KEY_REVOKE,
                key_id.as_str(),
                serde_json::json!({"name": key.name}),
            )
            .await;
        }
        self.db
            .get_api_key(&key_id)
            .await?
            .ok_or_else(|| key_not_found(id))
    }

    /// Make a team (admins).
    pub async fn create_team(&self, caller: &Principal, name: &str) -> AppResult<Team> {
        require_admin(caller)?;
        let name = team_name(name)?;
        let team = self.db.create_team(&name).await.map_err(|e| match e {
            DbError::AlreadyExists { .. } => {
                AppError::Conflict(format!("a team named '{name}' already exists"))
            }
            other => AppError::Db(other),
        })?;
        tracing::info!(team_id = %team.id, name = %team.name, by = %caller.key_id, "team created");
        self.audit_as(
            Some(&caller.key_id),
            team.id,
            action::TEAM_CREATE,
            &team.id.to_string(),
            serde_json::json!({"name": team.name}),
        )
        .await;
        Ok(team)
    }

    /// Every team but the platform's (admins).
    pub async fn list_teams(&self, caller: &Principal) -> AppResult<Vec<Team>> {
        require_admin(caller)?;
        Ok(self.db.list_teams().await?)
    }

    /// Make a key of any team (`/v1/admin/...`: admins, even for their own team).
    pub async fn admin_create_key(
        &self,
        caller: &Principal,
        team: &str,
        p: KeyParams,
    ) -> AppResult<(ApiKey, String)> {
        require_admin(caller)?;
        let team = parse_team_id(team)?;
        self.create_key(caller, team, p).await
    }

    /// Revoke any team's key (`/v1/admin/...`: admins).
    pub async fn admin_revoke_key(&self, caller: &Principal, id: &str) -> AppResult<ApiKey> {
        require_admin(caller)?;
        self.revoke_key(caller, id).await
    }

    /// The keys of team `team`, a team ID from the request (admins; a non-admin is
    /// refused before the ID is read).
    pub async fn list_team_keys(&self, caller: &Principal, team: &str) -> AppResult<Vec<ApiKey>> {
        require_admin(caller)?;
        let team = parse_team_id(team)?;
        if team.is_platform() || self.db.get_team(team).await?.is_none() {
            return Err(AppError::NotFound(format!("team '{team}' not found")));
        }
        Ok(self.db.list_api_keys(team).await?)
    }

    /// Every team's templates and the platform's (admins).
    pub async fn list_all_templates(&self, caller: &Principal) -> AppResult<Vec<Template>> {
        require_admin(caller)?;
        Ok(self.db.list_all_templates().await?)
    }
}

/// A team ID from a path segment.
pub fn parse_team_id(id: &str) -> AppResult<TeamId> {
    id.parse().map_err(|_| {
        AppError::InvalidArgument(format!(
            "team ID must be a UUID, got {:?}",
            id.chars().take(40).collect::<String>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn team_names_are_plain_and_not_uuids() {
        for ok in ["acme", "team-2", "a", "ci_runners"] {
            assert_eq!(team_name(ok).unwrap(), ok);
        }
        for bad in [
            "",
            "-x",
            "Acme",
            "a b",
            "../x",
            "a/b",
            "x\u{0}",
            &"a".repeat(64),
            "00000000-0000-0000-0000-000000000000",
        ] {
            assert!(team_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn key_names_default_and_lifetimes_are_bounded() {
        assert_eq!(key_name(None).unwrap(), "key");
        assert_eq!(key_name(Some("  CI runner ")).unwrap(), "CI runner");
        assert!(key_name(Some("a\nb")).is_err());
        assert!(key_name(Some(&"x".repeat(65))).is_err());
        let now = Utc::now();
        assert_eq!(expiry(None, now).unwrap(), None);
        assert_eq!(
            expiry(Some(3600), now).unwrap(),
            Some(now + chrono::Duration::seconds(3600))
        );
        for bad in [-1, 0, 59, MAX_KEY_TTL_S + 1, i64::MAX] {
            assert!(expiry(Some(bad), now).is_err(), "{bad} accepted");
        }
    }
}

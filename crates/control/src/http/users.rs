//! `/v1/auth/*`, `/v1/me` and `/v1/admin/users`: sign-in sessions and users.
//!
//! The session's secret travels only in the `hearth_session` cookie (`HttpOnly`, so page
//! scripts cannot read it; `SameSite=Strict`, so other sites' pages cannot send it;
//! `Path=/`), never in a response body. The auth middleware reads the cookie when a
//! request carries no API key.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::{ApiJson, AppState, Caller};
use crate::app::accounts::parse_team_id;
use crate::app::users::{UserParams, SESSION_TTL};

type ApiResult<T> = Result<T, ApiError>;

/// The cookie that carries a session's secret.
pub const SESSION_COOKIE: &str = "hearth_session";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserInfo {
    /// `usr-` and 12 characters.
    pub id: String,
    pub team_id: String,
    pub email: String,
    pub is_admin: bool,
    /// RFC 3339
    pub created_at: String,
    /// RFC 3339; set: the user can no longer sign in.
    pub disabled_at: Option<String>,
}

impl From<hearth_db::User> for UserInfo {
    fn from(u: hearth_db::User) -> Self {
        UserInfo {
            id: u.id.to_string(),
            team_id: u.team_id.to_string(),
            email: u.email,
            is_admin: u.is_admin,
            created_at: u.created_at.to_rfc3339(),
            disabled_at: u.disabled_at.map(|t| t.to_rfc3339()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    pub user: UserInfo,
    /// RFC 3339: when the session (the cookie) stops working.
    pub expires_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeResponse {
    pub team_id: String,
    pub team_name: String,
    /// The API key (or session) the request came with.
    pub key_id: String,
    pub is_admin: bool,
    /// The signed-in user, when the request came with a session.
    pub user: Option<UserInfo>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub team_id: String,
    pub email: String,
    /// 10 to 256 characters.
    pub password: String,
    #[serde(default)]
    pub is_admin: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<UserInfo>,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct UserListQuery {
    /// Only this team's users.
    pub team_id: Option<String>,
}

fn session_cookie(value: &str, max_age_s: u64) -> HeaderValue {
    // The value is `hk_` and alphanumerics (or empty): always a valid header.
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("hearth_session=; Path=/; Max-Age=0"))
}

#[utoipa::path(post, path = "/v1/auth/login", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse, description = "Signed in; the session is in the `hearth_session` cookie (HttpOnly)."),
        (status = 401, body = ErrorBody, description = "Wrong email or password (or a disabled user)."),
        (status = 429, body = ErrorBody, description = "Too many failed sign-ins for this email.")))]
pub async fn login(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> ApiResult<Response> {
    let (user, secret, expires_at) = s.app.login(&req.email, &req.password).await?;
    let mut resp = Json(LoginResponse {
        user: user.into(),
        expires_at: expires_at.to_rfc3339(),
    })
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&secret, SESSION_TTL.as_secs()),
    );
    Ok(resp)
}

#[utoipa::path(post, path = "/v1/auth/logout",
    responses((status = 204, description = "The session ended; the cookie is cleared."),
        (status = 400, body = ErrorBody, description = "The request came with an API key, not a session.")),
    security(("session" = [])))]
pub async fn logout(State(s): State<AppState>, caller: Caller) -> ApiResult<Response> {
    s.app.logout(&caller).await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0));
    Ok(resp)
}

#[utoipa::path(get, path = "/v1/me",
    responses((status = 200, body = MeResponse)),
    security(("api_key" = []), ("session" = [])))]
pub async fn me(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<MeResponse>> {
    let me = s.app.me(&caller).await?;
    Ok(Json(MeResponse {
        team_id: me.principal.team_id.to_string(),
        team_name: me.team_name,
        key_id: me.principal.key_id.to_string(),
        is_admin: me.principal.is_admin,
        user: me.user.map(Into::into),
    }))
}

#[utoipa::path(post, path = "/v1/admin/users", request_body = CreateUserRequest,
    responses((status = 201, body = UserInfo), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "No such team."),
        (status = 409, body = ErrorBody, description = "A user with that email exists.")),
    security(("api_key" = [])))]
pub async fn admin_create_user(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateUserRequest>,
) -> ApiResult<(StatusCode, Json<UserInfo>)> {
    let team = parse_team_id(&req.team_id)?;
    let user = s
        .app
        .create_user(
            &caller,
            UserParams {
                team,
                email: req.email,
                password: req.password,
                is_admin: req.is_admin,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(user.into())))
}

#[utoipa::path(get, path = "/v1/admin/users", params(UserListQuery),
    responses((status = 200, body = UserList), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn admin_list_users(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<UserListQuery>,
) -> ApiResult<Json<UserList>> {
    let team = q.team_id.as_deref().map(parse_team_id).transpose()?;
    let users = s.app.list_users(&caller, team).await?;
    Ok(Json(UserList {
        users: users.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/admin/users/{user_id}", params(("user_id" = String, Path)),
    responses((status = 200, body = UserInfo, description = "The user, now disabled; its sessions ended."),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn admin_disable_user(
    State(s): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
) -> ApiResult<Json<UserInfo>> {
    Ok(Json(s.app.disable_user(&caller, &user_id).await?.into()))
}

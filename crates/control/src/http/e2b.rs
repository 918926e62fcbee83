//! E2B's REST API beside `/v1`, so that E2B's own SDKs (the `e2b` packages on PyPI
//! and npm) work against hearth unchanged. Same app, same API keys (the SDKs send
//! `X-API-KEY`); field names, status codes and the error shape
//! (`{"code": <status>, "message": "..."}`) are E2B's. Each handler maps onto the
//! same `App` operation as its `/v1` twin; what hearth does not have answers in
//! E2B's error shape (see `docs/e2b.md`). E2B's template `base` is hearth's
//! `python` platform template.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use hearth_db::{OnTimeout, Principal, SandboxRow, SandboxState, Template};
use hearth_types::{SandboxId, TeamId};
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::app::hosts::SandboxMetrics;
use crate::app::sandboxes::{parse_id, CreateParams};
use crate::app::{App, AppError};

/// E2B's name of the default template, and what it is here.
pub const BASE_ALIAS: &str = "base";
pub const BASE_TEMPLATE: &str = "python";
/// E2B's default lifetime when a create names none (seconds).
const DEFAULT_TIMEOUT_S: i64 = 15;
/// E2B's default and largest page of `GET /v2/sandboxes`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 100;
/// Lines of the console a logs call returns at most.
const MAX_LOG_LINES: usize = 1000;

/// An error in E2B's shape.
#[derive(Debug)]
pub struct E2bError {
    status: StatusCode,
    message: String,
}

impl E2bError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// The status E2B's API answers for an app error (shared with the sandbox proxy).
pub fn status_of(e: &AppError) -> StatusCode {
    match e {
        AppError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        AppError::Unauthenticated | AppError::BadCredentials => StatusCode::UNAUTHORIZED,
        AppError::Forbidden(_) => StatusCode::FORBIDDEN,
        AppError::NotFound(_) => StatusCode::NOT_FOUND,
        AppError::Conflict(_) => StatusCode::CONFLICT,
        AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        AppError::QuotaExceeded(_) | AppError::CapacityExceeded(_) | AppError::RateLimited(_) => {
            StatusCode::TOO_MANY_REQUESTS
        }
        AppError::Unavailable(_) | AppError::Host { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The message shown for an app error (never the database's own words).
pub fn message_of(e: &AppError) -> String {
    match e {
        AppError::Db(_) => "internal error".to_owned(),
        other => other.to_string(),
    }
}

impl From<AppError> for E2bError {
    fn from(e: AppError) -> Self {
        Self::new(status_of(&e), message_of(&e))
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.status.as_u16(), "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

type E2bResult<T> = Result<T, E2bError>;

/// A JSON body, or E2B's 400 when it is not one (axum's own rejections are text).
struct Body<T>(T);

impl<S, T> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = E2bError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| E2bError::bad_request(format!("cannot read the body: {e}")))?;
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => return Ok(Body(T::default())),
            // serde would read an array as a struct's fields in order (`[]`: defaults).
            Some(b) if *b != b'{' => {
                return Err(E2bError::bad_request(
                    "invalid JSON body: expected an object",
                ))
            }
            Some(_) => {}
        }
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| E2bError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Query-string parameters of an E2B route; a malformed one is a 400 in E2B's shape
/// (axum's own rejection would answer in hearth's `/v1` shape).
struct Params<T>(T);

impl<S, T> axum::extract::FromRequestParts<S> for Params<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = E2bError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Params(q))
            .map_err(|e| E2bError::bad_request(e.body_text()))
    }
}

/// E2B's routes; the caller's key is checked by [`auth`] (401 in E2B's shape).
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/sandboxes", get(list_v1).post(create))
        .route("/v2/sandboxes", get(list_v2).post(create))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/logs", get(logs_v1))
        .route("/v2/sandboxes/{id}/logs", get(logs_v2))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/metrics", get(metrics_many))
        .route("/sandboxes/{id}/snapshots", post(snapshot))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/snapshots", get(list_snapshots))
        .route("/templates", get(list_templates))
        .route_layer(middleware::from_fn_with_state(state, auth))
}

/// Paths that belong to E2B's API: unknown ones under them get E2B's 404.
pub fn is_e2b_path(path: &str) -> bool {
    [
        "/sandboxes",
        "/v2/",
        "/v3/",
        "/templates",
        "/snapshots",
        "/teams",
        "/volumes",
        "/secrets",
        "/api-keys",
        "/access-tokens",
        "/nodes",
    ]
    .iter()
    .any(|p| path == p.trim_end_matches('/') || path.starts_with(p))
}

/// E2B's answer for a path or method hearth does not serve.
pub fn not_served(path: &str) -> Response {
    E2bError::new(
        StatusCode::NOT_FOUND,
        format!("{path} is not part of hearth's E2B-compatible API (see docs/e2b.md)"),
    )
    .into_response()
}

/// `X-API-KEY: <key>` (or `Authorization: Bearer <key>`) -> [`Principal`]; else 401 in
/// E2B's shape.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::to_owned);
    match super::run_authenticated(&state.app, key.as_deref(), req, next).await {
        Ok(resp) => resp,
        Err(AppError::Unauthenticated) => E2bError::new(
            StatusCode::UNAUTHORIZED,
            "Invalid API key: send a hearth API key in X-API-KEY (`hearth e2b env` prints it)",
        )
        .into_response(),
        Err(e) => E2bError::from(e).into_response(),
    }
}

type Caller = axum::Extension<Principal>;

fn team(c: &Caller) -> TeamId {
    c.0.team_id
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// E2B's template ID for a hearth template (the alias `base` stays visible as such).
fn template_id(row: &SandboxRow) -> String {
    row.template.to_string()
}

fn alias(row: &SandboxRow) -> Value {
    if row.template.as_str() == BASE_TEMPLATE {
        Value::String(BASE_ALIAS.into())
    } else {
        Value::Null
    }
}

/// E2B knows two states; the others are on their way to one of them or gone.
fn e2b_state(s: SandboxState) -> &'static str {
    match s {
        SandboxState::Paused | SandboxState::Pausing => "paused",
        _ => "running",
    }
}

fn client_id(row: &SandboxRow) -> String {
    row.host_id
        .as_ref()
        .map_or_else(|| "hearth".to_owned(), |h| h.to_string())
}

/// E2B's `Sandbox`: what a create, connect or resume returns.
async fn sandbox_json(app: &App, row: &SandboxRow) -> E2bResult<Value> {
    let token = if row.secure {
        Value::String(app.envd_access_token(&row.id).await?)
    } else {
        Value::Null
    };
    Ok(json!({
        "sandboxID": row.id.to_string(),
        "templateID": template_id(row),
        "alias": alias(row),
        "clientID": client_id(row),
        "envdVersion": hearth_types::ENVD_VERSION,
        "envdAccessToken": token,
        "trafficAccessToken": Value::Null,
        "domain": app.policy.e2b_domain,
    }))
}

/// E2B's `ListedSandbox`.
fn listed_json(row: &SandboxRow) -> Value {
    json!({
        "sandboxID": row.id.to_string(),
        "templateID": template_id(row),
        "alias": alias(row),
        "clientID": client_id(row),
        "startedAt": rfc3339(row.created_at),
        "endAt": rfc3339(row.expires_at),
        "cpuCount": row.vcpus,
        "memoryMB": row.memory_mb,
        "diskSizeMB": row.disk_size_mb,
        "metadata": row.metadata,
        "state": e2b_state(row.state),
        "envdVersion": hearth_types::ENVD_VERSION,
    })
}

/// E2B's `SandboxDetail`.
async fn detail_json(app: &App, row: &SandboxRow) -> E2bResult<Value> {
    let mut v = listed_json(row);
    let token = if row.secure {
        Value::String(app.envd_access_token(&row.id).await?)
    } else {
        Value::Null
    };
    v["envdAccessToken"] = token;
    v["domain"] = json!(app.policy.e2b_domain);
    v["allowInternetAccess"] = Value::Bool(false);
    v["lifecycle"] = json!({
        "autoResume": row.auto_resume,
        "onTimeout": if row.on_timeout == OnTimeout::Pause { "pause" } else { "kill" },
    });
    Ok(v)
}

/// A sandbox of the caller's team that is not gone (E2B forgets killed sandboxes).
async fn live_row(app: &App, team: TeamId, id: &str) -> E2bResult<SandboxRow> {
    let id = parse_sandbox_id(id)?;
    let row = app.get_sandbox(team, &id).await.map_err(|e| match e {
        AppError::NotFound(_) => not_found(&id),
        other => other.into(),
    })?;
    if matches!(
        row.state,
        SandboxState::Stopped | SandboxState::Stopping | SandboxState::Error
    ) {
        return Err(not_found(&id));
    }
    Ok(row)
}

fn not_found(id: &SandboxId) -> E2bError {
    E2bError::new(
        StatusCode::NOT_FOUND,
        format!("sandbox \"{id}\" doesn't exist or you don't have access to it"),
    )
}

fn parse_sandbox_id(s: &str) -> E2bResult<SandboxId> {
    // E2B's SDKs may send `<id>-<client id>`; hearth IDs have no such suffix.
    parse_id(s).map_err(|_| {
        E2bError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox \"{s:.64}\" doesn't exist or you don't have access to it"),
        )
    })
}

// ----------------------------------------------------------------- create

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<i64>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    auto_pause: Option<bool>,
    /// v1: a bool; v2: `{"enabled": bool}`.
    auto_resume: Option<Value>,
    secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<Value>,
    mcp: Option<Value>,
    volume_mounts: Option<Value>,
}

fn auto_resume(v: &Option<Value>) -> E2bResult<bool> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::Object(o)) => match o.get("enabled") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(E2bError::bad_request(
                "autoResume.enabled must be a boolean",
            )),
        },
        Some(_) => Err(E2bError::bad_request(
            "autoResume must be a boolean or {\"enabled\": bool}",
        )),
    }
}

fn is_empty_json(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Object(o)) => o.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    }
}

async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Body(req): Body<NewSandbox>,
) -> E2bResult<Response> {
    let template = req
        .template_id
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| E2bError::bad_request("templateID is required"))?;
    let template = if template == BASE_ALIAS {
        BASE_TEMPLATE
    } else {
        template
    };
    if req.allow_internet_access == Some(true) {
        return Err(E2bError::bad_request(
            "allow_internet_access: hearth sandboxes have no internet access (egress is denied); \
             leave it unset or false",
        ));
    }
    if !is_empty_json(&req.network) {
        return Err(E2bError::bad_request(
            "network: hearth has no per-sandbox egress rules yet (egress is denied); leave it unset",
        ));
    }
    if !is_empty_json(&req.mcp) {
        return Err(E2bError::bad_request("mcp: hearth has no MCP gateway"));
    }
    if !is_empty_json(&req.volume_mounts) {
        return Err(E2bError::bad_request(
            "volumeMounts: hearth has no volumes yet",
        ));
    }
    let params = CreateParams {
        template: template.to_owned(),
        timeout_s: Some(req.timeout.unwrap_or(DEFAULT_TIMEOUT_S)),
        env: req.env_vars,
        metadata: req.metadata,
        on_timeout: req.auto_pause.and_then(|p| p.then(|| "pause".to_owned())),
        secure: Some(req.secure.unwrap_or(true)),
        auto_resume: auto_resume(&req.auto_resume)?,
        ..Default::default()
    };
    let row = state
        .app
        .create_sandbox(team(&caller), params)
        .await
        .map_err(|e| match e {
            AppError::NotFound(m) => E2bError::new(StatusCode::NOT_FOUND, m),
            other => other.into(),
        })?;
    let body = sandbox_json(&state.app, &row).await?;
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

// ----------------------------------------------------------------- list

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    metadata: Option<String>,
    state: Option<String>,
    limit: Option<i64>,
    next_token: Option<String>,
    order: Option<String>,
    template: Option<String>,
}

/// `k=v&k2=v2`, each key and value URL-encoded.
fn parse_metadata_filter(q: &str) -> E2bResult<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            E2bError::bad_request(format!(
                "metadata filter {pair:.64}: expected key=value (URL-encoded), joined by &"
            ))
        })?;
        let dec = |s: &str| {
            percent_decode(s).ok_or_else(|| {
                E2bError::bad_request(format!("metadata filter {pair:.64}: bad URL encoding"))
            })
        };
        out.push((dec(k)?, dec(v)?));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn parse_states(s: Option<&str>) -> E2bResult<Vec<&'static str>> {
    let Some(s) = s.filter(|s| !s.is_empty()) else {
        return Ok(vec!["running", "paused"]);
    };
    s.split(',')
        .map(|x| match x.trim() {
            "running" => Ok("running"),
            "paused" => Ok("paused"),
            other => Err(E2bError::bad_request(format!(
                "state {other:.32}: expected running or paused"
            ))),
        })
        .collect()
}

async fn matching(
    app: &App,
    team: TeamId,
    q: &ListQuery,
    states: &[&str],
) -> E2bResult<Vec<SandboxRow>> {
    let filter = match q.metadata.as_deref() {
        Some(m) => parse_metadata_filter(m)?,
        None => Vec::new(),
    };
    let template = q
        .template
        .as_deref()
        .map(|t| if t == BASE_ALIAS { BASE_TEMPLATE } else { t });
    let mut rows: Vec<SandboxRow> = app
        .db
        .list_sandboxes(team)
        .await
        .map_err(AppError::from)?
        .into_iter()
        .filter(|r| {
            !matches!(
                r.state,
                SandboxState::Stopped | SandboxState::Stopping | SandboxState::Error
            )
        })
        .filter(|r| states.contains(&e2b_state(r.state)))
        .filter(|r| filter.iter().all(|(k, v)| r.metadata.get(k) == Some(v)))
        .filter(|r| template.is_none_or(|t| r.template.as_str() == t))
        .collect();
    match q.order.as_deref() {
        None | Some("desc") => {}
        Some("asc") => rows.reverse(),
        Some(other) => {
            return Err(E2bError::bad_request(format!(
                "order {other:.16}: expected asc or desc"
            )))
        }
    }
    Ok(rows)
}

async fn list_v1(
    State(state): State<AppState>,
    caller: Caller,
    Params(q): Params<ListQuery>,
) -> E2bResult<Json<Vec<Value>>> {
    let rows = matching(&state.app, team(&caller), &q, &["running"]).await?;
    Ok(Json(rows.iter().map(listed_json).collect()))
}

async fn list_v2(
    State(state): State<AppState>,
    caller: Caller,
    Params(q): Params<ListQuery>,
) -> E2bResult<Response> {
    let states = parse_states(q.state.as_deref())?;
    let limit = match q.limit {
        None => DEFAULT_PAGE,
        Some(l) if (1..=MAX_PAGE as i64).contains(&l) => l as usize,
        Some(l) => {
            return Err(E2bError::bad_request(format!(
                "limit {l}: expected 1 to {MAX_PAGE}"
            )))
        }
    };
    let rows = matching(&state.app, team(&caller), &q, &states).await?;
    // The token is the last ID of the previous page.
    let start = match q.next_token.as_deref().filter(|t| !t.is_empty()) {
        None => 0,
        Some(t) => {
            let id = parse_id(t)
                .map_err(|_| E2bError::bad_request("nextToken is not a token this API gave out"))?;
            rows.iter()
                .position(|r| r.id == id)
                .map(|i| i + 1)
                .ok_or_else(|| {
                    E2bError::bad_request("nextToken is stale: list again from the start")
                })?
        }
    };
    let page: Vec<&SandboxRow> = rows.iter().skip(start).take(limit).collect();
    let mut headers = HeaderMap::new();
    if start + page.len() < rows.len() {
        if let Some(last) = page.last() {
            if let Ok(v) = HeaderValue::from_str(last.id.as_str()) {
                headers.insert("x-next-token", v);
            }
        }
    }
    let running = rows
        .iter()
        .filter(|r| e2b_state(r.state) == "running")
        .count();
    if let Ok(v) = HeaderValue::from_str(&running.to_string()) {
        headers.insert("x-total-running", v);
    }
    let body: Vec<Value> = page.into_iter().map(listed_json).collect();
    Ok((headers, Json(body)).into_response())
}

// ----------------------------------------------------------------- one sandbox

async fn detail(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> E2bResult<Json<Value>> {
    let row = live_row(&state.app, team(&caller), &id).await?;
    Ok(Json(detail_json(&state.app, &row).await?))
}

async fn kill(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> E2bResult<StatusCode> {
    let row = live_row(&state.app, team(&caller), &id).await?;
    state.app.delete_sandbox(team(&caller), &row.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    timeout: Option<i64>,
}

async fn set_timeout(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<TimeoutBody>,
) -> E2bResult<StatusCode> {
    let row = live_row(&state.app, team(&caller), &id).await?;
    let t = b
        .timeout
        .ok_or_else(|| E2bError::bad_request("timeout is required (seconds)"))?;
    state
        .app
        .set_sandbox_timeout(team(&caller), &row.id, Some(t))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct RefreshBody {
    duration: Option<i64>,
}

/// Keep-alive: the sandbox lives at least `duration` seconds more (never less than
/// it already would).
async fn refresh(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<RefreshBody>,
) -> E2bResult<StatusCode> {
    let row = live_row(&state.app, team(&caller), &id).await?;
    let d = b.duration.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(0..=3600).contains(&d) {
        return Err(E2bError::bad_request(format!(
            "duration {d}: expected 0 to 3600 seconds"
        )));
    }
    extend(&state.app, team(&caller), &row, d).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Make a running sandbox live at least `seconds` from now.
async fn extend(app: &App, team: TeamId, row: &SandboxRow, seconds: i64) -> E2bResult<SandboxRow> {
    let left = (row.expires_at - Utc::now()).num_seconds();
    if left >= seconds || seconds == 0 {
        return Ok(row.clone());
    }
    Ok(app
        .set_sandbox_timeout(team, &row.id, Some(seconds))
        .await?)
}

async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> E2bResult<StatusCode> {
    let row = live_row(&state.app, team(&caller), &id).await?;
    if row.state == SandboxState::Paused {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} is already paused", row.id),
        ));
    }
    state.app.pause_sandbox(team(&caller), &row.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResumeBody {
    timeout: Option<i64>,
    auto_pause: Option<bool>,
}

async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<ResumeBody>,
) -> E2bResult<Response> {
    let row = live_row(&state.app, team(&caller), &id).await?;
    if b.auto_pause.is_some() {
        tracing::debug!(sandbox_id = %row.id, "resume: autoPause is kept from the create");
    }
    if row.state != SandboxState::Paused {
        return Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("sandbox {} is already running", row.id),
        ));
    }
    let row = state
        .app
        .resume_sandbox(
            team(&caller),
            &row.id,
            Some(b.timeout.unwrap_or(DEFAULT_TIMEOUT_S)),
        )
        .await?;
    let body = sandbox_json(&state.app, &row).await?;
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Running: its lifetime is only extended (200). Paused: resumed (201).
async fn connect(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<ResumeBody>,
) -> E2bResult<Response> {
    let team = team(&caller);
    let row = live_row(&state.app, team, &id).await?;
    let timeout = b.timeout.unwrap_or(DEFAULT_TIMEOUT_S);
    let (status, row) = if row.state == SandboxState::Paused {
        let row = state
            .app
            .resume_sandbox(team, &row.id, Some(timeout))
            .await?;
        (StatusCode::CREATED, row)
    } else {
        (
            StatusCode::OK,
            extend(&state.app, team, &row, timeout).await?,
        )
    };
    let body = sandbox_json(&state.app, &row).await?;
    Ok((status, Json(body)).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct ForkBody {
    count: Option<i64>,
    timeout: Option<i64>,
}

/// Running copies of a running sandbox. hearth forks all or none, so on success every
/// result carries a sandbox; a failure is the whole call's error.
async fn fork(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<ForkBody>,
) -> E2bResult<Response> {
    let team = team(&caller);
    let row = live_row(&state.app, team, &id).await?;
    let copies = state
        .app
        .fork_sandbox(team, &row.id, Some(b.count.unwrap_or(1)))
        .await?;
    let mut out = Vec::with_capacity(copies.len());
    for copy in &copies {
        let copy = match b.timeout {
            Some(t) => extend(&state.app, team, copy, t).await?,
            None => copy.clone(),
        };
        out.push(json!({ "sandbox": sandbox_json(&state.app, &copy).await? }));
    }
    Ok((StatusCode::CREATED, Json(Value::Array(out))).into_response())
}

// ----------------------------------------------------------------- logs, metrics

#[derive(Debug, Default, Deserialize)]
struct LogsQuery {
    limit: Option<i64>,
}

async fn console(
    app: &Arc<App>,
    team: TeamId,
    id: &str,
    limit: Option<i64>,
) -> E2bResult<Vec<(i64, String)>> {
    let row = live_row(app, team, id).await?;
    let limit = match limit {
        None => 100,
        Some(l) if (1..=MAX_LOG_LINES as i64).contains(&l) => l as usize,
        Some(l) => {
            return Err(E2bError::bad_request(format!(
                "limit {l}: expected 1 to {MAX_LOG_LINES}"
            )))
        }
    };
    if row.state != SandboxState::Running {
        return Ok(Vec::new());
    }
    Ok(app.sandbox_console(&row, limit).await?)
}

fn ms_rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(String::new, rfc3339)
}

/// E2B's structured log entries for console lines.
fn log_entries(lines: &[(i64, String)]) -> Vec<Value> {
    lines
        .iter()
        .map(|(ts, line)| {
            json!({"timestamp": ms_rfc3339(*ts), "level": "info", "message": line,
                   "fields": {"source": "console"}})
        })
        .collect()
}

async fn logs_v1(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Params(q): Params<LogsQuery>,
) -> E2bResult<Json<Value>> {
    let lines = console(&state.app, team(&caller), &id, q.limit).await?;
    let logs: Vec<Value> = lines
        .iter()
        .map(|(ts, line)| json!({"timestamp": ms_rfc3339(*ts), "line": line}))
        .collect();
    Ok(Json(
        json!({ "logs": logs, "logEntries": log_entries(&lines) }),
    ))
}

async fn logs_v2(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Params(q): Params<LogsQuery>,
) -> E2bResult<Json<Value>> {
    let lines = console(&state.app, team(&caller), &id, q.limit).await?;
    Ok(Json(json!({ "logs": log_entries(&lines) })))
}

#[derive(Debug, Default, Deserialize)]
struct MetricsQuery {
    start: Option<i64>,
    end: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
struct ManyMetricsQuery {
    sandbox_ids: Option<String>,
}

/// Most sandboxes one `GET /sandboxes/metrics` may name.
const MAX_METRICS_IDS: usize = 100;

/// E2B's `SandboxMetric` of one sample.
fn metric_json(m: &SandboxMetrics) -> Value {
    let ts = DateTime::<Utc>::from_timestamp(m.timestamp_unix, 0).unwrap_or_default();
    json!({
        "timestamp": rfc3339(ts),
        "timestampUnix": m.timestamp_unix,
        "cpuCount": m.cpu_count,
        "cpuUsedPct": m.cpu_used_pct,
        "memUsed": m.mem_used,
        "memTotal": m.mem_total,
        "memCache": m.mem_cache,
        "diskUsed": m.disk_used,
        "diskTotal": m.disk_total,
    })
}

/// hearth keeps no history of samples: the answer is the sample taken now, when now
/// lies in the asked window (`start`/`end`, unix seconds); a paused sandbox has none.
async fn metrics(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Params(q): Params<MetricsQuery>,
) -> E2bResult<Json<Value>> {
    let row = live_row(&state.app, team(&caller), &id).await?;
    if let (Some(s), Some(e)) = (q.start, q.end) {
        if s > e {
            return Err(E2bError::bad_request(format!("start {s} is after end {e}")));
        }
    }
    let now = Utc::now().timestamp();
    let in_window = q.start.is_none_or(|s| s <= now) && q.end.is_none_or(|e| now <= e);
    if row.state != SandboxState::Running || !in_window {
        return Ok(Json(json!([])));
    }
    let m = state.app.sandbox_metrics(&row).await?;
    Ok(Json(json!([metric_json(&m)])))
}

/// Guests asked at once by one `GET /sandboxes/metrics`.
const METRICS_FAN_OUT: usize = 8;

/// The current sample of each named running sandbox of the team. Others (unknown,
/// another team's, paused, or a guest that gave no valid sample) are left out.
async fn metrics_many(
    State(state): State<AppState>,
    caller: Caller,
    Params(q): Params<ManyMetricsQuery>,
) -> E2bResult<Json<Value>> {
    let ids: std::collections::BTreeSet<&str> = q
        .sandbox_ids
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if ids.is_empty() || ids.len() > MAX_METRICS_IDS {
        return Err(E2bError::bad_request(format!(
            "sandbox_ids: name 1 to {MAX_METRICS_IDS} sandboxes, comma-separated"
        )));
    }
    let mut rows = Vec::with_capacity(ids.len());
    for id in ids {
        match live_row(&state.app, team(&caller), id).await {
            Ok(row) if row.state == SandboxState::Running => rows.push(row),
            Ok(_) => {}
            Err(e) if e.status == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    let app = &state.app;
    let samples: Vec<(String, Value)> = futures::stream::iter(rows)
        .map(|row| async move {
            match app.sandbox_metrics(&row).await {
                Ok(m) => Some((row.id.to_string(), metric_json(&m))),
                Err(e) => {
                    tracing::debug!(sandbox_id = %row.id, error = %e, "no metrics sample");
                    None
                }
            }
        })
        .buffer_unordered(METRICS_FAN_OUT)
        .filter_map(std::future::ready)
        .collect()
        .await;
    let out: serde_json::Map<String, Value> = samples.into_iter().collect();
    Ok(Json(json!({ "sandboxes": out })))
}

// ----------------------------------------------------------------- snapshots, templates

#[derive(Debug, Default, Deserialize)]
struct SnapshotBody {
    name: Option<String>,
}

async fn snapshot(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Body(b): Body<SnapshotBody>,
) -> E2bResult<Response> {
    let row = live_row(&state.app, team(&caller), &id).await?;
    let name = match b.name.filter(|n| !n.trim().is_empty()) {
        Some(n) => n,
        None => format!("snapshot-{}", &row.id.as_str()[3..]),
    };
    let t = state
        .app
        .snapshot_sandbox(team(&caller), &row.id, &name, true)
        .await?;
    Ok((StatusCode::CREATED, Json(snapshot_json(&t))).into_response())
}

fn snapshot_json(t: &Template) -> Value {
    json!({ "snapshotID": t.name.to_string(), "names": [t.name.to_string()] })
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotsQuery {
    #[serde(rename = "sandboxID")]
    sandbox_id: Option<String>,
    name: Option<String>,
}

async fn list_snapshots(
    State(state): State<AppState>,
    caller: Caller,
    Params(q): Params<SnapshotsQuery>,
) -> E2bResult<Json<Vec<Value>>> {
    let all = state.app.list_templates(team(&caller)).await?;
    let out = all
        .iter()
        .filter(|t| t.team_id == team(&caller) && t.has_memory)
        .filter(|t| {
            q.sandbox_id.as_deref().is_none_or(|s| {
                t.source_sandbox_id
                    .as_ref()
                    .is_some_and(|x| x.as_str() == s)
            })
        })
        .filter(|t| q.name.as_deref().is_none_or(|n| t.name.as_str() == n))
        .map(snapshot_json)
        .collect();
    Ok(Json(out))
}

async fn list_templates(
    State(state): State<AppState>,
    caller: Caller,
) -> E2bResult<Json<Vec<Value>>> {
    let all = state.app.list_templates(team(&caller)).await?;
    let out = all
        .iter()
        .map(|t| {
            let public = t.team_id != team(&caller);
            let aliases: Vec<&str> = if t.name.as_str() == BASE_TEMPLATE {
                vec![BASE_ALIAS, BASE_TEMPLATE]
            } else {
                vec![t.name.as_str()]
            };
            json!({
                "templateID": t.name.to_string(),
                "buildID": t.name.to_string(),
                "cpuCount": t.vcpus.max(1),
                "memoryMB": if t.memory_mb == 0 { 256 } else { t.memory_mb },
                "diskSizeMB": t.disk_size_mb,
                "public": public,
                "aliases": aliases,
                "names": aliases,
                "createdAt": rfc3339(t.created_at),
                "updatedAt": rfc3339(t.created_at),
                "createdBy": Value::Null,
                "lastSpawnedAt": Value::Null,
                "spawnCount": 0,
                "buildCount": 1,
                "envdVersion": hearth_types::ENVD_VERSION,
                "buildStatus": "ready",
            })
        })
        .collect();
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_decode_and_refuse_garbage() {
        let f = parse_metadata_filter("user=abc&app=my%20app&x=a%3Db").unwrap();
        assert_eq!(
            f,
            vec![
                ("user".into(), "abc".into()),
                ("app".into(), "my app".into()),
                ("x".into(), "a=b".into())
            ]
        );
        assert!(parse_metadata_filter("novalue").is_err());
        assert!(parse_metadata_filter("k=%zz").is_err());
        assert!(parse_metadata_filter("k=%ff").is_err(), "not UTF-8");
        assert!(parse_metadata_filter("").unwrap().is_empty());
    }

    #[test]
    fn states_and_paths() {
        assert_eq!(parse_states(None).unwrap(), vec!["running", "paused"]);
        assert_eq!(parse_states(Some("paused")).unwrap(), vec!["paused"]);
        assert!(parse_states(Some("stopped")).is_err());
        assert!(is_e2b_path("/sandboxes"));
        assert!(is_e2b_path("/v2/sandboxes/x/connect"));
        assert!(is_e2b_path("/templates/abc/builds"));
        assert!(!is_e2b_path("/v1/sandboxes"));
        assert!(!is_e2b_path("/"));
    }
}

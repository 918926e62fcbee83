//! Handlers of the REST API. Parse, call `app`, shape the response.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;

use super::error::{ApiError, ErrorBody};
use super::reject::ApiJsonOrEmpty;
use super::types::*;
use super::{ApiJson, AppState, Caller};
use crate::app::hosts::{HostError, ProcEvent};
use crate::app::sandboxes::parse_id;
use crate::app::AppError;

type ApiResult<T> = Result<T, ApiError>;

#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandboxRequest,
    responses((status = 201, body = Sandbox), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateSandboxRequest>,
) -> ApiResult<(StatusCode, Json<Sandbox>)> {
    let row = s.app.create_sandbox(caller.team_id, req.into()).await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[utoipa::path(get, path = "/v1/sandboxes", params(ListQuery),
    responses((status = 200, body = SandboxList), (status = 400, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_sandboxes(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<SandboxList>> {
    let page = s.app.list_sandboxes(caller.team_id, q.into()).await?;
    Ok(Json(SandboxList {
        sandboxes: page.sandboxes.into_iter().map(Into::into).collect(),
        next_token: page.next_token,
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Sandbox>> {
    let id = parse_id(&id)?;
    Ok(Json(s.app.get_sandbox(caller.team_id, &id).await?.into()))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = parse_id(&id)?;
    s.app.delete_sandbox(caller.team_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", params(("id" = String, Path)),
    request_body = ExecRequest,
    responses((status = 200, body = ExecResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn exec(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let id = parse_id(&id)?;
    if req.pty.is_some() {
        return Err(AppError::InvalidArgument(
            "pty is only supported on the WebSocket exec".into(),
        )
        .into());
    }
    let out = s.app.exec(caller.team_id, &id, req.into()).await?;
    Ok(Json(out.into()))
}

/// The `path` (required) and `user` (default root) of a file request.
fn file_target(q: FileQuery) -> ApiResult<(String, String)> {
    let path = q
        .path
        .ok_or_else(|| AppError::InvalidArgument("query parameter path is required".into()))?;
    Ok((path, q.user.unwrap_or_else(|| "root".to_string())))
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", params(("id" = String, Path), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = FileWritten), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn upload_file(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult<Json<FileWritten>> {
    let id = parse_id(&id)?;
    let (path, user) = file_target(q)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let size = s
        .app
        .upload_file(
            caller.team_id,
            &id,
            &path,
            &user,
            declared,
            body.into_data_stream(),
        )
        .await?;
    Ok(Json(FileWritten { path, size }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", params(("id" = String, Path), FileQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn download_file(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let (path, user) = file_target(q)?;
    let (len, stream) = s
        .app
        .download_file(caller.team_id, &id, &path, &user)
        .await?;
    let mut resp =
        Body::from_stream(stream.map(|r| r.map_err(std::io::Error::other))).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, len.into());
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/v1/templates", responses((status = 200, body = TemplateList)),
    security(("api_key" = [])))]
pub async fn list_templates(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<TemplateList>> {
    let list = s.app.list_templates(caller.team_id).await?;
    Ok(Json(TemplateList {
        templates: list.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn pause_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Sandbox>> {
    let id = parse_id(&id)?;
    Ok(Json(s.app.pause_sandbox(caller.team_id, &id).await?.into()))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", params(("id" = String, Path)),
    request_body(content = ResumeRequest, description = "Optional."),
    responses((status = 200, body = Sandbox), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn resume_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJsonOrEmpty(req): ApiJsonOrEmpty<ResumeRequest>,
) -> ApiResult<Json<Sandbox>> {
    let id = parse_id(&id)?;
    let row = s
        .app
        .resume_sandbox(caller.team_id, &id, req.timeout_s)
        .await?;
    Ok(Json(row.into()))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", params(("id" = String, Path)),
    request_body = TimeoutRequest,
    responses((status = 200, body = Sandbox), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn set_timeout(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<TimeoutRequest>,
) -> ApiResult<Json<Sandbox>> {
    let id = parse_id(&id)?;
    let row = s
        .app
        .set_sandbox_timeout(caller.team_id, &id, req.timeout_s)
        .await?;
    Ok(Json(row.into()))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshots", params(("id" = String, Path)),
    request_body = SnapshotRequest,
    responses((status = 201, body = TemplateInfo), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn snapshot_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<SnapshotRequest>,
) -> ApiResult<(StatusCode, Json<TemplateInfo>)> {
    let id = parse_id(&id)?;
    let t = s
        .app
        .snapshot_sandbox(caller.team_id, &id, &req.name, req.memory)
        .await?;
    Ok((StatusCode::CREATED, Json(t.into())))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", params(("id" = String, Path)),
    request_body(content = ForkRequest, description = "Optional."),
    responses((status = 201, body = ForkResponse), (status = 409, body = ErrorBody),
        (status = 429, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn fork_sandbox(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJsonOrEmpty(req): ApiJsonOrEmpty<ForkRequest>,
) -> ApiResult<(StatusCode, Json<ForkResponse>)> {
    let id = parse_id(&id)?;
    let rows = s.app.fork_sandbox(caller.team_id, &id, req.count).await?;
    Ok((
        StatusCode::CREATED,
        Json(ForkResponse {
            sandboxes: rows.into_iter().map(Into::into).collect(),
        }),
    ))
}

#[utoipa::path(get, path = "/v1/templates/{name}", params(("name" = String, Path)),
    responses((status = 200, body = TemplateInfo), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "No such template, or another team's.")),
    security(("api_key" = [])))]
pub async fn get_template(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<TemplateInfo>> {
    Ok(Json(
        s.app.get_template(caller.team_id, &name).await?.into(),
    ))
}

#[utoipa::path(delete, path = "/v1/templates/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody,
            description = "A platform template, and the key is not an admin's."),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete_template(
    State(s): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.app.delete_template(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", params(("id" = String, Path)),
    responses((status = 200, body = ProcessList), (status = 409, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_processes(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ProcessList>> {
    let id = parse_id(&id)?;
    let list = s.app.list_processes(caller.team_id, &id).await?;
    Ok(Json(ProcessList {
        processes: list.into_iter().map(Into::into).collect(),
    }))
}

/// One NDJSON line of a process stream.
fn event_line(ev: Result<ProcEvent, HostError>) -> Bytes {
    let b64 = base64::engine::general_purpose::STANDARD;
    let v = match ev {
        Ok(ProcEvent::Started { pid }) => json!({"type": "started", "pid": pid}),
        Ok(ProcEvent::Stdout(d) | ProcEvent::Pty(d)) => {
            json!({"type": "stdout", "data": b64.encode(d)})
        }
        Ok(ProcEvent::Stderr(d)) => json!({"type": "stderr", "data": b64.encode(d)}),
        Ok(ProcEvent::Exited { exit_code, .. }) => json!({"type": "exit", "exit_code": exit_code}),
        Err(e) => {
            let body = ApiError(AppError::Host {
                context: "the process stream failed".into(),
                source: e,
            })
            .body();
            json!({"type": "error", "error": {"code": body.error.code, "message": body.error.message}})
        }
    };
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    Bytes::from(line)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{pid}/connect",
    params(("id" = String, Path), ("pid" = u32, Path), ConnectQuery),
    responses((status = 200, content_type = "application/x-ndjson",
        description = "One JSON object a line, as the exec WebSocket's server frames: \
            started, stdout/stderr (base64 data), exit, error; ends with exit or error."),
        (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn connect_process(
    State(s): State<AppState>,
    caller: Caller,
    Path((id, pid)): Path<(String, String)>,
    Query(q): Query<ConnectQuery>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let pid: u32 = pid.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
        AppError::InvalidArgument(format!(
            "pid must be a process ID, got {:?}",
            pid.chars().take(20).collect::<String>()
        ))
    })?;
    let events = s
        .app
        .process_connect(caller.team_id, &id, pid, q.timeout_s)
        .await?;
    let body = events.map(|ev| Ok::<_, std::convert::Infallible>(event_line(ev)));
    let mut resp = Body::from_stream(body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/metrics", params(("id" = String, Path)),
    responses((status = 200, body = SandboxMetricsInfo)),
    security(("api_key" = [])))]
pub async fn sandbox_metrics(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxMetricsInfo>> {
    let id = parse_id(&id)?;
    let row = s.app.get_sandbox(caller.team_id, &id).await?;
    if row.state != hearth_db::SandboxState::Running {
        return Err(AppError::Conflict(format!(
            "sandbox is {}: only a running sandbox has metrics",
            row.state
        ))
        .into());
    }
    Ok(Json(s.app.sandbox_metrics(&row).await?.into()))
}

#[utoipa::path(post, path = "/v1/keys", request_body = CreateKeyRequest,
    responses((status = 201, body = CreatedKey),
        (status = 403, body = ErrorBody, description = "is_admin asked by a key that is not an admin's.")),
    security(("api_key" = [])))]
pub async fn create_key(
    State(s): State<AppState>,
    caller: Caller,
    ApiJsonOrEmpty(req): ApiJsonOrEmpty<CreateKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let (key, secret) = s
        .app
        .create_key(&caller, caller.team_id, req.into())
        .await?;
    Ok(created_key(key, secret))
}

#[utoipa::path(get, path = "/v1/keys",
    responses((status = 200, body = KeyList)),
    security(("api_key" = [])))]
pub async fn list_keys(State(s): State<AppState>, caller: Caller) -> ApiResult<Json<KeyList>> {
    let keys = s.app.list_keys(&caller).await?;
    Ok(Json(KeyList {
        keys: keys.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/keys/{key_id}", params(("key_id" = String, Path)),
    responses((status = 200, body = ApiKeyInfo, description = "The key, now revoked."),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "No such key in this team."),
        (status = 409, body = ErrorBody, description = "The last working admin key.")),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(s): State<AppState>,
    caller: Caller,
    Path(key_id): Path<String>,
) -> ApiResult<Json<ApiKeyInfo>> {
    let mine = hearth_db::Principal {
        is_admin: false,
        ..(*caller).clone()
    };
    Ok(Json(s.app.revoke_key(&mine, &key_id).await?.into()))
}

#[utoipa::path(get, path = "/v1/admin/teams",
    responses((status = 200, body = TeamList), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn admin_list_teams(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<TeamList>> {
    let teams = s.app.list_teams(&caller).await?;
    Ok(Json(TeamList {
        teams: teams.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(post, path = "/v1/admin/teams", request_body = CreateTeamRequest,
    responses((status = 201, body = TeamInfo), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A team of that name exists.")),
    security(("api_key" = [])))]
pub async fn admin_create_team(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateTeamRequest>,
) -> ApiResult<(StatusCode, Json<TeamInfo>)> {
    let team = s.app.create_team(&caller, &req.name).await?;
    Ok((StatusCode::CREATED, Json(team.into())))
}

#[utoipa::path(get, path = "/v1/admin/teams/{team_id}/keys", params(("team_id" = String, Path)),
    responses((status = 200, body = KeyList), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn admin_list_team_keys(
    State(s): State<AppState>,
    caller: Caller,
    Path(team_id): Path<String>,
) -> ApiResult<Json<KeyList>> {
    let keys = s.app.list_team_keys(&caller, &team_id).await?;
    Ok(Json(KeyList {
        keys: keys.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(post, path = "/v1/admin/teams/{team_id}/keys", params(("team_id" = String, Path)),
    request_body = CreateKeyRequest,
    responses((status = 201, body = CreatedKey), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn admin_create_team_key(
    State(s): State<AppState>,
    caller: Caller,
    Path(team_id): Path<String>,
    ApiJsonOrEmpty(req): ApiJsonOrEmpty<CreateKeyRequest>,
) -> ApiResult<(StatusCode, Json<CreatedKey>)> {
    let (key, secret) = s
        .app
        .admin_create_key(&caller, &team_id, req.into())
        .await?;
    Ok(created_key(key, secret))
}

#[utoipa::path(delete, path = "/v1/admin/keys/{key_id}", params(("key_id" = String, Path)),
    responses((status = 200, body = ApiKeyInfo, description = "The key, now revoked."),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "The last working admin key.")),
    security(("api_key" = [])))]
pub async fn admin_revoke_key(
    State(s): State<AppState>,
    caller: Caller,
    Path(key_id): Path<String>,
) -> ApiResult<Json<ApiKeyInfo>> {
    Ok(Json(s.app.admin_revoke_key(&caller, &key_id).await?.into()))
}

#[utoipa::path(get, path = "/v1/admin/templates",
    responses((status = 200, body = TemplateList), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn admin_list_templates(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<TemplateList>> {
    let list = s.app.list_all_templates(&caller).await?;
    Ok(Json(TemplateList {
        templates: list.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/audit", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_audit(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    let page = s.app.list_audit(caller.team_id, q.before, q.limit).await?;
    Ok(Json(AuditPage {
        entries: page.entries.into_iter().map(Into::into).collect(),
        next_before: page.next_before,
    }))
}

#[utoipa::path(get, path = "/v1/events", params(EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event ID.")),
    responses((status = 200, content_type = "text/event-stream",
        description = "Server-sent events, one per audit entry of the team as it is written \
            (`id`: the entry ID, `event`: its action, `data`: the entry as in GET /v1/audit); \
            comments keep the connection alive. Reconnect with Last-Event-ID to miss nothing."),
        (status = 400, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "The team has its maximum of event streams open.")),
    security(("api_key" = [])))]
pub async fn events(
    State(s): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    Query(q): Query<EventsQuery>,
) -> ApiResult<Response> {
    let after = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    AppError::InvalidArgument("Last-Event-ID must be an event ID".into())
                })?,
        ),
        None => q.after,
    };
    let stream = s.app.open_events(caller.team_id, after).await?;
    let events = futures::stream::unfold(stream, |mut stream| async move {
        let entry = stream.next().await?;
        let action = entry.action.clone();
        let id = entry.id;
        let data = serde_json::to_string(&AuditEntryInfo::from(entry)).unwrap_or_default();
        let ev = axum::response::sse::Event::default()
            .id(id.to_string())
            .event(action)
            .data(data);
        Some((Ok::<_, std::convert::Infallible>(ev), stream))
    });
    Ok(axum::response::sse::Sse::new(events)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

/// 201 with a new key and its secret (shown this once).
fn created_key(key: hearth_db::ApiKey, secret: String) -> (StatusCode, Json<CreatedKey>) {
    (
        StatusCode::CREATED,
        Json(CreatedKey {
            key: key.into(),
            secret,
        }),
    )
}

//! envd's plain HTTP endpoints: `GET /health`, `GET|POST /files`, `POST /init`, `GET /envs`,
//! and the app that puts them in front of the Connect services.
//!
//! Uploads are streamed to disk chunk by chunk (no whole-file buffering); errors are
//! `{"code":N,"message":...}` as envd sends them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::fs::{chown, create_dirs_for, FsError};
use crate::state::{resolve_path, user_from_basic_auth, AgentState};
use crate::users::User;

/// Builds the whole guest agent app: HTTP endpoints, Connect services as fallback.
pub fn app(state: AgentState) -> axum::Router {
    let connect = connectrpc::Router::new()
        .add_service(Arc::new(crate::process::ProcessService {
            state: state.clone(),
        }))
        .add_service(Arc::new(crate::fs::FilesystemService {
            state: state.clone(),
        }));
    axum::Router::new()
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
        .route("/files", get(download).post(upload))
        .route("/init", post(init))
        .route("/envs", get(envs))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
        .fallback_service(connect.into_axum_service())
}

/// An error answered as envd does.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.status.as_u16(), "message": self.message});
        (self.status, Json(body)).into_response()
    }
}

impl From<FsError> for HttpError {
    fn from(e: FsError) -> Self {
        use connectrpc::ErrorCode as C;
        let status = match e.code() {
            C::NotFound => StatusCode::NOT_FOUND,
            C::PermissionDenied => StatusCode::FORBIDDEN,
            C::InvalidArgument | C::AlreadyExists => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError::new(status, e.message())
    }
}

#[derive(Debug, Deserialize)]
pub struct FileQuery {
    path: Option<String>,
    username: Option<String>,
}

fn query_user(state: &AgentState, q: &FileQuery, headers: &HeaderMap) -> Result<User, HttpError> {
    let name = q.username.clone().or_else(|| {
        user_from_basic_auth(
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        )
    });
    state
        .user(name.as_deref())
        .map_err(|e| HttpError::new(StatusCode::UNAUTHORIZED, e.to_string()))
}

async fn download(
    State(state): State<AgentState>,
    Query(q): Query<FileQuery>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let user = query_user(&state, &q, &headers)?;
    let Some(path) = q.path.as_deref().filter(|p| !p.is_empty()) else {
        return Err(HttpError::new(StatusCode::BAD_REQUEST, "path is required"));
    };
    let path = resolve_path(&user, path);
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|e| FsError::io("stat", &path, e))?;
    if meta.is_dir() {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            format!("{} is a directory", path.display()),
        ));
    }
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| FsError::io("open", &path, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', ""))
        .unwrap_or_default();
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, meta.len().to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

/// One written file, as envd answers an upload.
#[derive(Debug, Serialize)]
pub struct EntryRef {
    path: String,
    name: String,
    r#type: &'static str,
}

async fn open_for_write(user: &User, path: &Path) -> Result<tokio::fs::File, FsError> {
    if let Some(parent) = path.parent() {
        create_dirs_for(user, parent)?;
    }
    if tokio::fs::metadata(path)
        .await
        .map(|m| m.is_dir())
        .unwrap_or(false)
    {
        return Err(FsError::InvalidArgument {
            message: format!("{} is a directory", path.display()),
        });
    }
    let existed = tokio::fs::symlink_metadata(path).await.is_ok();
    let f = tokio::fs::File::create(path)
        .await
        .map_err(|e| FsError::io("create", path, e))?;
    if !existed {
        chown(user, path);
    }
    Ok(f)
}

fn entry_ref(path: &Path) -> EntryRef {
    EntryRef {
        path: path.display().to_string(),
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        r#type: "file",
    }
}

async fn upload(
    State(state): State<AgentState>,
    Query(q): Query<FileQuery>,
    request: Request,
) -> Result<Json<Vec<EntryRef>>, HttpError> {
    let user = query_user(&state, &q, request.headers())?;
    let target: Option<PathBuf> = q
        .path
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(|p| resolve_path(&user, p));
    let is_multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));

    let mut written = Vec::new();
    if is_multipart {
        let mut mp = <Multipart as axum::extract::FromRequest<()>>::from_request(request, &())
            .await
            .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        while let Some(mut field) = mp
            .next_field()
            .await
            .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.body_text()))?
        {
            let path = match (&target, field.file_name()) {
                (Some(t), _) if written.is_empty() => t.clone(),
                (_, Some(name)) if !name.is_empty() => resolve_path(&user, name),
                _ => continue,
            };
            let mut f = open_for_write(&user, &path).await?;
            while let Some(chunk) = field
                .chunk()
                .await
                .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.body_text()))?
            {
                f.write_all(&chunk)
                    .await
                    .map_err(|e| FsError::io("write", &path, e))?;
            }
            f.flush()
                .await
                .map_err(|e| FsError::io("write", &path, e))?;
            written.push(entry_ref(&path));
        }
        if written.is_empty() {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "multipart upload without a file",
            ));
        }
    } else {
        let Some(path) = target else {
            return Err(HttpError::new(StatusCode::BAD_REQUEST, "path is required"));
        };
        let mut f = open_for_write(&user, &path).await?;
        let mut body = request.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
            f.write_all(&chunk)
                .await
                .map_err(|e| FsError::io("write", &path, e))?;
        }
        f.flush()
            .await
            .map_err(|e| FsError::io("write", &path, e))?;
        written.push(entry_ref(&path));
    }
    Ok(Json(written))
}

/// Body of `POST /init`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InitRequest {
    env_vars: Option<std::collections::HashMap<String, String>>,
    access_token: Option<String>,
    timestamp: Option<String>,
    default_user: Option<String>,
    default_workdir: Option<String>,
}

async fn init(
    State(state): State<AgentState>,
    body: Option<Json<InitRequest>>,
) -> Result<StatusCode, HttpError> {
    let Json(req) = body.unwrap_or_default();
    if let Some(ts) = req.timestamp.as_deref() {
        set_clock_forward(ts)?;
    }
    let mut d = state.defaults.write().unwrap_or_else(|p| p.into_inner());
    if let Some(env) = req.env_vars {
        d.env.extend(env);
    }
    if let Some(t) = req.access_token {
        d.access_token = Some(t);
    }
    if let Some(u) = req.default_user.filter(|u| !u.is_empty()) {
        crate::users::lookup(&u)
            .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        d.user = u;
    }
    if let Some(w) = req.default_workdir.filter(|w| !w.is_empty()) {
        d.workdir = Some(PathBuf::from(w));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Sets the system clock to `ts` (RFC 3339) when that is later than now (after a resume
/// the guest clock lags behind).
fn set_clock_forward(ts: &str) -> Result<(), HttpError> {
    let t = chrono::DateTime::parse_from_rfc3339(ts)
        .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, format!("bad timestamp: {e}")))?;
    let now = chrono::Utc::now();
    if t.with_timezone(&chrono::Utc) <= now {
        return Ok(());
    }
    let spec = libc::timespec {
        tv_sec: t.timestamp(),
        tv_nsec: i64::from(t.timestamp_subsec_nanos()),
    };
    // SAFETY: clock_settime reads one timespec from a pointer valid for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &spec) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot set the clock");
    }
    Ok(())
}

async fn envs(State(state): State<AgentState>) -> Json<std::collections::HashMap<String, String>> {
    Json(state.defaults().env)
}

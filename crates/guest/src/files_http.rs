//! envd's plain HTTP endpoints: `GET /health`, `GET|POST /files`, `POST /init`, `GET /envs`,
//! `GET /metrics` ([`crate::metrics`]),
//! and the app that puts them in front of the Connect services.
//!
//! Files are opened with the requesting user's permissions ([`crate::as_user`]) and then
//! streamed: uploads chunk by chunk (no whole-file buffering), downloads to end of file
//! (never trusting the size `stat` gives, which is wrong for /proc and /sys). Only regular
//! files are read or written; directories, FIFOs, sockets and devices are refused without
//! ever blocking on them. Errors are `{"code":N,"message":...}` as envd sends them.
//! Everything but `GET /health` and `POST /init` needs the access token ([`crate::auth`]).

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::as_user::run_as;
use crate::fs::{create_dirs, FsError};
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
        // As envd: gzip request bodies (`Content-Encoding: gzip`, what E2B's SDKs send
        // with `gzip=True`) are inflated before the upload sees them, other encodings
        // are a 415; downloads are gzipped when the client accepts it.
        .route(
            "/files",
            get(download)
                .layer(tower_http::compression::CompressionLayer::new())
                .post(upload)
                .layer(tower_http::decompression::RequestDecompressionLayer::new()),
        )
        .route("/init", post(init))
        .route("/envs", get(envs))
        .route("/sync", post(sync_disks))
        .route("/metrics", get(crate::metrics::handler))
        .method_not_allowed_fallback(|| async {
            HttpError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(DefaultBodyLimit::disable())
        .fallback_service(connect.into_axum_service())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_token,
        ))
        .with_state(state)
}

/// Largest `POST /init` body accepted.
pub const MAX_INIT_BODY: usize = 1024 * 1024;

/// An error answered as envd does.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
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
            C::ResourceExhausted => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError::new(status, e.message())
    }
}

fn bad_query(e: QueryRejection) -> HttpError {
    HttpError::new(StatusCode::BAD_REQUEST, e.body_text())
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

/// What a path is, in words for an error message, when it is not a regular file.
fn not_regular(ft: std::fs::FileType) -> Option<&'static str> {
    if ft.is_file() {
        None
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_block_device() || ft.is_char_device() {
        Some("a device")
    } else {
        Some("not a regular file")
    }
}

fn refuse_kind(path: &Path, what: &str) -> FsError {
    FsError::InvalidArgument {
        message: format!("{} is {what}, not a regular file", path.display()),
    }
}

/// Opens a regular file for reading (run it as the user). `O_NONBLOCK` keeps a FIFO
/// swapped in after the `stat` from blocking the open.
fn open_for_read(path: &Path) -> Result<std::fs::File, FsError> {
    let meta = std::fs::metadata(path).map_err(|e| FsError::io("stat", path, e))?;
    if let Some(what) = not_regular(meta.file_type()) {
        return Err(refuse_kind(path, what));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| FsError::io("open", path, e))?;
    let meta = file.metadata().map_err(|e| FsError::io("stat", path, e))?;
    if let Some(what) = not_regular(meta.file_type()) {
        return Err(refuse_kind(path, what));
    }
    Ok(file)
}

async fn download(
    State(state): State<AgentState>,
    q: Result<Query<FileQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let Query(q) = q.map_err(bad_query)?;
    let user = query_user(&state, &q, &headers)?;
    let Some(path) = q.path.as_deref().filter(|p| !p.is_empty()) else {
        return Err(HttpError::new(StatusCode::BAD_REQUEST, "path is required"));
    };
    let path = resolve_path(&user, path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace(['"', '\\', '\r', '\n'], ""))
        .unwrap_or_default();
    let file = run_as(&user, move || open_for_read(&path)).await?;
    // No Content-Length: pseudo-files report sizes unrelated to their content, so the
    // body is streamed (chunked) to end of file.
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        tokio::fs::File::from_std(file),
        64 * 1024,
    ));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
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

/// Creates missing parents and opens `path` for writing (truncating), as `user`: the
/// kernel checks the user's rights, and what is created belongs to the user.
async fn open_for_write(user: &User, path: &Path) -> Result<tokio::fs::File, FsError> {
    let path = path.to_path_buf();
    let file = run_as(user, move || {
        if let Some(parent) = path.parent() {
            create_dirs(parent)?;
        }
        match std::fs::metadata(&path) {
            Ok(m) => {
                if let Some(what) = not_regular(m.file_type()) {
                    return Err(refuse_kind(&path, what));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FsError::io("stat", &path, e)),
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| FsError::io("create", &path, e))?;
        let meta = file.metadata().map_err(|e| FsError::io("stat", &path, e))?;
        if let Some(what) = not_regular(meta.file_type()) {
            return Err(refuse_kind(&path, what));
        }
        Ok(file)
    })
    .await?;
    Ok(tokio::fs::File::from_std(file))
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
    q: Result<Query<FileQuery>, QueryRejection>,
    request: Request,
) -> Result<Json<Vec<EntryRef>>, HttpError> {
    let Query(q) = q.map_err(bad_query)?;
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
    /// hearth's extension: the sandbox's hostname. A sandbox restored from a
    /// warm template or forked wakes up with its source's name; this gives it
    /// its own.
    hostname: Option<String>,
}

/// Whether `name` is a hostname we set: 1 to 63 of `[a-z0-9-]`, not starting or
/// ending with `-`.
fn valid_hostname(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

async fn init(State(state): State<AgentState>, request: Request) -> Result<StatusCode, HttpError> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_INIT_BODY)
        .await
        .map_err(|_| {
            HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the /init body is larger than {MAX_INIT_BODY} bytes or was cut off"),
            )
        })?;
    // Never echo the body: it holds the token.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let req: InitRequest = if first.is_none() {
        InitRequest::default()
    } else if first != Some(&b'{') {
        return Err(HttpError::new(
            StatusCode::BAD_REQUEST,
            "the /init body must be a JSON object",
        ));
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            HttpError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the /init body is not a valid init request ({}) at line {} column {}",
                    json_category(&e),
                    e.line(),
                    e.column()
                ),
            )
        })?
    };
    let default_user = match req.default_user.filter(|u| !u.is_empty()) {
        Some(u) => Some(
            crate::users::lookup(&u)
                .map_err(|e| HttpError::new(StatusCode::BAD_REQUEST, e.to_string()))?
                .name,
        ),
        None => None,
    };
    if let Some(h) = req.hostname.as_deref() {
        if !valid_hostname(h) {
            return Err(HttpError::new(
                StatusCode::BAD_REQUEST,
                "hostname must be 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
            ));
        }
    }
    crate::auth::accept_init(&state, &parts.headers, req.access_token)
        .map_err(|e| HttpError::new(e.status(), e.to_string()))?;
    // Only the guest's PID 1 owns the VM's hostname (never a test's host).
    if let Some(h) = req.hostname.as_deref() {
        if std::process::id() == 1 {
            crate::init::set_hostname(h);
        }
    }
    if let Some(ts) = req.timestamp.as_deref() {
        set_clock_forward(ts)?;
    }
    let mut d = state.defaults.write().unwrap_or_else(|p| p.into_inner());
    if let Some(env) = req.env_vars {
        d.env.extend(env);
    }
    if let Some(u) = default_user {
        d.user = u;
    }
    if let Some(w) = req.default_workdir.filter(|w| !w.is_empty()) {
        d.workdir = Some(PathBuf::from(w));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// hearth's extension: flush every filesystem's dirty data to its disk (the host
/// agent calls it before it copies the disk of a running sandbox into a
/// template, so that the copy holds what was written, not only what the kernel
/// had flushed by chance).
async fn sync_disks() -> StatusCode {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    let _ = tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await;
    StatusCode::NO_CONTENT
}

/// Names a JSON error without its text, which can quote the body (and so the token).
fn json_category(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data => "wrong type or value",
        Category::Eof => "unexpected end",
    }
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

#[cfg(test)]
mod tests {
    use super::valid_hostname;

    #[test]
    fn hostnames() {
        for ok in ["sb-abcdefghijklmnop", "a", "x1-2"] {
            assert!(valid_hostname(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "-a", "a-", "A", "a.b", "a b", "a\n", long.as_str()] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }
}

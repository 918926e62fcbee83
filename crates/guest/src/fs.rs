//! The `filesystem.Filesystem` Connect service: stat, list, mkdir, move, remove.
//!
//! Paths are resolved against the calling user's home directory, and every call runs
//! with that user's filesystem permissions ([`crate::as_user`]), so the kernel decides
//! what the user may see and change. Watching is not implemented yet (`Unimplemented`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use connectrpc::{
    ConnectError, ErrorCode, RequestContext, Response, ServiceRequest, ServiceResult, ServiceStream,
};
use hearth_proto::filesystem::{
    watch_dir_response, CreateWatcherRequest, CreateWatcherResponse, EntryInfo, FileType,
    Filesystem, GetWatcherEventsRequest, GetWatcherEventsResponse, ListDirRequest, ListDirResponse,
    MakeDirRequest, MakeDirResponse, MoveRequest, MoveResponse, RemoveRequest, RemoveResponse,
    RemoveWatcherRequest, RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest,
    WatchDirResponse,
};

/// How often a quiet `WatchDir` stream sends a keepalive.
const WATCH_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

use crate::as_user::run_as;
use crate::state::{resolve_path, user_from_basic_auth, AgentState};
use crate::users::{self, User, UserError};

/// Errors of the filesystem service and the /files endpoints.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error("{message}")]
    InvalidArgument { message: String },
    #[error(transparent)]
    User(#[from] UserError),
    #[error("cannot act as the user: {what}")]
    Credentials {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        FsError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The Connect code for this error.
    pub fn code(&self) -> ErrorCode {
        use std::io::ErrorKind as K;
        match self {
            FsError::Io { source, .. } => match (source.raw_os_error(), source.kind()) {
                // A name over 255 bytes, a path over 4096, a symlink loop, a rename into
                // itself or across filesystems: the request is at fault.
                (Some(libc::ENAMETOOLONG | libc::ELOOP | libc::EINVAL | libc::EXDEV), _) => {
                    ErrorCode::InvalidArgument
                }
                (Some(libc::ENOSPC | libc::EDQUOT), _) => ErrorCode::ResourceExhausted,
                (Some(libc::EROFS), _) => ErrorCode::PermissionDenied,
                (_, K::NotFound) => ErrorCode::NotFound,
                (_, K::PermissionDenied) => ErrorCode::PermissionDenied,
                (_, K::AlreadyExists) => ErrorCode::AlreadyExists,
                (
                    _,
                    K::InvalidInput
                    | K::InvalidFilename
                    | K::NotADirectory
                    | K::IsADirectory
                    | K::DirectoryNotEmpty,
                ) => ErrorCode::InvalidArgument,
                _ => ErrorCode::Internal,
            },
            FsError::Credentials { .. } => ErrorCode::Internal,
            FsError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            FsError::InvalidArgument { .. } | FsError::User(_) => ErrorCode::InvalidArgument,
        }
    }

    /// Message with the source chain.
    pub fn message(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }
}

impl From<FsError> for ConnectError {
    fn from(e: FsError) -> Self {
        ConnectError::new(e.code(), e.message())
    }
}

/// `ls -l` style permission string, as Go's `FileMode.String()` prints it.
pub fn permissions_string(mode: u32, ft: std::fs::FileType) -> String {
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_symlink() {
        'L'
    } else {
        '-'
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// Builds an [`EntryInfo`] for a path (without following a final symlink).
pub fn entry_info(path: &Path) -> Result<EntryInfo, FsError> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| FsError::io("stat", path, e))?;
    let ft = meta.file_type();
    let (kind, symlink_target) = if ft.is_symlink() {
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .ok();
        // E2B reports the type of what the link points to.
        let kind = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => FileType::FILE_TYPE_DIRECTORY,
            _ => FileType::FILE_TYPE_FILE,
        };
        (kind, target)
    } else if ft.is_dir() {
        (FileType::FILE_TYPE_DIRECTORY, None)
    } else {
        (FileType::FILE_TYPE_FILE, None)
    };
    let mode = meta.permissions().mode() & 0o7777;
    Ok(EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        r#type: kind.into(),
        path: path.display().to_string(),
        size: i64::try_from(meta.len()).unwrap_or(i64::MAX),
        mode,
        permissions: permissions_string(mode, ft),
        owner: users::user_name(meta.uid()),
        group: users::group_name(meta.gid()),
        modified_time: buffa::MessageField::some(
            meta.modified()
                .map(buffa_types::google::protobuf::Timestamp::from)
                .unwrap_or_default(),
        ),
        symlink_target,
        ..Default::default()
    })
}

/// Creates `dir` and its missing parents. Run it inside [`run_as`]: new directories
/// then belong to the user acting.
pub fn create_dirs(dir: &Path) -> Result<(), FsError> {
    std::fs::create_dir_all(dir).map_err(|e| FsError::io("mkdir", dir, e))
}

fn list(dir: &Path, depth: u32, out: &mut Vec<EntryInfo>) -> Result<(), FsError> {
    let rd = std::fs::read_dir(dir).map_err(|e| FsError::io("list", dir, e))?;
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        let Ok(info) = entry_info(&p) else { continue };
        let is_real_dir = std::fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        out.push(info);
        // A subdirectory the user may not read is listed, but not descended into.
        if depth > 1 && is_real_dir {
            match list(&p, depth - 1, out) {
                Err(e) if e.code() == ErrorCode::PermissionDenied => {}
                other => other?,
            }
        }
    }
    Ok(())
}

/// Implementation of `filesystem.Filesystem`.
pub struct FilesystemService {
    pub state: AgentState,
}

impl FilesystemService {
    fn user(&self, ctx: &RequestContext) -> Result<User, FsError> {
        let name = user_from_basic_auth(
            ctx.headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok()),
        );
        Ok(self.state.user(name.as_deref())?)
    }
}

impl From<crate::watch::WatchError> for ConnectError {
    fn from(e: crate::watch::WatchError) -> Self {
        use crate::watch::WatchError;
        let code = match &e {
            WatchError::TooMany => ErrorCode::ResourceExhausted,
            WatchError::NotFound(_) => ErrorCode::NotFound,
            WatchError::Inotify(_) => ErrorCode::Internal,
        };
        ConnectError::new(code, e.to_string())
    }
}

impl FilesystemService {
    /// Start a watch of `path` for the request's user, who must be able to list it.
    async fn start_watch(
        &self,
        ctx: &RequestContext,
        path: &str,
        recursive: bool,
        include_entry: bool,
        sink: crate::watch::Sink,
    ) -> Result<String, ConnectError> {
        let user = self.user(ctx)?;
        let path = resolve_path(&user, path);
        let checked = path.clone();
        run_as(&user, move || {
            let meta =
                std::fs::metadata(&checked).map_err(|e| FsError::io("watch", &checked, e))?;
            if !meta.is_dir() {
                return Err(FsError::InvalidArgument {
                    message: format!("{} is not a directory", checked.display()),
                });
            }
            std::fs::read_dir(&checked).map_err(|e| FsError::io("watch", &checked, e))?;
            Ok(())
        })
        .await?;
        Ok(self
            .state
            .watchers
            .start(path, recursive, include_entry, sink)?)
    }
}

impl Filesystem for FilesystemService {
    async fn stat(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, StatRequest>,
    ) -> ServiceResult<StatResponse> {
        let user = self.user(&ctx)?;
        let path = resolve_path(&user, request.path);
        let entry = run_as(&user, move || entry_info(&path)).await?;
        Response::ok(StatResponse {
            entry: buffa::MessageField::some(entry),
            ..Default::default()
        })
    }

    async fn make_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, MakeDirRequest>,
    ) -> ServiceResult<MakeDirResponse> {
        let user = self.user(&ctx)?;
        let path = resolve_path(&user, request.path);
        let entry = run_as(&user, move || {
            if std::fs::symlink_metadata(&path).is_ok() {
                return Err(FsError::AlreadyExists { path });
            }
            create_dirs(&path)?;
            entry_info(&path)
        })
        .await?;
        Response::ok(MakeDirResponse {
            entry: buffa::MessageField::some(entry),
            ..Default::default()
        })
    }

    async fn r#move(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, MoveRequest>,
    ) -> ServiceResult<MoveResponse> {
        let user = self.user(&ctx)?;
        let src = resolve_path(&user, request.source);
        let dst = resolve_path(&user, request.destination);
        let entry = run_as(&user, move || {
            std::fs::symlink_metadata(&src).map_err(|e| FsError::io("move", &src, e))?;
            if let Some(parent) = dst.parent() {
                create_dirs(parent)?;
            }
            std::fs::rename(&src, &dst).map_err(|e| FsError::io("move", &src, e))?;
            entry_info(&dst)
        })
        .await?;
        Response::ok(MoveResponse {
            entry: buffa::MessageField::some(entry),
            ..Default::default()
        })
    }

    async fn list_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, ListDirRequest>,
    ) -> ServiceResult<ListDirResponse> {
        let user = self.user(&ctx)?;
        let path = resolve_path(&user, request.path);
        let depth = request.depth.max(1);
        let entries = run_as(&user, move || {
            let meta = std::fs::metadata(&path).map_err(|e| FsError::io("list", &path, e))?;
            if !meta.is_dir() {
                return Err(FsError::InvalidArgument {
                    message: format!("{} is not a directory", path.display()),
                });
            }
            let mut entries = Vec::new();
            list(&path, depth, &mut entries)?;
            Ok(entries)
        })
        .await?;
        Response::ok(ListDirResponse {
            entries,
            ..Default::default()
        })
    }

    async fn remove(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, RemoveRequest>,
    ) -> ServiceResult<RemoveResponse> {
        let user = self.user(&ctx)?;
        let path = resolve_path(&user, request.path);
        run_as(&user, move || {
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| FsError::io("remove", &path, e))?;
            let res = if meta.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            res.map_err(|e| FsError::io("remove", &path, e))
        })
        .await?;
        Response::ok(RemoveResponse::default())
    }

    async fn watch_dir(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, WatchDirRequest>,
    ) -> ServiceResult<ServiceStream<WatchDirResponse>> {
        let (tx, rx) = tokio::sync::mpsc::channel(crate::watch::MAX_QUEUED);
        let id = self
            .start_watch(
                &ctx,
                request.path,
                request.recursive,
                request.include_entry,
                crate::watch::Sink::Stream(tx),
            )
            .await?;
        tracing::debug!(watcher = %id, "watch stream started");
        let start = WatchDirResponse {
            event: Some(watch_dir_response::Event::Start(Box::default())),
            ..Default::default()
        };
        // Keepalives let proxies see a live stream while the directory is quiet.
        let keepalive = tokio::time::interval_at(
            tokio::time::Instant::now() + WATCH_KEEPALIVE,
            WATCH_KEEPALIVE,
        );
        let events = futures::stream::unfold((rx, keepalive), |(mut rx, mut iv)| async move {
            let event = tokio::select! {
                biased;
                ev = rx.recv() => watch_dir_response::Event::Filesystem(Box::new(ev?)),
                _ = iv.tick() => watch_dir_response::Event::Keepalive(Box::default()),
            };
            let resp = WatchDirResponse {
                event: Some(event),
                ..Default::default()
            };
            Some((Ok(resp), (rx, iv)))
        });
        Response::stream_ok(Box::pin(futures::StreamExt::chain(
            futures::stream::once(async move { Ok(start) }),
            events,
        )))
    }

    async fn create_watcher(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, CreateWatcherRequest>,
    ) -> ServiceResult<CreateWatcherResponse> {
        let id = self
            .start_watch(
                &ctx,
                request.path,
                request.recursive,
                request.include_entry,
                crate::watch::Sink::Queue(Default::default()),
            )
            .await?;
        Response::ok(CreateWatcherResponse {
            watcher_id: id,
            ..Default::default()
        })
    }

    async fn get_watcher_events(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, GetWatcherEventsRequest>,
    ) -> ServiceResult<GetWatcherEventsResponse> {
        let events = self.state.watchers.take(request.watcher_id)?;
        Response::ok(GetWatcherEventsResponse {
            events,
            ..Default::default()
        })
    }

    async fn remove_watcher(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, RemoveWatcherRequest>,
    ) -> ServiceResult<RemoveWatcherResponse> {
        self.state.watchers.remove(request.watcher_id)?;
        Response::ok(RemoveWatcherResponse::default())
    }
}

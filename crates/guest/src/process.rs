//! The `process.Process` Connect service: start processes (pipes or a PTY), stream their
//! output, feed stdin, signal, resize and re-attach.
//!
//! Every started process gets one pump task that owns its lifecycle: it forwards output
//! chunks read by blocking reader threads, waits for the exit status from the
//! [`crate::reaper`], enforces the caller's deadline (SIGKILL to the process group) and
//! emits the end event. Events go to the starting stream (bounded, lossless) and to a
//! broadcast channel for `Connect` subscribers. Each process runs in its own session, so
//! signals go to the whole group.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connectrpc::{
    ConnectError, ErrorCode, InboundStream, RequestContext, Response, ServiceRequest,
    ServiceResult, ServiceStream,
};
use futures::StreamExt;
use hearth_proto::process::{
    process_event, process_input, process_selector, stream_input_request, CloseStdinRequest,
    CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest, ListResponse, Process,
    ProcessConfig, ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector, SendInputRequest,
    SendInputResponse, SendSignalRequest, SendSignalResponse, Signal, StartRequest, StartResponse,
    StreamInputRequest, StreamInputResponse, UpdateRequest, UpdateResponse,
};
use nix::sys::signal::{kill, killpg, Signal as NixSignal};
use nix::unistd::Pid;
use tokio::sync::{broadcast, mpsc};

use crate::reaper::{self, Exit};
use crate::state::{resolve_path, user_from_basic_auth, AgentState};
use crate::users::{User, UserError};

/// How long output is still drained after the process exited (descendants may hold the
/// pipes open forever).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
const KEEPALIVE: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 32 * 1024;

/// Errors of the process service.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process {selector} not found")]
    NotFound { selector: String },
    #[error("invalid argument: {message}")]
    InvalidArgument { message: String },
    #[error("cannot start {cmd:?}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    User(#[from] UserError),
}

impl From<ProcessError> for ConnectError {
    fn from(e: ProcessError) -> Self {
        let code = match &e {
            ProcessError::NotFound { .. } => ErrorCode::NotFound,
            ProcessError::InvalidArgument { .. } | ProcessError::User(_) => {
                ErrorCode::InvalidArgument
            }
            ProcessError::Spawn { source, .. }
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENAMETOOLONG | libc::E2BIG | libc::ELOOP | libc::ENOTDIR)
                ) =>
            {
                ErrorCode::InvalidArgument
            }
            ProcessError::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                ErrorCode::NotFound
            }
            ProcessError::Spawn { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                ErrorCode::PermissionDenied
            }
            ProcessError::Spawn { .. } | ProcessError::Io { .. } => ErrorCode::Internal,
        };
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        if let ProcessError::Spawn { cmd, source } = &e {
            if cmd == "/bin/bash" && source.kind() == std::io::ErrorKind::NotFound {
                msg.push_str(
                    ": this template has no /bin/bash, and E2B's SDKs start every command as \
                     `/bin/bash -l -c CMD`; create the sandbox from the `base` (python) \
                     template, or run commands through hearth's own API",
                );
            }
        }
        ConnectError::new(code, msg)
    }
}

/// One running process.
struct ProcessEntry {
    pid: u32,
    config: ProcessConfig,
    tag: Option<String>,
    /// Where input goes: the stdin pipe, or the PTY master. `None` once closed.
    input: Mutex<Option<Arc<File>>>,
    pty_master: Option<Arc<File>>,
    events: broadcast::Sender<ProcessEvent>,
}

impl ProcessEntry {
    fn input(&self) -> Option<Arc<File>> {
        self.input.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn write_input(&self, data: Vec<u8>) -> Result<(), ProcessError> {
        let Some(file) = self.input() else {
            return Err(ProcessError::InvalidArgument {
                message: format!("stdin of process {} is closed", self.pid),
            });
        };
        tokio::task::spawn_blocking(move || (&*file).write_all(&data))
            .await
            .map_err(|e| ProcessError::Io {
                what: "stdin writer task failed",
                source: std::io::Error::other(e),
            })?
            .map_err(|source| ProcessError::Io {
                what: "cannot write to stdin",
                source,
            })
    }

    fn signal(&self, sig: NixSignal) {
        signal_group(self.pid, sig);
    }
}

fn signal_group(pid: u32, sig: NixSignal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if killpg(Pid::from_raw(raw), sig).is_err() {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// The processes started by this agent that have not ended yet.
#[derive(Clone, Default)]
pub struct ProcessTable {
    inner: Arc<Mutex<HashMap<u32, Arc<ProcessEntry>>>>,
}

impl ProcessTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<ProcessEntry>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, sel: Option<&ProcessSelector>) -> Result<Arc<ProcessEntry>, ProcessError> {
        let table = self.lock();
        let found = match sel.and_then(|s| s.selector.as_ref()) {
            Some(process_selector::Selector::Pid(pid)) => table.get(pid).cloned(),
            Some(process_selector::Selector::Tag(tag)) => table
                .values()
                .find(|e| e.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
            None => {
                return Err(ProcessError::InvalidArgument {
                    message: "process selector (pid or tag) is required".into(),
                })
            }
        };
        found.ok_or_else(|| ProcessError::NotFound {
            selector: match sel.and_then(|s| s.selector.as_ref()) {
                Some(process_selector::Selector::Pid(p)) => format!("pid {p}"),
                Some(process_selector::Selector::Tag(t)) => format!("tag {t:?}"),
                None => String::new(),
            },
        })
    }

    /// Sends SIGKILL to every process group this agent started.
    pub fn kill_all(&self) {
        for pid in self.lock().keys() {
            signal_group(*pid, NixSignal::SIGKILL);
        }
    }
}

/// Output stream a reader thread reads.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
    Pty,
}

fn data_event(kind: Stream, bytes: Vec<u8>) -> ProcessEvent {
    use process_event::data_event::Output;
    let output = match kind {
        Stream::Stdout => Output::Stdout(bytes),
        Stream::Stderr => Output::Stderr(bytes),
        Stream::Pty => Output::Pty(bytes),
    };
    event(process_event::DataEvent {
        output: Some(output),
        ..Default::default()
    })
}

fn event(e: impl Into<process_event::Event>) -> ProcessEvent {
    ProcessEvent {
        event: Some(e.into()),
        ..Default::default()
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        3 => "quit".into(),
        6 => "aborted".into(),
        9 => "killed".into(),
        11 => "segmentation fault".into(),
        13 => "broken pipe".into(),
        14 => "alarm clock".into(),
        15 => "terminated".into(),
        n => format!("signal {n}"),
    }
}

fn end_event(exit: Exit) -> ProcessEvent {
    let (exit_code, exited, status) = match exit {
        Exit::Code(c) => (c, true, format!("exit status {c}")),
        Exit::Signal(s) => (-1, false, format!("signal: {}", signal_name(s))),
    };
    event(process_event::EndEvent {
        exit_code,
        exited,
        status,
        ..Default::default()
    })
}

fn spawn_reader(mut file: File, kind: Stream, tx: mpsc::Sender<(Stream, Vec<u8>)>) {
    let spawned = std::thread::Builder::new()
        .name("proc-output".into())
        .spawn(move || {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let chunk = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
                        if tx.blocking_send((kind, chunk)).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // EIO on a PTY master once the slave side is gone.
                    Err(_) => break,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start an output reader thread");
    }
}

fn set_cloexec(fd: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
}

/// Sets the window size of a PTY.
fn set_winsize(master: &File, cols: u32, rows: u32) -> Result<(), ProcessError> {
    let ws = libc::winsize {
        ws_row: u16::try_from(rows).unwrap_or(u16::MAX),
        ws_col: u16::try_from(cols).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which lives for the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(ProcessError::Io {
            what: "cannot resize the PTY",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Who a new process runs as and where it starts, applied in the child between fork
/// and exec: groups, gid and uid first, then `chdir`, so the kernel checks the working
/// directory with the user's rights.
struct Identity {
    /// `None` when the agent is not root (it cannot switch, the child runs as the agent).
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    cwd: std::ffi::CString,
}

impl Identity {
    fn new(user: &User, cwd: &std::path::Path) -> Result<Self, ProcessError> {
        use std::os::unix::ffi::OsStrExt as _;
        let cwd = std::ffi::CString::new(cwd.as_os_str().as_bytes()).map_err(|_| {
            ProcessError::InvalidArgument {
                message: "cwd contains a NUL byte".into(),
            }
        })?;
        let ids = nix::unistd::geteuid()
            .is_root()
            .then(|| (user.uid, user.gid, crate::users::groups_of(user)));
        Ok(Identity { ids, cwd })
    }

    /// Runs in the forked child: only async-signal-safe calls, no allocation.
    fn enter(&self) -> std::io::Result<()> {
        if let Some((uid, gid, groups)) = &self.ids {
            // SAFETY: plain syscalls on data owned by `self`, valid for each call.
            unsafe {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        // SAFETY: `cwd` is a NUL-terminated string owned by `self`.
        if unsafe { libc::chdir(self.cwd.as_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Options of one start.
pub struct StartOptions {
    pub user: User,
    pub request: StartRequest,
    pub deadline: Option<tokio::time::Instant>,
}

/// A started process: its pid, the receiver of its events (start, data..., end), and
/// whether its deadline killed it (set before its end event is sent).
pub struct Started {
    pub pid: u32,
    pub events: mpsc::Receiver<ProcessEvent>,
    pub deadline_killed: Arc<std::sync::atomic::AtomicBool>,
}

/// Starts a process. It lives on when the receiver of its events is dropped.
pub fn start(state: &AgentState, opts: StartOptions) -> Result<Started, ProcessError> {
    let StartOptions {
        user,
        request,
        deadline,
    } = opts;
    let config = request.process.as_option().cloned().unwrap_or_default();
    if config.cmd.is_empty() {
        return Err(ProcessError::InvalidArgument {
            message: "process.cmd is empty".into(),
        });
    }
    let defaults = state.defaults();
    let cwd = match config.cwd.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => resolve_path(&user, c),
        None => defaults
            .workdir
            .clone()
            .unwrap_or_else(|| user.home.clone()),
    };
    let cwd = if cwd.is_dir() {
        cwd
    } else if config.cwd.is_some() {
        return Err(ProcessError::InvalidArgument {
            message: format!("cwd {} is not a directory", cwd.display()),
        });
    } else {
        "/".into()
    };
    let pty = request.pty.as_option().map(|p| {
        let size = p.size.as_option().cloned().unwrap_or_default();
        (size.cols, size.rows)
    });

    let mut env: HashMap<String, String> = HashMap::new();
    env.insert(
        "PATH".into(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
    );
    env.insert("HOME".into(), user.home.display().to_string());
    env.insert("USER".into(), user.name.clone());
    env.insert("LOGNAME".into(), user.name.clone());
    env.insert("SHELL".into(), user.shell.clone());
    if pty.is_some() {
        env.insert("TERM".into(), "xterm-256color".into());
    }
    env.extend(defaults.env.clone());
    env.extend(config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));

    let mut cmd = Command::new(&config.cmd);
    cmd.args(&config.args).env_clear().envs(&env);
    let identity = Identity::new(&user, &cwd)?;

    let keep_stdin = request.stdin.unwrap_or(true);
    let mut pty_master: Option<File> = None;
    if let Some((cols, rows)) = pty {
        let ws = nix::pty::Winsize {
            ws_row: u16::try_from(rows).unwrap_or(24).max(1),
            ws_col: u16::try_from(cols).unwrap_or(80).max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pair = nix::pty::openpty(Some(&ws), None).map_err(|e| ProcessError::Io {
            what: "cannot open a PTY",
            source: e.into(),
        })?;
        set_cloexec(&pair.master);
        set_cloexec(&pair.slave);
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| ProcessError::Io {
                what: "cannot duplicate the PTY",
                source,
            })
        };
        cmd.stdin(Stdio::from(dup(&pair.slave)?))
            .stdout(Stdio::from(dup(&pair.slave)?))
            .stderr(Stdio::from(pair.slave));
        pty_master = Some(File::from(pair.master));
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    } else {
        cmd.stdin(if keep_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls (setsid) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    // SAFETY: `Identity::enter` makes only async-signal-safe calls (setgroups, setgid,
    // setuid, chdir) on data prepared before the fork. It runs after the session setup.
    unsafe {
        cmd.pre_exec(move || identity.enter());
    }

    let (mut child, exit_rx) = reaper::spawn_and_watch(|| {
        let child = cmd.spawn()?;
        Ok((i32::try_from(child.id()).unwrap_or(i32::MAX), child))
    })
    .map_err(|source| ProcessError::Spawn {
        cmd: config.cmd.clone(),
        source,
    })?;
    // Closes our copies of the PTY slave.
    drop(cmd);
    let pid = child.id();

    let (out_tx, out_rx) = mpsc::channel::<(Stream, Vec<u8>)>(64);
    let mut input: Option<Arc<File>> = None;
    let master = pty_master.map(Arc::new);
    if let Some(m) = &master {
        let reader = m.try_clone().map_err(|source| ProcessError::Io {
            what: "cannot duplicate the PTY",
            source,
        })?;
        spawn_reader(reader, Stream::Pty, out_tx.clone());
        input = Some(m.clone());
    } else {
        if let Some(out) = child.stdout.take() {
            spawn_reader(
                File::from(OwnedFd::from(out)),
                Stream::Stdout,
                out_tx.clone(),
            );
        }
        if let Some(err) = child.stderr.take() {
            spawn_reader(
                File::from(OwnedFd::from(err)),
                Stream::Stderr,
                out_tx.clone(),
            );
        }
        if let Some(stdin) = child.stdin.take() {
            input = Some(Arc::new(File::from(OwnedFd::from(stdin))));
        }
    }
    drop(out_tx);
    // The reaper owns the exit status; the `Child` is never waited on.
    drop(child);

    let (events, _) = broadcast::channel(1024);
    let entry = Arc::new(ProcessEntry {
        pid,
        config,
        tag: request.tag.clone(),
        input: Mutex::new(input),
        pty_master: master,
        events,
    });
    state.processes.lock().insert(pid, entry.clone());

    let (tx, rx) = mpsc::channel(64);
    let table = state.processes.clone();
    let deadline_killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(pump(
        entry,
        table,
        out_rx,
        exit_rx,
        (deadline, deadline_killed.clone()),
        tx,
    ));
    Ok(Started {
        pid,
        events: rx,
        deadline_killed,
    })
}

async fn pump(
    entry: Arc<ProcessEntry>,
    table: ProcessTable,
    mut out_rx: mpsc::Receiver<(Stream, Vec<u8>)>,
    mut exit_rx: tokio::sync::oneshot::Receiver<Exit>,
    (deadline, deadline_killed): (
        Option<tokio::time::Instant>,
        Arc<std::sync::atomic::AtomicBool>,
    ),
    tx: mpsc::Sender<ProcessEvent>,
) {
    let emit = |ev: ProcessEvent| {
        let tx = tx.clone();
        let events = entry.events.clone();
        async move {
            let _ = events.send(ev.clone());
            // The starter may have gone away; the process carries on regardless.
            let _ = tx.send(ev).await;
        }
    };
    emit(event(process_event::StartEvent {
        pid: entry.pid,
        ..Default::default()
    }))
    .await;

    let far = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86400);
    let deadline_sleep = tokio::time::sleep_until(deadline.unwrap_or(far));
    tokio::pin!(deadline_sleep);
    let grace = tokio::time::sleep_until(far);
    tokio::pin!(grace);
    let mut exit: Option<Exit> = None;
    let mut output_done = false;
    let mut killed = false;
    while !(output_done && exit.is_some()) {
        tokio::select! {
            biased;
            chunk = out_rx.recv(), if !output_done => match chunk {
                Some((kind, bytes)) => emit(data_event(kind, bytes)).await,
                None => output_done = true,
            },
            status = &mut exit_rx, if exit.is_none() => {
                // A dropped sender means the reaper is gone; report a kill.
                exit = Some(status.unwrap_or(Exit::Signal(9)));
                grace.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE);
            }
            _ = &mut deadline_sleep, if !killed && exit.is_none() => {
                tracing::info!(pid = entry.pid, "deadline passed, killing the process group");
                entry.signal(NixSignal::SIGKILL);
                killed = true;
                deadline_killed.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            _ = &mut grace, if exit.is_some() => break,
        }
    }
    table.lock().remove(&entry.pid);
    if let Some(exit) = exit {
        emit(end_event(exit)).await;
    }
}

/// Wraps an event receiver as a Connect response stream with keepalives.
fn event_stream<R, F>(rx: mpsc::Receiver<ProcessEvent>, wrap: F) -> ServiceStream<R>
where
    R: Send + 'static,
    F: Fn(ProcessEvent) -> R + Send + Sync + 'static,
{
    let iv = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let s = futures::stream::unfold((rx, iv, wrap), |(mut rx, mut iv, wrap)| async move {
        let ev = tokio::select! {
            biased;
            ev = rx.recv() => ev?,
            _ = iv.tick() => event(process_event::KeepAlive::default()),
        };
        Some((Ok(wrap(ev)), (rx, iv, wrap)))
    });
    Box::pin(s)
}

fn request_user(state: &AgentState, ctx: &RequestContext) -> Result<User, ProcessError> {
    let name = user_from_basic_auth(
        ctx.headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    );
    Ok(state.user(name.as_deref())?)
}

/// Implementation of `process.Process`.
pub struct ProcessService {
    pub state: AgentState,
}

impl Process for ProcessService {
    async fn list(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, ListRequest>,
    ) -> ServiceResult<ListResponse> {
        let mut processes: Vec<ProcessInfo> = self
            .state
            .processes
            .lock()
            .values()
            .map(|e| ProcessInfo {
                config: buffa::MessageField::some(e.config.clone()),
                pid: e.pid,
                tag: e.tag.clone(),
                ..Default::default()
            })
            .collect();
        processes.sort_by_key(|p| p.pid);
        Response::ok(ListResponse {
            processes,
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, ConnectRequest>,
    ) -> ServiceResult<ServiceStream<ConnectResponse>> {
        let req = request.to_owned_message();
        let entry = self.state.processes.find(req.process.as_option())?;
        let mut sub = entry.events.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let pid = entry.pid;
        drop(entry);
        tokio::spawn(async move {
            let start = event(process_event::StartEvent {
                pid,
                ..Default::default()
            });
            if tx.send(start).await.is_err() {
                return;
            }
            loop {
                match sub.recv().await {
                    Ok(ev) => {
                        let is_start = matches!(ev.event, Some(process_event::Event::Start(_)));
                        let is_end = matches!(ev.event, Some(process_event::Event::End(_)));
                        if !is_start && tx.send(ev).await.is_err() {
                            return;
                        }
                        if is_end {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(pid, skipped = n, "connect subscriber lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Response::stream_ok(event_stream(rx, |ev| ConnectResponse {
            event: buffa::MessageField::some(ev),
            ..Default::default()
        }))
    }

    async fn start(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, StartRequest>,
    ) -> ServiceResult<ServiceStream<StartResponse>> {
        let user = request_user(&self.state, &ctx)?;
        let deadline = ctx.deadline().map(tokio::time::Instant::from_std);
        let started = start(
            &self.state,
            StartOptions {
                user,
                request: request.to_owned_message(),
                deadline,
            },
        )?;
        let pid = started.pid;
        tracing::debug!(pid, "process started");
        let events = event_stream(started.events, |ev| StartResponse {
            event: buffa::MessageField::some(ev),
            ..Default::default()
        });
        // As envd: a process its deadline killed ends the stream with
        // `deadline_exceeded` after its end event (E2B's SDKs raise a timeout).
        let killed = started.deadline_killed;
        let tail = futures::stream::once(async move {
            killed.load(std::sync::atomic::Ordering::SeqCst).then(|| {
                Err(ConnectError::new(
                    ErrorCode::DeadlineExceeded,
                    format!("process {pid} was killed at its deadline"),
                ))
            })
        })
        .filter_map(|x| async move { x });
        Response::stream_ok(Box::pin(events.chain(tail)))
    }

    async fn update(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, UpdateRequest>,
    ) -> ServiceResult<UpdateResponse> {
        let req = request.to_owned_message();
        let entry = self.state.processes.find(req.process.as_option())?;
        if let Some(pty) = req.pty.as_option() {
            let Some(master) = &entry.pty_master else {
                return Err(ProcessError::InvalidArgument {
                    message: format!("process {} has no PTY", entry.pid),
                }
                .into());
            };
            let size = pty.size.as_option().cloned().unwrap_or_default();
            set_winsize(master, size.cols, size.rows)?;
        }
        Response::ok(UpdateResponse::default())
    }

    async fn stream_input(
        &self,
        _ctx: RequestContext,
        mut requests: InboundStream<StreamInputRequest>,
    ) -> ServiceResult<StreamInputResponse> {
        let mut target: Option<Arc<ProcessEntry>> = None;
        while let Some(msg) = requests.next().await {
            let msg = msg?.to_owned_message();
            match msg.event {
                Some(stream_input_request::Event::Start(s)) => {
                    target = Some(self.state.processes.find(s.process.as_option())?);
                }
                Some(stream_input_request::Event::Data(d)) => {
                    let Some(entry) = &target else {
                        return Err(ConnectError::new(
                            ErrorCode::FailedPrecondition,
                            "data before the start event",
                        ));
                    };
                    if let Some(bytes) = input_bytes(d.input.as_option()) {
                        entry.write_input(bytes).await?;
                    }
                }
                Some(stream_input_request::Event::Keepalive(_)) | None => {}
            }
        }
        Response::ok(StreamInputResponse::default())
    }

    async fn send_input(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, SendInputRequest>,
    ) -> ServiceResult<SendInputResponse> {
        let req = request.to_owned_message();
        let entry = self.state.processes.find(req.process.as_option())?;
        if let Some(bytes) = input_bytes(req.input.as_option()) {
            entry.write_input(bytes).await?;
        }
        Response::ok(SendInputResponse::default())
    }

    async fn send_signal(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, SendSignalRequest>,
    ) -> ServiceResult<SendSignalResponse> {
        let req = request.to_owned_message();
        let entry = self.state.processes.find(req.process.as_option())?;
        let sig = match req.signal.as_known() {
            Some(Signal::SIGNAL_SIGKILL) => NixSignal::SIGKILL,
            Some(Signal::SIGNAL_SIGTERM) => NixSignal::SIGTERM,
            _ => {
                return Err(ProcessError::InvalidArgument {
                    message: "signal must be SIGTERM or SIGKILL".into(),
                }
                .into())
            }
        };
        entry.signal(sig);
        Response::ok(SendSignalResponse::default())
    }

    async fn close_stdin(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, CloseStdinRequest>,
    ) -> ServiceResult<CloseStdinResponse> {
        let req = request.to_owned_message();
        let entry = self.state.processes.find(req.process.as_option())?;
        if entry.pty_master.is_some() {
            // A PTY has no EOF of its own: send the terminal's EOF character.
            entry.write_input(vec![0x04]).await?;
        } else {
            entry.input.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        Response::ok(CloseStdinResponse::default())
    }
}

fn input_bytes(input: Option<&ProcessInput>) -> Option<Vec<u8>> {
    match input?.input.as_ref()? {
        process_input::Input::Stdin(b) | process_input::Input::Pty(b) => Some(b.clone()),
    }
}

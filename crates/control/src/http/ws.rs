//! `GET /v1/sandboxes/{id}/exec/ws`: an interactive exec over a WebSocket.
//!
//! Client: first text frame = the exec body (+ optional `pty`), then `stdin`,
//! `stdin_close`, `signal`, `resize` frames. Server: `started`, `stdout`/`stderr`
//! (base64), then `exit` or `error`, then close.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use hearth_types::{SandboxId, TeamId};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::types::ExecRequest;
use super::{AppState, Caller};
use crate::app::exec::ExecParams;
use crate::app::hosts::{HostClient, HostError, ProcEvent, Signal};
use crate::app::sandboxes::parse_id;
use crate::app::{App, AppError};

const KILL_GRACE: Duration = Duration::from_secs(5);
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Stdin { data: String },
    StdinClose,
    Signal { signal: String },
    Resize { cols: u32, rows: u32 },
}

pub async fn exec_ws(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    // Fail before the upgrade when the sandbox is not there or not running.
    s.app.running_host(caller.team_id, &id).await?;
    let app = s.app.clone();
    let team = caller.team_id;
    Ok(upgrade
        .max_message_size(2 * 1024 * 1024)
        .on_upgrade(move |socket| session(app, team, id, socket)))
}

fn text(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

fn error_frame(e: AppError) -> Message {
    let body = ApiError(e).body();
    text(
        json!({"type": "error", "error": {"code": body.error.code, "message": body.error.message}}),
    )
}

async fn session(app: Arc<App>, team: TeamId, id: SandboxId, mut socket: WebSocket) {
    if let Err(e) = run(&app, team, &id, &mut socket).await {
        let _ = socket.send(error_frame(e)).await;
    }
    let _ = socket.send(Message::Close(None)).await;
}

async fn run(
    app: &App,
    team: TeamId,
    id: &SandboxId,
    socket: &mut WebSocket,
) -> Result<(), AppError> {
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(_))) => {
            return Err(AppError::InvalidArgument(
                "first frame must be a JSON text frame".into(),
            ))
        }
        Ok(_) => return Ok(()),
        Err(_) => {
            return Err(AppError::InvalidArgument(
                "no exec request within 30 s".into(),
            ))
        }
    };
    let req: ExecRequest = serde_json::from_str(first.as_str())
        .map_err(|e| AppError::InvalidArgument(format!("invalid exec request: {e}")))?;
    let plan = ExecParams::from(req).check()?;
    let is_pty = plan.spec.pty.is_some();
    let user = plan.spec.user.clone();
    let (host, mut events) = app.exec_start(team, id, &plan).await?;
    let deadline = tokio::time::sleep(plan.timeout);
    tokio::pin!(deadline);
    let mut pid: Option<u32> = None;
    let mut pending: VecDeque<ClientFrame> = VecDeque::new();
    let mut timed_out = false;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let b64 = base64::engine::general_purpose::STANDARD;
    loop {
        let grace = async {
            match kill_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.next() => match ev {
                None => return Err(AppError::Internal("process stream ended without an exit".into())),
                Some(Err(e)) => return Err(AppError::Host { context: "process failed".into(), source: e }),
                Some(Ok(ProcEvent::Started { pid: p })) => {
                    pid = Some(p);
                    let _ = socket.send(text(json!({"type": "started", "pid": p}))).await;
                    while let Some(f) = pending.pop_front() {
                        apply(&*host, id, &user, p, is_pty, f).await?;
                    }
                }
                Some(Ok(ProcEvent::Stdout(b))) | Some(Ok(ProcEvent::Pty(b))) => {
                    let _ = socket.send(text(json!({"type": "stdout", "data": b64.encode(&b)}))).await;
                }
                Some(Ok(ProcEvent::Stderr(b))) => {
                    let _ = socket.send(text(json!({"type": "stderr", "data": b64.encode(&b)}))).await;
                }
                Some(Ok(ProcEvent::Exited { exit_code, .. })) => {
                    let _ = socket.send(text(json!({"type": "exit", "exit_code": exit_code, "timed_out": timed_out}))).await;
                    return Ok(());
                }
            },
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                    // Client went away: do not leave the process behind.
                    if let Some(p) = pid {
                        let _ = host.send_signal(id, &user, p, Signal::Kill).await;
                    }
                    return Ok(());
                }
                Some(Ok(Message::Text(t))) => {
                    let frame: ClientFrame = serde_json::from_str(t.as_str())
                        .map_err(|e| AppError::InvalidArgument(format!("invalid frame: {e}")))?;
                    match pid {
                        Some(p) => apply(&*host, id, &user, p, is_pty, frame).await?,
                        None => pending.push_back(frame),
                    }
                }
                Some(Ok(_)) => {}
            },
            _ = &mut deadline, if !timed_out => {
                timed_out = true;
                if let Some(p) = pid {
                    let _ = host.send_signal(id, &user, p, Signal::Kill).await;
                }
                kill_at = Some(tokio::time::Instant::now() + KILL_GRACE);
            },
            _ = grace => {
                let _ = socket.send(text(json!({"type": "exit", "exit_code": -1, "timed_out": true}))).await;
                return Ok(());
            }
        }
    }
}

async fn apply(
    host: &dyn HostClient,
    id: &SandboxId,
    user: &str,
    pid: u32,
    pty: bool,
    frame: ClientFrame,
) -> Result<(), AppError> {
    // The process may end between a client frame and its delivery (e.g. stdin closed
    // right after a short command exits): the exit event is on its way, so a
    // "no such process" answer is not an error of the session.
    let guest = |e: HostError| {
        if e.is_not_found() {
            tracing::debug!(%id, pid, "process already gone; control frame dropped");
            return Ok(());
        }
        Err(AppError::Host {
            context: "process control failed".into(),
            source: e,
        })
    };
    match frame {
        ClientFrame::Stdin { data } => {
            let data = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| AppError::InvalidArgument(format!("stdin data is not base64: {e}")))?;
            host.send_input(id, user, pid, Bytes::from(data), pty)
                .await
                .or_else(guest)
        }
        ClientFrame::StdinClose => host.close_stdin(id, user, pid).await.or_else(guest),
        ClientFrame::Signal { signal } => {
            let sig = match signal.as_str() {
                "SIGTERM" => Signal::Term,
                "SIGKILL" => Signal::Kill,
                other => {
                    return Err(AppError::InvalidArgument(format!(
                        "signal must be SIGTERM or SIGKILL, got {other:?}"
                    )))
                }
            };
            host.send_signal(id, user, pid, sig).await.or_else(guest)
        }
        ClientFrame::Resize { cols, rows } => {
            if !pty {
                return Ok(());
            }
            host.resize_pty(id, user, pid, cols, rows)
                .await
                .or_else(guest)
        }
    }
}

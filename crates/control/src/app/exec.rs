//! Running commands in a sandbox: the one-shot exec (gather output, enforce the
//! timeout by SIGKILL) and the pieces the WebSocket session uses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use hearth_types::{SandboxId, TeamId};

use connectrpc::ErrorCode;
use tokio_util::sync::CancellationToken;

use super::hosts::{HostClient, HostError, ProcEvent, ProcEvents, ProcSpec, Signal};
use super::sandboxes::guest_error;
use super::{validate, App, AppError, AppResult};

/// Output kept per stream; the rest is dropped and the stream flagged truncated.
pub const MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;
/// How long to wait for the exit event after a timed-out process was killed.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Slack on the Connect deadline beyond the exec timeout.
const DEADLINE_SLACK: Duration = Duration::from_secs(15);

/// An exec request, still unchecked.
#[derive(Debug, Clone, Default)]
pub struct ExecParams {
    pub cmd: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// As sent (wide, unclamped), so that an error can quote it.
    pub timeout_s: Option<i64>,
    pub stdin: Option<String>,
    pub pty: Option<(u32, u32)>,
}

/// A checked exec request.
#[derive(Debug, Clone)]
pub struct ExecPlan {
    pub spec: ProcSpec,
    pub timeout: Duration,
    pub stdin: Option<Bytes>,
}

impl ExecParams {
    pub fn check(self) -> AppResult<ExecPlan> {
        validate::cmd(&self.cmd)?;
        validate::env("env", &self.env)?;
        if let Some(cwd) = &self.cwd {
            validate::guest_path("cwd", cwd)?;
        }
        let user = self.user.unwrap_or_else(|| "root".to_owned());
        validate::user(&user)?;
        let timeout_s = validate::exec_timeout(self.timeout_s)?;
        if let Some(s) = &self.stdin {
            if s.len() > validate::MAX_STDIN_BYTES {
                return Err(AppError::PayloadTooLarge(format!(
                    "stdin is longer than {} bytes",
                    validate::MAX_STDIN_BYTES
                )));
            }
        }
        if let Some((cols, rows)) = self.pty {
            if !(1..=1000).contains(&cols) || !(1..=1000).contains(&rows) {
                return Err(AppError::InvalidArgument(
                    "pty cols and rows must be between 1 and 1000".into(),
                ));
            }
        }
        let timeout = Duration::from_secs(u64::from(timeout_s));
        let mut cmd = self.cmd.into_iter();
        let first = cmd.next().unwrap_or_default();
        Ok(ExecPlan {
            spec: ProcSpec {
                cmd: first,
                args: cmd.collect(),
                env: self.env,
                cwd: self.cwd,
                user,
                stdin: true,
                pty: self.pty,
                deadline: timeout + DEADLINE_SLACK,
            },
            timeout,
            stdin: self.stdin.map(Bytes::from),
        })
    }
}

/// Output of one stream, possibly cut at [`MAX_OUTPUT_BYTES`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captured {
    pub data: Vec<u8>,
    pub truncated: bool,
}

impl Captured {
    fn push(&mut self, b: &[u8]) {
        let room = MAX_OUTPUT_BYTES.saturating_sub(self.data.len());
        if b.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&b[..b.len().min(room)]);
    }

    /// The text and its encoding: `utf8` when valid UTF-8, else `base64`.
    pub fn encode(&self) -> (String, &'static str) {
        match std::str::from_utf8(&self.data) {
            Ok(s) => (s.to_owned(), "utf8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&self.data),
                "base64",
            ),
        }
    }
}

/// What a one-shot exec returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit_code: i32,
    pub stdout: Captured,
    pub stderr: Captured,
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl App {
    /// Run a command to completion (or its timeout) and gather its output.
    pub async fn exec(
        &self,
        team: TeamId,
        id: &SandboxId,
        params: ExecParams,
    ) -> AppResult<ExecOutcome> {
        let plan = params.check()?;
        let _permit = self.permit(team, super::concurrency::Kind::Exec)?;
        let (host, ended) = self.running_stream(team, id).await?;
        run_to_completion(host, id, plan, ended).await
    }

    /// Start a process for a streaming session; returns the host and the event stream.
    /// When the sandbox is destroyed, the stream ends at once with an `Aborted` error
    /// ("the sandbox was deleted").
    pub async fn exec_start(
        &self,
        team: TeamId,
        id: &SandboxId,
        plan: &ExecPlan,
    ) -> AppResult<(Arc<dyn HostClient>, ProcEvents)> {
        let permit = self.permit(team, super::concurrency::Kind::Exec)?;
        let (host, ended) = self.running_stream(team, id).await?;
        let events = host
            .start_process(id, plan.spec.clone())
            .await
            .map_err(|e| guest_error("starting the process failed", e))?;
        // The stream holds the team's exec slot until it is dropped.
        let events = until_deleted(events, ended)
            .inspect(move |_| {
                let _ = &permit;
            })
            .boxed();
        Ok((host, events))
    }
}

impl App {
    /// Processes running in a running sandbox (those started before a pause too).
    pub async fn list_processes(
        &self,
        team: TeamId,
        id: &SandboxId,
    ) -> AppResult<Vec<super::hosts::ProcInfo>> {
        let host = self.running_host(team, id).await?;
        host.list_processes(id)
            .await
            .map_err(|e| guest_error("listing the processes failed", e))
    }

    /// Re-attach to process `pid`: its output from now on and its end, for at most
    /// `timeout_s` (default and maximum as exec's). Takes one of the team's exec
    /// stream slots; ends at once when the sandbox is destroyed.
    pub async fn process_connect(
        &self,
        team: TeamId,
        id: &SandboxId,
        pid: u32,
        timeout_s: Option<i64>,
    ) -> AppResult<ProcEvents> {
        let secs = hearth_types::check_range(
            "timeout_s",
            timeout_s,
            validate::DEFAULT_EXEC_TIMEOUT_S,
            1,
            validate::MAX_EXEC_TIMEOUT_S,
        )
        .map_err(|e| AppError::InvalidArgument(e.to_string()))?;
        let permit = self.permit(team, super::concurrency::Kind::Exec)?;
        let (host, ended) = self.running_stream(team, id).await?;
        let events = host
            .connect_process(id, pid, std::time::Duration::from_secs(u64::from(secs)))
            .await
            .map_err(|e| guest_error("connecting to the process failed", e))?;
        Ok(until_deleted(events, ended)
            .inspect(move |_| {
                let _ = &permit;
            })
            .boxed())
    }
}

fn deleted() -> HostError {
    HostError::Rpc {
        code: ErrorCode::Aborted,
        message: "the sandbox was deleted".into(),
    }
}

/// `events`, cut short by one `deleted()` error when `ended` is cancelled.
fn until_deleted(events: ProcEvents, ended: CancellationToken) -> ProcEvents {
    futures::stream::unfold(Some((events, ended)), |state| async move {
        let (mut events, ended) = state?;
        tokio::select! {
            biased;
            _ = ended.cancelled() => Some((Err(deleted()), None)),
            next = events.next() => next.map(|item| (item, Some((events, ended)))),
        }
    })
    .boxed()
}

/// The one-shot exec loop, separate from [`App`] so that it can be tested against a
/// fake host.
///
/// `ended` cancelled (the sandbox was destroyed) ends the wait at once with a conflict.
pub async fn run_to_completion(
    host: Arc<dyn HostClient>,
    id: &SandboxId,
    plan: ExecPlan,
    ended: CancellationToken,
) -> AppResult<ExecOutcome> {
    let started = Instant::now();
    let user = plan.spec.user.clone();
    let mut events = host
        .start_process(id, plan.spec)
        .await
        .map_err(|e| guest_error("starting the process failed", e))?;
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let mut stdin = plan.stdin;
    let mut pid = None;
    let mut out = ExecOutcome {
        exit_code: -1,
        stdout: Captured::default(),
        stderr: Captured::default(),
        timed_out: false,
        duration_ms: 0,
    };
    let mut kill_deadline = None;
    loop {
        let until = kill_deadline.unwrap_or(deadline);
        let next = tokio::select! {
            biased;
            _ = ended.cancelled() => {
                return Err(AppError::Conflict(
                    "the sandbox was deleted while the command ran".into(),
                ))
            }
            n = tokio::time::timeout_at(until, events.next()) => n,
        };
        let next = match next {
            Ok(n) => n,
            Err(_) if kill_deadline.is_some() => {
                tracing::warn!(sandbox_id = %id, ?pid, "killed process did not report its end");
                break;
            }
            Err(_) => {
                out.timed_out = true;
                if let Some(pid) = pid {
                    if let Err(e) = host.send_signal(id, &user, pid, Signal::Kill).await {
                        tracing::warn!(sandbox_id = %id, pid, error = %e, "SIGKILL after timeout failed");
                    }
                }
                kill_deadline = Some(tokio::time::Instant::now() + KILL_GRACE);
                continue;
            }
        };
        match next {
            None => break,
            Some(Err(e)) if out.timed_out => {
                tracing::debug!(sandbox_id = %id, error = %e, "stream ended after kill");
                break;
            }
            Some(Err(e)) => return Err(guest_error("running the process failed", e)),
            Some(Ok(ProcEvent::Started { pid: p })) => {
                pid = Some(p);
                // Feed stdin (or close it at once so readers see EOF).
                if let Some(data) = stdin.take() {
                    if !data.is_empty() {
                        host.send_input(id, &user, p, data, false)
                            .await
                            .map_err(|e| guest_error("writing stdin failed", e))?;
                    }
                }
                if let Err(e) = host.close_stdin(id, &user, p).await {
                    tracing::debug!(sandbox_id = %id, error = %e, "closing stdin failed");
                }
            }
            Some(Ok(ProcEvent::Stdout(b))) | Some(Ok(ProcEvent::Pty(b))) => out.stdout.push(&b),
            Some(Ok(ProcEvent::Stderr(b))) => out.stderr.push(&b),
            Some(Ok(ProcEvent::Exited { exit_code, error })) => {
                out.exit_code = exit_code;
                if let Some(error) = error.filter(|e| !e.is_empty()) {
                    if !out.timed_out && pid.is_none() {
                        return Err(AppError::InvalidArgument(format!(
                            "the command could not be started: {}",
                            super::hosts::sanitize(&error)
                        )));
                    }
                }
                break;
            }
        }
    }
    out.duration_ms = started.elapsed().as_millis() as u64;
    Ok(out)
}

//! A small typed QMP client: JSON lines over the VMM's Unix socket.
//!
//! Owns one connection: greeting, capabilities negotiation, then one command at a
//! time. Asynchronous events are skipped. Descriptors (migration streams) travel
//! with the `getfd` command as `SCM_RIGHTS` ancillary data on the same socket.
//! Every wait is bounded by the client's timeout (per command, not per line) and
//! a line is at most [`MAX_LINE`] bytes, so a wedged or babbling QEMU yields an
//! error, never a hang or an unbounded buffer. It knows nothing about sandboxes.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Errors talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o on the QMP socket")]
    Io(#[source] std::io::Error),
    #[error("QMP socket closed")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed QMP message {line:?}")]
    Malformed {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("unexpected QMP answer to {command}: {answer}")]
    Unexpected { command: String, answer: String },
}

/// Longest QMP line accepted (QEMU's answers here are a few hundred bytes).
pub const MAX_LINE: u64 = 1 << 20;

/// A JSON string field, escaped for logs (empty when absent).
fn escape_str(v: &Value) -> String {
    super::escape_guest_text(v.as_str().unwrap_or_default().as_bytes())
}

/// `query-migrate` answer, reduced to what the driver needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationInfo {
    /// `none` (never migrated), `setup`, `active`, `completed`, `failed`, ...
    pub status: String,
    /// QEMU's reason when `failed` (escaped).
    pub error: Option<String>,
    /// RAM bytes sent so far.
    pub ram_transferred: u64,
}

impl MigrationInfo {
    fn from_value(v: &Value) -> Self {
        Self {
            status: v
                .get("status")
                .and_then(Value::as_str)
                .map(|s| super::escape_guest_text(s.as_bytes()))
                .unwrap_or_else(|| "none".to_owned()),
            error: v
                .get("error-desc")
                .and_then(Value::as_str)
                .map(|s| super::escape_guest_text(s.as_bytes())),
            ram_transferred: v
                .pointer("/ram/transferred")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        }
    }
}

/// `sendmsg(2)` of `bytes` with `fd` as `SCM_RIGHTS` on the non-blocking `stream`.
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    let raw = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // u64 storage keeps the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which is CMSG_SPACE(sizeof(int)) bytes
    // and aligned, so CMSG_FIRSTHDR is non-null and the header plus one int fit;
    // `iov` points at `bytes`, which sendmsg only reads; `stream` owns a valid
    // socket descriptor for the duration of the call.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), raw);
        libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `query-status` answer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct VmStatus {
    pub running: bool,
    pub status: String,
}

/// One negotiated QMP connection.
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
}

impl QmpClient {
    /// Connect, read the greeting and leave negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout(timeout))?
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut client = Self {
            reader: BufReader::new(r),
            writer: w,
            timeout,
        };
        let greeting = client.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Command {
                command: "greeting".into(),
                class: "Protocol".into(),
                desc: format!("unexpected greeting {greeting}"),
            });
        }
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        tokio::time::timeout(self.timeout, self.read_line())
            .await
            .map_err(|_| QmpError::Timeout(self.timeout))?
    }

    /// One line (at most [`MAX_LINE`] bytes), parsed.
    async fn read_line(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(if n as u64 >= MAX_LINE {
                QmpError::LineTooLong
            } else {
                QmpError::Closed
            });
        }
        serde_json::from_slice(&line).map_err(|source| QmpError::Malformed {
            line: super::escape_guest_text(&line[..line.len().min(512)]),
            source,
        })
    }

    /// Run one command and return its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let bytes = Self::encode(command, arguments);
        self.write_all(&bytes).await?;
        self.answer(command).await
    }

    /// Write `bytes`, bounded by the timeout (a QEMU that stops reading).
    async fn write_all(&mut self, bytes: &[u8]) -> Result<(), QmpError> {
        tokio::time::timeout(self.timeout, self.writer.write_all(bytes))
            .await
            .map_err(|_| QmpError::Timeout(self.timeout))?
            .map_err(QmpError::Io)
    }

    /// Run one command with `fd` attached (`SCM_RIGHTS`): QEMU keeps a duplicate,
    /// the caller keeps its own descriptor.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, QmpError> {
        let bytes = Self::encode(command, arguments);
        let stream = self.writer.as_ref();
        let sent = tokio::time::timeout(self.timeout, async {
            loop {
                stream.writable().await.map_err(QmpError::Io)?;
                match stream.try_io(Interest::WRITABLE, || send_with_fd(stream, &bytes, fd)) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(QmpError::Io(e)),
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout(self.timeout))??;
        // The descriptor went with the first byte; the rest is plain data.
        if sent < bytes.len() {
            self.write_all(&bytes[sent..]).await?;
        }
        self.answer(command).await
    }

    fn encode(command: &str, arguments: Option<Value>) -> Vec<u8> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        bytes
    }

    /// The answer to `command`, skipping events; bounded by the timeout as a whole.
    async fn answer(&mut self, command: &str) -> Result<Value, QmpError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async {
            loop {
                let reply = self.read_line().await?;
                if reply.get("event").is_some() {
                    continue;
                }
                if let Some(ret) = reply.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = reply.get("error") {
                    return Err(QmpError::Command {
                        command: command.to_owned(),
                        class: escape_str(&err["class"]),
                        desc: escape_str(&err["desc"]),
                    });
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout(timeout))?
    }

    /// Freeze the vCPUs (`stop`; a no-op on a frozen VM).
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(|_| ())
    }

    /// Unfreeze the vCPUs (`cont`); after an outgoing migration this also takes
    /// the block devices back (QEMU re-activates them).
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(|_| ())
    }

    /// Hand QEMU a duplicate of `fd` under `name` (`getfd`), for `fd:NAME` URIs.
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), fd)
            .await
            .map(|_| ())
    }

    /// Drop a descriptor given with [`Self::getfd`] that was not consumed.
    pub async fn closefd(&mut self, name: &str) -> Result<(), QmpError> {
        self.execute("closefd", Some(json!({ "fdname": name })))
            .await
            .map(|_| ())
    }

    /// Set one migration capability (`migrate-set-capabilities`).
    pub async fn set_migration_capability(
        &mut self,
        capability: &str,
        state: bool,
    ) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": capability, "state": state }] })),
        )
        .await
        .map(|_| ())
    }

    /// Start an outgoing migration to `uri` (returns at once; poll
    /// [`Self::query_migrate`]).
    pub async fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(|_| ())
    }

    /// Start the incoming migration of a QEMU started with `-incoming defer`.
    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(|_| ())
    }

    /// Where the current (or last) migration is.
    pub async fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let v = self.execute("query-migrate", None).await?;
        Ok(MigrationInfo::from_value(&v))
    }

    /// Guest RAM size in bytes (`query-memory-size-summary`).
    pub async fn base_memory(&mut self) -> Result<u64, QmpError> {
        let v = self.execute("query-memory-size-summary", None).await?;
        v.get("base-memory")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Unexpected {
                command: "query-memory-size-summary".into(),
                answer: super::escape_guest_text(v.to_string().as_bytes()),
            })
    }

    pub async fn query_status(&mut self) -> Result<VmStatus, QmpError> {
        let v = self.execute("query-status", None).await?;
        serde_json::from_value(v.clone()).map_err(|source| QmpError::Malformed {
            line: v.to_string(),
            source,
        })
    }

    /// ACPI power button: the guest decides whether to shut down.
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(|_| ())
    }

    /// Make QEMU exit now. The socket may close before the answer arrives.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use tokio::net::UnixListener;

    /// A scripted fake QMP server checks the client's framing and event skipping.
    #[tokio::test]
    async fn negotiates_skips_events_and_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut seen = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap() > 0 {
                let v: Value = serde_json::from_str(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_owned();
                line.clear();
                let reply = match cmd.as_str() {
                    "qmp_capabilities" => "{\"return\": {}}\n".to_owned(),
                    "query-status" => "{\"event\": \"X\", \"data\": {}}\n{\"return\": {\"running\": true, \"singlestep\": false, \"status\": \"running\"}}\n".to_owned(),
                    _ => "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n".to_owned(),
                };
                seen.push(cmd);
                w.write_all(reply.as_bytes()).await.unwrap();
            }
            seen
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(2))
            .await
            .unwrap();
        let st = c.query_status().await.unwrap();
        assert_eq!(st.status, "running");
        assert!(st.running);
        let err = c.system_powerdown().await.unwrap_err();
        assert!(matches!(err, QmpError::Command { ref desc, .. } if desc == "nope"));
        drop(c);
        let seen = server.await.unwrap();
        assert_eq!(
            seen,
            ["qmp_capabilities", "query-status", "system_powerdown"]
        );
    }

    /// Blocking `recvmsg(2)`: bytes and any `SCM_RIGHTS` descriptors.
    fn recv_with_fds(sock: &std::os::unix::net::UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        use std::os::fd::FromRawFd;
        let mut buf = vec![0u8; 4096];
        let mut control = vec![0u64; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is valid; pointers below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() * 8;
        // SAFETY: `msg` describes live buffers owned by this frame.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
        buf.truncate(n as usize);
        let mut fds = Vec::new();
        // SAFETY: walking the control buffer the kernel filled, with its own macros.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        (buf, fds)
    }

    /// A scripted fake QEMU receives the state file with `getfd` (SCM_RIGHTS),
    /// writes into it as a migration would, and the client sees the framing of
    /// `migrate-set-capabilities`, `getfd`, `migrate` and `query-migrate`.
    #[tokio::test]
    async fn getfd_passes_the_descriptor_and_migration_is_framed() {
        use std::io::{Read, Seek, Write};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut seen: Vec<Value> = Vec::new();
            let mut pending = Vec::new();
            let mut polls = 0;
            loop {
                let (bytes, fds) = recv_with_fds(&s);
                if bytes.is_empty() {
                    return seen;
                }
                pending.extend_from_slice(&bytes);
                let mut fds = fds.into_iter();
                while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    let v: Value = serde_json::from_slice(&line).unwrap();
                    let fd = fds.next();
                    let reply = match v["execute"].as_str().unwrap() {
                        "getfd" => {
                            let mut f =
                                std::fs::File::from(fd.expect("getfd without a descriptor"));
                            f.write_all(b"device state").unwrap();
                            "{\"return\": {}}\n".to_owned()
                        }
                        "query-migrate" => {
                            polls += 1;
                            if polls < 2 {
                                "{\"return\": {\"status\": \"active\"}}\n".to_owned()
                            } else {
                                "{\"event\": \"MIGRATION\", \"data\": {}}\n{\"return\": {\"status\": \"failed\", \"error-desc\": \"disk \\u001b[31mfull\"}}\n".to_owned()
                            }
                        }
                        _ => {
                            assert!(fd.is_none(), "descriptor sent with {v}");
                            "{\"return\": {}}\n".to_owned()
                        }
                    };
                    seen.push(v);
                    s.write_all(reply.as_bytes()).unwrap();
                }
            }
        });
        let mut state = tempfile::tempfile().unwrap();
        let mut c = QmpClient::connect(&path, Duration::from_secs(2))
            .await
            .unwrap();
        c.set_migration_capability("x-ignore-shared", true)
            .await
            .unwrap();
        c.getfd("state", std::os::fd::AsFd::as_fd(&state))
            .await
            .unwrap();
        c.migrate("fd:state").await.unwrap();
        assert_eq!(c.query_migrate().await.unwrap().status, "active");
        let failed = c.query_migrate().await.unwrap();
        assert_eq!(failed.status, "failed");
        // QEMU's text is escaped before anyone logs it.
        assert_eq!(failed.error.as_deref(), Some("disk \\x1b[31mfull"));
        drop(c);
        let seen = server.join().unwrap();
        assert_eq!(
            seen,
            [
                json!({"execute": "qmp_capabilities"}),
                json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "x-ignore-shared", "state": true}]}}),
                json!({"execute": "getfd", "arguments": {"fdname": "state"}}),
                json!({"execute": "migrate", "arguments": {"uri": "fd:state"}}),
                json!({"execute": "query-migrate"}),
                json!({"execute": "query-migrate"}),
            ]
        );
        // What the fake QEMU wrote through its copy of the descriptor is in our file.
        let mut got = String::new();
        state.rewind().unwrap();
        state.read_to_string(&mut got).unwrap();
        assert_eq!(got, "device state");
    }

    /// A QEMU that floods events, sends an endless line or says nothing yields an
    /// error within the timeout, never a hang.
    #[tokio::test]
    async fn hostile_answers_are_bounded() {
        for script in ["events", "long", "silent", "garbage"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("qmp.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let server = tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"{\"QMP\": {}}\n").await.unwrap();
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                w.write_all(b"{\"return\": {}}\n").await.unwrap();
                line.clear();
                r.read_line(&mut line).await.unwrap();
                match script {
                    "events" => loop {
                        if w.write_all(b"{\"event\": \"X\"}\n").await.is_err() {
                            break;
                        }
                        tokio::task::yield_now().await;
                    },
                    "long" => {
                        let chunk = vec![b'x'; 64 * 1024];
                        while w.write_all(&chunk).await.is_ok() {}
                    }
                    "garbage" => {
                        let _ = w.write_all(b"{\"return\": \x1b\n").await;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    _ => tokio::time::sleep(Duration::from_secs(5)).await,
                }
            });
            let mut c = QmpClient::connect(&path, Duration::from_millis(500))
                .await
                .unwrap();
            let started = std::time::Instant::now();
            let err = c.query_status().await.unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(3), "{script}");
            match script {
                "long" => assert!(matches!(err, QmpError::LineTooLong), "{err}"),
                "garbage" => assert!(matches!(err, QmpError::Malformed { .. }), "{err}"),
                _ => assert!(matches!(err, QmpError::Timeout(_)), "{script}: {err}"),
            }
            drop(c);
            server.abort();
        }
    }
}

//! A small typed QMP client: JSON lines over the VMM's Unix socket.
//!
//! Owns one connection: greeting, capabilities negotiation, then one command at a
//! time. Asynchronous events are skipped. It knows nothing about sandboxes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
        let mut line = String::new();
        let n = tokio::time::timeout(self.timeout, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout(self.timeout))?
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|source| QmpError::Malformed { line, source })
    }

    /// Run one command and return its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await.map_err(QmpError::Io)?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: err["class"].as_str().unwrap_or_default().to_owned(),
                    desc: err["desc"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
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
}

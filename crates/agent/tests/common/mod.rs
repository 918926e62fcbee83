//! Shared preamble of the host agent's integration tests: images, config, client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use connectrpc::client::{ClientConfig, HttpClient};
use hearth_agent::{Accel, AgentConfig, RunningAgent};
use hearth_proto::hearth::agent::v1 as pb;

pub type Client = pb::HostAgentClient<HttpClient>;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "hearth_agent=info".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn images_dir() -> PathBuf {
    std::env::var_os("HEARTH_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/hearth/images"))
}

/// The real images, or `None` after a loud skip message.
pub fn real_images(test: &str) -> Option<PathBuf> {
    let dir = images_dir();
    if dir.join("kernel/vmlinux").is_file() && dir.join("templates/minimal/rootfs.ext4").is_file() {
        return Some(dir);
    }
    eprintln!(
        "\n!!!!!!!! SKIPPING {test}: no guest kernel/template under {} \
         (run scripts/build-images.sh) !!!!!!!!\n",
        dir.display()
    );
    None
}

pub fn config(images: &Path, run: &Path) -> AgentConfig {
    let mut c = AgentConfig::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        images.to_owned(),
        run.to_owned(),
    );
    c.accel = Accel::Tcg;
    c
}

pub fn client(agent: &RunningAgent) -> Client {
    let uri = format!("http://{}", agent.local_addr()).parse().unwrap();
    pb::HostAgentClient::new(HttpClient::plaintext(), ClientConfig::new(uri))
}

/// Why a process run through the proxy failed before it ended.
#[derive(Debug)]
pub enum ExecError {
    Start(String),
    Stream(String),
}

/// Run `cmd args` in the guest with an envd `process.Process/Start` client pointed at
/// the agent's proxy, exactly as the control plane does. Returns stdout and the exit
/// code (`None` when the stream ended without an end event).
pub async fn try_exec(
    agent: SocketAddr,
    id: &hearth_types::SandboxId,
    cmd: &str,
    args: &[&str],
) -> Result<(String, Option<i32>), ExecError> {
    use hearth_proto::process as pp;
    use pp::__buffa::oneof::process_event::{data_event::Output, Event};
    let uri = format!("http://{agent}/sandboxes/{id}/envd")
        .parse()
        .map_err(|e: http::uri::InvalidUri| ExecError::Start(e.to_string()))?;
    let c = pp::ProcessClient::new(HttpClient::plaintext(), ClientConfig::new(uri));
    let req = pp::StartRequest {
        process: pp::ProcessConfig {
            cmd: cmd.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    };
    let mut stream = c
        .start(req)
        .await
        .map_err(|e| ExecError::Start(e.to_string()))?;
    let mut out = String::new();
    let mut code = None;
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|e| ExecError::Stream(e.to_string()))?
    {
        match msg
            .to_owned_message()
            .event
            .into_option()
            .and_then(|e| e.event)
        {
            Some(Event::Data(d)) => {
                if let Some(Output::Stdout(b)) = d.output {
                    out.push_str(&String::from_utf8_lossy(&b));
                }
            }
            Some(Event::End(e)) => code = Some(e.exit_code),
            _ => {}
        }
    }
    Ok((out, code))
}

/// Poll `cond` every 50 ms for at most `limit`.
pub async fn eventually(limit: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cond()
}

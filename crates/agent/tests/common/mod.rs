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

//! hearth's guest agent: PID 1 inside every VM and an E2B-envd-compatible server
//! (Connect services `process.Process` and `filesystem.Filesystem` plus envd's HTTP
//! endpoints) on port 49983.
#![allow(refining_impl_trait_internal, refining_impl_trait_reachable)]

pub mod as_user;
pub mod auth;
pub mod cmdline;
pub mod files_http;
pub mod fs;
pub mod growfs;
pub mod init;
pub mod metrics;
pub mod net;
pub mod process;
pub mod reaper;
pub mod server;
pub mod state;
pub mod users;
pub mod watch;

/// Console line printed once the server listens.
pub const READY_MARKER: &str = "HEARTH_GUEST_READY";
/// Console line printed by `hearth.probe=1` boots before powering off.
pub const PROBE_MARKER: &str = "HEARTH_PROBE_OK";

/// Serves the agent on an already bound listener until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: state::AgentState,
) -> std::io::Result<()> {
    serve_with(listener, state, server::ServerLimits::default()).await
}

/// [`serve`] with explicit transport limits.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: state::AgentState,
    limits: server::ServerLimits,
) -> std::io::Result<()> {
    reaper::start();
    server::serve(listener, files_http::app(state), limits).await;
    Ok(())
}

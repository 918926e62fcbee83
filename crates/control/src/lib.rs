//! hearth's control plane: the public REST API (`/v1`), API-key auth, the scheduler
//! that picks a host agent, and the reconciler that keeps the database in line with
//! what hosts run.
//!
//! Layers call downwards only: `http` (parse, validate, map errors) -> `app` (logic)
//! -> `hearth_db` (store) and `app::hosts::HostClient` (host agents). All durable
//! state is in the database; this process can restart at any time.
//!
//! Entry points: [`start`] runs everything from a [`ControlConfig`]; [`start_with`]
//! adds a deployment's routes and workers ([`Extensions`], see [`extend`]); [`router`]
//! builds the HTTP API over an [`AppState`] for in-process tests.

pub mod app;
pub mod extend;
pub mod http;

/// docs/extending.md, whose example is compiled and run as a doc-test.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/extending.md")]
pub struct ExtendingGuide;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hearth_db::Db;
use hearth_types::SandboxLimits;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use app::bootstrap;
pub use app::hosts::{AgentHostClient, HostClient};
pub use app::App;
pub use extend::{Extensions, WorkerContext};
pub use http::server::ServerLimits;
pub use http::{router, router_with, AppState};

/// Default largest file upload: 256 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 256 * 1024 * 1024;

/// Time between webhook delivery passes (on the leader).
pub const WEBHOOK_INTERVAL: Duration = Duration::from_millis(500);

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Address of the REST API (port 0 picks a free one; see [`RunningControl::local_addr`]).
    pub listen: SocketAddr,
    /// `sqlite://path?mode=rwc` or `sqlite::memory:`.
    pub database_url: String,
    /// Base URLs of the host agents, e.g. `http://127.0.0.1:7421`.
    pub agent_urls: Vec<String>,
    /// Shared secret of the host agents (`x-hearth-agent-token`); `None` if they run without one.
    pub agent_token: Option<String>,
    pub limits: SandboxLimits,
    pub max_upload_bytes: u64,
    pub reconcile_interval: Duration,
    /// Timeouts and connection cap of the API listener.
    pub server_limits: ServerLimits,
    /// Team quotas (default for teams without their own), create timeout, retention
    /// of finished sandboxes' rows.
    pub policy: app::Policy,
}

impl ControlConfig {
    pub fn new(listen: SocketAddr, database_url: impl Into<String>) -> Self {
        Self {
            listen,
            database_url: database_url.into(),
            agent_urls: Vec::new(),
            agent_token: None,
            limits: SandboxLimits::default(),
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            reconcile_interval: Duration::from_secs(2),
            // HTTP/2 too: E2B's SDKs may speak it (prior knowledge) to the sandbox proxy.
            server_limits: ServerLimits {
                http2: true,
                ..ServerLimits::default()
            },
            policy: app::Policy::default(),
        }
    }
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("opening the database failed")]
    Db(#[from] hearth_db::DbError),
    #[error("bootstrapping the default team failed")]
    Bootstrap(#[source] app::AppError),
    #[error("invalid host agent URL")]
    AgentUrl(#[source] app::hosts::HostError),
    #[error("an extension route overlaps a route of the API: {0}")]
    Extension(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A started control plane. Dropping it does not stop it; call [`shutdown`](Self::shutdown).
pub struct RunningControl {
    local_addr: SocketAddr,
    bootstrap_key: Option<String>,
    state: AppState,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    reconciler: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    workers: Vec<(String, JoinHandle<()>)>,
}

impl RunningControl {
    /// The address the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin API key created at first start (shown once), `None` on later starts.
    pub fn bootstrap_key(&self) -> Option<&str> {
        self.bootstrap_key.as_deref()
    }

    /// The shared state (database, hosts), e.g. for test harnesses that create teams.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Stop accepting requests, let in-flight ones finish, stop the reconciler and the
    /// extension workers (each within [`extend::WORKER_STOP_GRACE`]).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        let _ = self.reconciler.await;
        let _ = self.heartbeat.await;
        extend::join_workers(self.workers).await;
        self.state.app().db.close().await;
    }
}

/// Leadership of background work (the reconciler's changes to sandboxes) for the
/// next pass: kept while its connection answers, else sought again. With several
/// control planes on one PostgreSQL database exactly one leads; when it dies its lock
/// goes with its connection and another takes over within a pass or two.
async fn keep_leading(
    db: &hearth_db::Db,
    lead: Option<hearth_db::Leadership>,
) -> Option<hearth_db::Leadership> {
    if let Some(mut l) = lead {
        if l.still_leads().await {
            return Some(l);
        }
        tracing::warn!("lost the lead of background work (database connection broke)");
    }
    match db.try_lead("background").await {
        Ok(Some(l)) => {
            tracing::info!("leading background work (reconciler)");
            Some(l)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "could not ask for the lead of background work");
            None
        }
    }
}

/// Open the database (migrating it), bootstrap on first start, register the host
/// agents, and serve the API; the reconciler runs every `reconcile_interval`.
pub async fn start(config: ControlConfig) -> Result<RunningControl, ControlError> {
    start_with(config, Extensions::new()).await
}

/// [`start`], with a deployment's extra routes and background workers.
pub async fn start_with(
    config: ControlConfig,
    mut ext: Extensions,
) -> Result<RunningControl, ControlError> {
    let db = Db::connect(&config.database_url).await?;
    let bootstrap_key = bootstrap(&db).await.map_err(ControlError::Bootstrap)?;
    let mut hosts: Vec<Arc<dyn HostClient>> = Vec::new();
    for url in &config.agent_urls {
        hosts.push(Arc::new(
            AgentHostClient::new(url, config.agent_token.as_deref())
                .map_err(ControlError::AgentUrl)?,
        ));
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ControlError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ControlError::Bind {
        addr: config.listen,
        source,
    })?;
    let mut policy = config.policy.clone();
    // E2B clients reach port P of a sandbox as `P-<id>.<domain>`; `*.localhost`
    // resolves to loopback in browsers, so this serves a one-machine install as is.
    if policy.e2b_domain.is_none() {
        policy.e2b_domain = Some(format!("localhost:{}", local_addr.port()));
    }
    let state = AppState::new(
        App::new(db, hosts, config.limits, config.max_upload_bytes).with_policy(policy),
    );
    // First passes before serving, so a create right after start finds its host. They
    // only learn the hosts: changing rows waits for the lead (the loop's first tick, at
    // once), so a replica joining others never acts beside their leader.
    if let Err(e) = state.app().heartbeat_once().await {
        tracing::warn!(error = %e, "initial host heartbeat failed");
    }
    if let Err(e) = state.app().reconcile_pass(false).await {
        tracing::warn!(error = %e, "initial reconcile failed");
    }
    // axum panics on overlapping routes; say so as an error before anything runs.
    let app = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        router_with(state.clone(), &ext)
    }))
    .map_err(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        ControlError::Extension(msg)
    })?;
    let (stop, stop_rx) = watch::channel(false);

    let mut rx = stop_rx.clone();
    let limits = config.server_limits.clone();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        http::server::serve(listener, app, limits, shutdown).await;
    });

    let workers = ext.spawn_workers(state.app(), &stop_rx);
    let mut rx = stop_rx.clone();
    let app = state.app().clone();
    let period = app.policy.host_heartbeat.max(Duration::from_millis(100));
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rx.wait_for(|s| *s) => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = app.heartbeat_once().await {
                tracing::warn!(error = %e, "host heartbeat pass failed");
            }
        }
    });

    // Whether this process leads background work now (set by the reconciler's loop,
    // read by the webhook sender's).
    let leading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut rx = stop_rx.clone();
    let app = state.app().clone();
    let is_leader = leading.clone();
    let webhooks = tokio::spawn(async move {
        let mut tick = tokio::time::interval(WEBHOOK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rx.wait_for(|s| *s) => break,
                _ = tick.tick() => {}
            }
            if !is_leader.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = app.deliver_webhooks_once().await {
                tracing::warn!(error = %e, "webhook delivery pass failed");
            }
        }
    });

    let mut rx = stop_rx;
    let app = state.app().clone();
    let interval = config.reconcile_interval;
    let reconciler = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lead = None;
        loop {
            tokio::select! {
                _ = rx.wait_for(|s| *s) => break,
                _ = tick.tick() => {}
            }
            lead = keep_leading(&app.db, lead).await;
            leading.store(lead.is_some(), std::sync::atomic::Ordering::Relaxed);
            match app.reconcile_pass(lead.is_some()).await {
                Ok(r) if r.changed() => {
                    tracing::info!(
                        lost = r.lost.len(),
                        failed = r.failed.len(),
                        expired = r.expired.len(),
                        stale = r.stale.len(),
                        pruned = r.pruned,
                        paused = r.paused.len(),
                        retired = r.retired.len(),
                        corrected = r.corrected.len(),
                        "reconciler pass changed sandboxes"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reconciler pass failed"),
            }
        }
        leading.store(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(l) = lead {
            l.release().await;
        }
        let _ = webhooks.await;
    });

    tracing::info!(addr = %local_addr, agents = config.agent_urls.len(), "control plane started");
    Ok(RunningControl {
        local_addr,
        bootstrap_key,
        state,
        stop,
        server,
        reconciler,
        heartbeat,
        workers,
    })
}

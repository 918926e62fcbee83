//! `hearth up`, `hearth server`, `hearth agent`: the long-running processes.
//!
//! This module only turns flags into the configs of `hearth_agent` and
//! `hearth_control`, starts them, prints the first-start API key, and waits for
//! SIGINT/SIGTERM.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::config::{store_credentials, Credentials};

#[derive(Args, Clone)]
pub struct AgentOpts {
    /// Directory with kernel/ and templates/ (built by scripts/build-images.sh).
    #[arg(long, env = "HEARTH_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// Directory for per-sandbox state (disks, sockets, console logs).
    #[arg(long, env = "HEARTH_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Accelerator: auto (KVM if a boot probe of the guest kernel passes, else TCG), kvm or tcg.
    #[arg(long, env = "HEARTH_ACCEL", default_value = "auto")]
    pub accel: String,
    /// Destroy every sandbox of this agent when it is asked to stop (default: leave them
    /// running, so that the next start re-adopts them).
    #[arg(long)]
    pub destroy_on_shutdown: bool,
    /// Sandboxes this host runs at once.
    #[arg(long, env = "HEARTH_MAX_SANDBOXES", default_value_t = 64)]
    pub max_sandboxes: usize,
    /// Guest memory the host may promise, as a multiple of (host memory - reserve).
    #[arg(long, env = "HEARTH_MEMORY_OVERCOMMIT", default_value_t = hearth_agent::admission::CapacityConfig::default().memory_overcommit)]
    pub memory_overcommit: f64,
    /// Host memory (MiB) kept for the host itself: agent, QEMU overhead, page cache.
    #[arg(long, env = "HEARTH_MEMORY_RESERVE_MB", default_value_t = hearth_agent::admission::CapacityConfig::default().memory_reserve_mb)]
    pub memory_reserve_mb: u64,
    /// vCPUs of all sandboxes together (default: 4 x the host's cores).
    #[arg(long, env = "HEARTH_MAX_VCPUS")]
    pub max_vcpus: Option<u32>,
    /// Free space (MiB) kept on the run directory's filesystem.
    #[arg(long, env = "HEARTH_DISK_RESERVE_MB", default_value_t = hearth_agent::admission::CapacityConfig::default().disk_reserve_mb)]
    pub disk_reserve_mb: u64,
    /// Built-in templates to make warm at start (a booted, idle VM of the default
    /// shape saved with its memory, so that plain creates restore in a fraction of a
    /// boot): `all` (every built-in template on this host), `none`, or names
    /// separated by commas. Runs in the background; creates meanwhile boot.
    #[arg(long, env = "HEARTH_WARM_TEMPLATES", default_value = "all")]
    pub warm_templates: String,
    /// VMs kept restored and frozen per warm template (default shape), so that a create
    /// of that template takes one in the time of a guest `/init` (tens of ms). Each
    /// holds its memory, a network slot and a QEMU process; they count against host
    /// capacity and give way to creates when it is short. 0 turns the pool off.
    #[arg(long, env = "HEARTH_WARM_POOL", default_value_t = 2)]
    pub warm_pool: usize,
    /// Also serve the host agent's Prometheus metrics (`GET /metrics` only, plain HTTP,
    /// no token) on this address, e.g. 10.0.0.5:9421; bind it where only Prometheus
    /// reaches. The agent's main port serves them too, behind its token.
    #[arg(long, env = "HEARTH_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Args, Clone)]
pub struct TokenOpts {
    /// File holding the host agent's shared secret (the control plane sends it on every
    /// call). The secret may also come from the HEARTH_AGENT_TOKEN environment variable.
    #[arg(long, env = "HEARTH_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,
}

impl TokenOpts {
    fn resolve(&self) -> Result<Option<String>> {
        if let Some(path) = &self.agent_token_file {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("reading the agent token from {}", path.display()))?;
            let t = t.trim().to_string();
            anyhow::ensure!(!t.is_empty(), "{} is empty", path.display());
            return Ok(Some(t));
        }
        Ok(std::env::var("HEARTH_AGENT_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()))
    }
}

/// Team quotas and row retention of the control plane.
#[derive(Args, Clone)]
pub struct PolicyOpts {
    /// Concurrent sandboxes per team (teams without their own quota).
    #[arg(long, env = "HEARTH_TEAM_MAX_SANDBOXES", default_value_t = hearth_types::TeamQuota::default().max_sandboxes)]
    pub team_max_sandboxes: u32,
    /// vCPUs per team, over its active sandboxes.
    #[arg(long, env = "HEARTH_TEAM_MAX_VCPUS", default_value_t = hearth_types::TeamQuota::default().max_vcpus)]
    pub team_max_vcpus: u32,
    /// Memory MiB per team, over its active sandboxes.
    #[arg(long, env = "HEARTH_TEAM_MAX_MEMORY_MB", default_value_t = hearth_types::TeamQuota::default().max_memory_mb)]
    pub team_max_memory_mb: u64,
    /// Disk MiB per team, over its active sandboxes.
    #[arg(long, env = "HEARTH_TEAM_MAX_DISK_MB", default_value_t = hearth_types::TeamQuota::default().max_disk_mb)]
    pub team_max_disk_mb: u64,
    /// Exec streams (JSON exec and WebSocket sessions) a team may have open at once.
    #[arg(long, env = "HEARTH_TEAM_MAX_EXEC_STREAMS", default_value_t = hearth_control::app::concurrency::StreamCaps::default().exec_streams)]
    pub team_max_exec_streams: u32,
    /// File uploads and downloads a team may have in flight at once.
    #[arg(long, env = "HEARTH_TEAM_MAX_TRANSFERS", default_value_t = hearth_control::app::concurrency::StreamCaps::default().transfers)]
    pub team_max_transfers: u32,
    /// Days a stopped or failed sandbox stays listed (`--all`) before its row is deleted.
    #[arg(long, env = "HEARTH_RETENTION_DAYS", default_value_t = 7)]
    pub retention_days: u32,
    /// Days a sandbox may stay paused (since its last change) before it is destroyed.
    #[arg(long, env = "HEARTH_PAUSED_RETENTION_DAYS", default_value_t = 30)]
    pub paused_retention_days: u32,
    /// Domain E2B clients are told to reach sandbox ports under: port P of sandbox ID
    /// is `P-ID.DOMAIN`, answered by this server's sandbox proxy when that name points
    /// at it (a wildcard DNS record, or `*.localhost` on one machine). Default:
    /// `localhost:PORT` with this server's port.
    #[arg(long, env = "HEARTH_E2B_DOMAIN")]
    pub e2b_domain: Option<String>,
    /// Milliseconds between reconciler passes (each compares every host's sandboxes
    /// with the database; with several servers on one database only the leader changes
    /// rows, the others refresh what they know of the hosts).
    #[arg(long, env = "HEARTH_RECONCILE_INTERVAL_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(50..=3_600_000))]
    pub reconcile_interval_ms: u64,
    /// Seconds a create may stay `starting` before the reconciler calls it failed and
    /// asks its host to destroy whatever it made (a server that died mid-create).
    #[arg(long, env = "HEARTH_CREATE_TIMEOUT_S", default_value_t = 240,
          value_parser = clap::value_parser!(u64).range(5..=86_400))]
    pub create_timeout_s: u64,
    /// Let webhooks call loopback, private and link-local addresses (refused by default:
    /// a tenant's webhook must not reach this server's own network).
    #[arg(long, env = "HEARTH_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
    /// Milliseconds between two heartbeats (Info polls) of each enrolled host.
    #[arg(long, env = "HEARTH_HOST_HEARTBEAT_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub host_heartbeat_ms: u64,
    /// Seconds without an answer before an enrolled host is marked unreachable (no new
    /// sandboxes go there).
    #[arg(long, env = "HEARTH_HOST_UNREACHABLE_AFTER_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub host_unreachable_after_s: u64,
    /// Seconds without an answer before an unreachable host's running and paused
    /// sandboxes are marked error (lost).
    #[arg(long, env = "HEARTH_HOST_LOST_AFTER_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=30 * 86_400))]
    pub host_lost_after_s: u64,
    /// Seconds an enrollment token from `hearth admin host create` works.
    #[arg(long, env = "HEARTH_ENROLL_TOKEN_TTL_S", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..=7 * 86_400))]
    pub enroll_token_ttl_s: u64,
}

impl PolicyOpts {
    fn policy(&self) -> hearth_control::app::Policy {
        hearth_control::app::Policy {
            team_quota: hearth_types::TeamQuota {
                max_sandboxes: self.team_max_sandboxes,
                max_vcpus: self.team_max_vcpus,
                max_memory_mb: self.team_max_memory_mb,
                max_disk_mb: self.team_max_disk_mb,
            },
            retention: std::time::Duration::from_secs(u64::from(self.retention_days) * 24 * 3600),
            paused_retention: std::time::Duration::from_secs(
                u64::from(self.paused_retention_days) * 24 * 3600,
            ),
            streams: hearth_control::app::concurrency::StreamCaps {
                exec_streams: self.team_max_exec_streams,
                transfers: self.team_max_transfers,
                ..Default::default()
            },
            e2b_domain: self.e2b_domain.clone(),
            create_timeout: std::time::Duration::from_secs(self.create_timeout_s),
            webhook_allow_private: self.webhook_allow_private,
            host_heartbeat: std::time::Duration::from_millis(self.host_heartbeat_ms),
            host_unreachable_after: std::time::Duration::from_secs(self.host_unreachable_after_s),
            // Never before the host is unreachable.
            host_lost_after: std::time::Duration::from_secs(
                self.host_lost_after_s.max(self.host_unreachable_after_s),
            ),
            enroll_token_ttl: std::time::Duration::from_secs(self.enroll_token_ttl_s),
            ..Default::default()
        }
    }
}

/// Limits of the REST API's listener (slow or idle clients, connection count).
#[derive(Args, Clone)]
pub struct ListenerOpts {
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, env = "HEARTH_MAX_CONNECTIONS", default_value_t = hearth_control::ServerLimits::default().max_connections)]
    pub max_connections: usize,
    /// Seconds a client has to send a request head (also the idle keep-alive time).
    #[arg(long, env = "HEARTH_HEADER_TIMEOUT_S", default_value_t = hearth_control::ServerLimits::default().header_read_timeout.as_secs())]
    pub header_timeout_s: u64,
    /// Seconds a request body may send nothing before the request fails.
    #[arg(long, env = "HEARTH_BODY_IDLE_TIMEOUT_S", default_value_t = hearth_control::ServerLimits::default().body_idle_timeout.as_secs())]
    pub body_idle_timeout_s: u64,
}

impl ListenerOpts {
    fn limits(&self) -> hearth_control::ServerLimits {
        hearth_control::ServerLimits {
            max_connections: self.max_connections.max(1),
            header_read_timeout: std::time::Duration::from_secs(self.header_timeout_s.max(1)),
            body_idle_timeout: std::time::Duration::from_secs(self.body_idle_timeout_s.max(1)),
            // E2B's SDKs may speak HTTP/2 (prior knowledge) to the sandbox proxy.
            http2: true,
            ..Default::default()
        }
    }
}

#[derive(Args)]
pub struct UpArgs {
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,
    /// Address of the host agent's RPC and proxy port (mutual TLS: `hearth up` enrolls
    /// its own agent with the control plane's CA).
    #[arg(long, default_value = "127.0.0.1:7421")]
    pub agent_listen: SocketAddr,
    /// Data directory (database; images/ and run/ below it unless set apart).
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "/var/lib/hearth")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub agent: AgentOpts,
    #[command(flatten)]
    pub policy: PolicyOpts,
    #[command(flatten)]
    pub listener: ListenerOpts,
}

#[derive(Args)]
pub struct ServerArgs {
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,
    /// Data directory (holds hearth.db unless --database-url is given).
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "/var/lib/hearth")]
    pub data_dir: PathBuf,
    /// Database URL (default: sqlite in the data directory).
    #[arg(long, env = "HEARTH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// A static host agent's URL (repeatable), reached over plain HTTP with the shared
    /// agent token. Enrolled hosts (`hearth admin host create`, mutual TLS) come from
    /// the database and need no flag.
    #[arg(long = "agent-url")]
    pub agent_urls: Vec<String>,
    #[command(flatten)]
    pub token: TokenOpts,
    #[command(flatten)]
    pub policy: PolicyOpts,
    #[command(flatten)]
    pub listener: ListenerOpts,
}

#[derive(Args)]
pub struct AgentArgs {
    /// Address of the agent's RPC and proxy port.
    #[arg(long, default_value = "127.0.0.1:7421")]
    pub listen: SocketAddr,
    /// Data directory (images/ and run/ below it unless set apart; the enrolled
    /// identity in agent-identity/).
    #[arg(long, env = "HEARTH_DATA_DIR", default_value = "/var/lib/hearth")]
    pub data_dir: PathBuf,
    /// The control plane's API URL, for enrollment (with --enroll-token).
    #[arg(long, env = "HEARTH_CONTROL_URL")]
    pub control_url: Option<String>,
    /// One-time enrollment token from `hearth admin host create` (first start only):
    /// the agent makes its key, trades a CSR and the token for its certificate, and
    /// from then on serves mutual TLS only. Later starts need no token.
    #[arg(long, env = "HEARTH_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    #[command(flatten)]
    pub agent: AgentOpts,
    #[command(flatten)]
    pub token: TokenOpts,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr, coloured only on a terminal (a log file gets plain text).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn agent_config(
    listen: SocketAddr,
    data_dir: &std::path::Path,
    o: &AgentOpts,
    token: Option<String>,
) -> Result<hearth_agent::AgentConfig> {
    let accel: hearth_agent::Accel = o
        .accel
        .parse()
        .map_err(|e| anyhow::anyhow!("--accel: {e}"))?;
    let mut cfg = hearth_agent::AgentConfig::new(
        listen,
        o.images_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("images")),
        o.run_dir.clone().unwrap_or_else(|| data_dir.join("run")),
    );
    cfg.accel = accel;
    cfg.token = token;
    cfg.metrics_listen = o.metrics_listen;
    if !(o.memory_overcommit.is_finite() && o.memory_overcommit > 0.0) {
        anyhow::bail!(
            "--memory-overcommit must be a positive number, got {}",
            o.memory_overcommit
        );
    }
    cfg.max_sandboxes = o.max_sandboxes;
    // Tests of crash and failure paths only: arms lifecycle steps (see hearth_agent::faults).
    if let Ok(spec) = std::env::var("HEARTH_AGENT_FAULTS") {
        cfg.faults = hearth_agent::faults::Faults::parse(&spec)
            .map_err(|e| anyhow::anyhow!("HEARTH_AGENT_FAULTS: {e}"))?;
        tracing::warn!(faults = %spec, "fault injection armed (HEARTH_AGENT_FAULTS): for tests only");
    }
    cfg.warm_pool = o.warm_pool;
    cfg.warm_templates = match o.warm_templates.trim() {
        "none" | "" => Vec::new(),
        // Built-ins are the templates the images directory came with (no source sandbox).
        "all" => hearth_agent::templates::Store::new(cfg.images_dir.join("templates"))
            .list(false)
            .into_iter()
            .filter(|t| t.meta.source_sandbox_id.is_none())
            .map(|t| t.name)
            .collect(),
        list => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--warm-templates: {n:?}: {e}"))
            })
            .collect::<Result<_>>()?,
    };
    cfg.capacity = hearth_agent::admission::CapacityConfig {
        memory_overcommit: o.memory_overcommit,
        memory_reserve_mb: o.memory_reserve_mb,
        vcpu_limit: o.max_vcpus,
        disk_reserve_mb: o.disk_reserve_mb,
        ..cfg.capacity
    };
    Ok(cfg)
}

async fn start_control(
    listen: SocketAddr,
    data_dir: &std::path::Path,
    database_url: Option<String>,
    agent_urls: Vec<String>,
    agent_token: Option<String>,
    policy: &PolicyOpts,
    listener: &ListenerOpts,
) -> Result<hearth_control::RunningControl> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    make_private(data_dir, 0o700)?;
    // The database (and SQLite's -wal/-shm beside it) hold API key hashes and sandbox
    // env vars: root-only, also when an older install left them world-readable.
    for name in ["hearth.db", "hearth.db-wal", "hearth.db-shm"] {
        let p = data_dir.join(name);
        if p.exists() {
            make_private(&p, 0o600)?;
        }
    }
    let database_url = database_url
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", data_dir.join("hearth.db").display()));
    let mut cfg = hearth_control::ControlConfig::new(listen, database_url);
    cfg.agent_urls = agent_urls;
    cfg.agent_token = agent_token;
    cfg.policy = policy.policy();
    cfg.reconcile_interval = std::time::Duration::from_millis(policy.reconcile_interval_ms);
    cfg.server_limits = listener.limits();
    let control = hearth_control::start(cfg).await?;
    if let Some(key) = control.bootstrap_key() {
        let url = format!("http://{}", control.local_addr());
        let path = store_credentials(&Credentials {
            url: url.clone(),
            api_key: key.to_string(),
        })?;
        // Printed once, and only to a terminal: a redirected stdout is usually a log
        // file, and a log file is no place for a secret. It is in `path` either way.
        if std::io::stdout().is_terminal() {
            println!(
                "Admin API key (shown once, stored in {}): {key}",
                path.display()
            );
        } else {
            println!(
                "Admin API key created and stored in {} (mode 0600)",
                path.display()
            );
        }
    }
    tracing::info!(addr = %control.local_addr(), "control plane listening");
    Ok(control)
}

pub async fn up(a: UpArgs) -> Result<()> {
    private_umask();
    init_tracing();
    let control = start_control(
        a.listen,
        &a.data_dir,
        None,
        Vec::new(),
        None,
        &a.policy,
        &a.listener,
    )
    .await?;
    // Its own agent goes the way of any other: a host record, a one-time token, a CSR
    // traded for a certificate over the API, then mutual TLS.
    let identity = local_identity(&control, &a.data_dir, a.agent_listen).await?;
    let mut cfg = agent_config(a.agent_listen, &a.data_dir, &a.agent, None)?;
    cfg.host_id = Some(identity.host_id.clone());
    cfg.tls = Some(std::sync::Arc::new(identity.server_config()?));
    let agent = hearth_agent::Agent::start(cfg).await?;
    // Register it now, so a create right after start finds its host.
    if let Err(e) = control.state().app().heartbeat_once().await {
        tracing::warn!(error = %e, "first heartbeat of the local agent failed");
    }
    if let Err(e) = control.state().app().reconcile_once().await {
        tracing::warn!(error = %e, "first reconcile with the local agent failed");
    }
    println!(
        "hearth is up: API http://{} (host agent {} over mutual TLS, {})",
        control.local_addr(),
        agent.local_addr(),
        identity.host_id
    );
    shutdown_signal().await;
    tracing::info!("shutting down (sandboxes keep running and are re-adopted at the next start)");
    control.shutdown().await;
    if a.agent.destroy_on_shutdown {
        agent.destroy_all().await;
    }
    agent.shutdown().await;
    Ok(())
}

/// The identity of `hearth up`'s own agent: the stored one while the database still
/// knows it (not revoked), else a new host `local` enrolled through the API.
async fn local_identity(
    control: &hearth_control::RunningControl,
    data_dir: &std::path::Path,
    agent_listen: SocketAddr,
) -> Result<hearth_agent::identity::Identity> {
    use hearth_agent::identity::{self, Identity};
    let dir = identity::dir(data_dir);
    let app = control.state().app();
    if let Some(id) = Identity::load(&dir)? {
        match app.db.get_host(&id.host_id).await? {
            Some(h) if h.status != hearth_db::HostStatus::Revoked => return Ok(id),
            _ => {
                tracing::warn!(host_id = %id.host_id, "the local agent's host is unknown or revoked: enrolling it again")
            }
        }
    }
    // The control plane is in this process: reach the agent on loopback when it
    // listens on every address.
    let mut reach = agent_listen;
    if reach.ip().is_unspecified() {
        reach.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("https://{reach}");
    let mut made = None;
    for name in [
        "local".to_owned(),
        format!("local-{}", random_token()[..6].to_lowercase()),
    ] {
        match app.create_host_record(&name, &url).await {
            Ok(n) => {
                made = Some(n);
                break;
            }
            Err(hearth_control::app::AppError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let made = made.context("cannot name the local host")?;
    let control_url = format!("http://{}", control.local_addr());
    let id = enroll(&control_url, &made.token).await?;
    id.store(&dir)?;
    tracing::info!(host_id = %id.host_id, "local host agent enrolled");
    Ok(id)
}

/// Trade `token` and a CSR of a new key for this agent's certificate.
async fn enroll(control_url: &str, token: &str) -> Result<hearth_agent::identity::Identity> {
    let key = hearth_pki::HostKey::generate()?;
    let url = format!("{}/v1/hosts/enroll", control_url.trim_end_matches('/'));
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()?
        .post(&url)
        .json(&serde_json::json!({ "token": token, "csr": key.csr_pem }))
        .send()
        .await
        .with_context(|| format!("enrolling at {url}"))?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "enrollment refused ({status}): {}",
            v["error"]["message"].as_str().unwrap_or("no message")
        );
    }
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .with_context(|| format!("the enrollment answer has no {k}"))
    };
    Ok(hearth_agent::identity::Identity {
        host_id: field("host_id")?
            .parse()
            .map_err(|e| anyhow::anyhow!("the enrollment answer's host_id: {e}"))?,
        key_pem: key.key_pem,
        cert_pem: field("certificate")?,
        ca_pem: field("ca_certificate")?,
    })
}

pub async fn server(a: ServerArgs) -> Result<()> {
    private_umask();
    init_tracing();
    let control = start_control(
        a.listen,
        &a.data_dir,
        a.database_url,
        a.agent_urls,
        a.token.resolve()?,
        &a.policy,
        &a.listener,
    )
    .await?;
    shutdown_signal().await;
    control.shutdown().await;
    Ok(())
}

pub async fn agent(a: AgentArgs) -> Result<()> {
    use hearth_agent::identity::{self, Identity};
    private_umask();
    init_tracing();
    let dir = identity::dir(&a.data_dir);
    let identity = match (Identity::load(&dir)?, &a.enroll_token) {
        (Some(id), token) => {
            if token.is_some() {
                tracing::warn!(host_id = %id.host_id, dir = %dir.display(),
                    "already enrolled: --enroll-token ignored (remove the directory to enroll again)");
            }
            Some(id)
        }
        (None, Some(token)) => {
            let control = a
                .control_url
                .as_deref()
                .context("--enroll-token needs --control-url (the control plane's API)")?;
            let id = enroll(control, token).await?;
            id.store(&dir)?;
            tracing::info!(host_id = %id.host_id, dir = %dir.display(), "enrolled");
            Some(id)
        }
        (None, None) => None,
    };
    let mut cfg = agent_config(a.listen, &a.data_dir, &a.agent, a.token.resolve()?)?;
    if let Some(id) = &identity {
        cfg.host_id = Some(id.host_id.clone());
        cfg.tls = Some(std::sync::Arc::new(id.server_config()?));
        // Mutual TLS is the credential; a shared token would only be one more secret.
        cfg.token = None;
    } else {
        tracing::warn!("not enrolled: serving plain HTTP for a static --agent-url control plane (enroll with --control-url and --enroll-token)");
    }
    let agent = hearth_agent::Agent::start(cfg).await?;
    tracing::info!(addr = %agent.local_addr(), "host agent listening");
    shutdown_signal().await;
    if a.agent.destroy_on_shutdown {
        agent.destroy_all().await;
    }
    agent.shutdown().await;
    Ok(())
}

/// Set `path`'s mode (data directory 0700, database files 0600).
fn make_private(path: &std::path::Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting {} to mode {mode:o}", path.display()))
}

/// Files the servers create (database, run and state files, logs, sockets) are
/// private to root unless they say otherwise.
fn private_umask() {
    // SAFETY: umask(2) only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
}

fn random_token() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::rngs::OsRng, 40)
}

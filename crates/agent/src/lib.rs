//! `hearth_agent`: the host agent. It owns the VMs, disks and networks of one
//! host and serves the control plane over Connect RPC (`hearth.agent.v1.HostAgent`)
//! plus a streaming reverse proxy to every guest agent.
//!
//! Layout (calls only go downwards):
//! * [`service`] (RPC edge) and [`proxy`] (guest HTTP) ->
//! * [`sandbox`] (one actor per sandbox), [`reaper`], [`recovery`] ->
//! * [`registry`] (what runs), [`state`] (versioned `state.json`) ->
//! * [`vmm`], [`disk`], [`net`] (host side effects behind narrow traits).
//!
//! Its in-memory registry is the truth about what runs; `state.json` files let a
//! restarted agent re-adopt its VMs (graceful shutdown leaves them running).

pub mod admission;
mod console_route;
pub mod disk;
pub mod faults;
pub mod identity;
pub mod lifecycle;
pub mod metrics;
pub mod net;
mod pool;
pub mod proxy;
mod reaper;
pub mod recovery;
mod registry;
pub mod sandbox;
pub mod service;
pub mod snapshot;
pub mod state;
mod template_copy;
pub mod templates;
mod tools;
pub mod vmm;
mod warm;

#[cfg(test)]
mod admission_tests;
#[cfg(test)]
mod fake_tests;
#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod lifecycle_tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::IntoResponse;
use connectrpc::Router as ConnectRouter;
use hearth_types::{HostId, SandboxId, SandboxLimits, TemplateName};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{info, warn};

pub use disk::DiskKind;
pub use recovery::RecoveryReport;
pub use vmm::{guest_cmdline, Accel};

/// Default images directory (`$HEARTH_IMAGES_DIR`).
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/hearth/images";
/// Default run directory (`$HEARTH_RUN_DIR`).
pub const DEFAULT_RUN_DIR: &str = "/var/lib/hearth/run";
/// Default listen address of `hearth agent`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// Everything the agent needs to start. Build with [`AgentConfig::new`] or
/// [`AgentConfig::from_env`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    /// A second, plain-HTTP listener serving only `GET /metrics` (no token), for
    /// Prometheus; `None`: none (the metrics are on `listen` too, behind the token).
    pub metrics_listen: Option<SocketAddr>,
    pub images_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Host-wide slot claims, shared by every agent on the host.
    pub slots_dir: PathBuf,
    pub accel: Accel,
    /// `None`: read `<run_dir>/host-id`, or generate and store one there.
    pub host_id: Option<HostId>,
    pub disk: DiskKind,
    pub qemu_binary: PathBuf,
    /// Guest kernel; `None` = `<images_dir>/kernel/vmlinux`.
    pub kernel: Option<PathBuf>,
    pub limits: SandboxLimits,
    pub max_sandboxes: usize,
    /// Host capacity for admission (memory, vCPUs, disk); see [`admission`].
    pub capacity: admission::CapacityConfig,
    /// How long a guest agent gets to send response headers (after the request
    /// body was sent) on proxied calls. Bodies have no total timeout: streams are long-lived.
    pub guest_header_timeout: Duration,
    /// Limits of the agent's own listener (slow or idle clients, connection count).
    pub listener: hearth_serve::ServerLimits,
    /// How long a create waits for the guest agent's `/health`.
    pub boot_timeout: Duration,
    /// Shared secret the control plane must send in [`AGENT_TOKEN_HEADER`] on every
    /// request (RPC and proxy). `None` leaves the port open: only for loopback.
    pub token: Option<String>,
    /// Serve TLS with this config (an enrolled agent: [`identity::Identity`], which
    /// requires the control plane's client certificate). `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// VM confinement (uids, cgroups) and console bounds.
    pub vm: vmm::VmHostConfig,
    /// Steps of pause/resume/snapshot/fork armed to fail, hang or kill (tests only;
    /// empty in production). See [`faults`].
    pub faults: faults::Faults,
    /// Built-in templates whose warm variant (a saved idle VM of the default
    /// shape) the agent makes at start, in the background, so that plain creates
    /// from them restore instead of booting. Empty: none (the default here; the
    /// `hearth` commands warm every built-in unless told otherwise).
    pub warm_templates: Vec<TemplateName>,
    /// Restored, frozen VMs kept ready per warm template (default shape), so that
    /// a create takes one in the time of an `/init` ([`pool`]). 0: no pool.
    pub warm_pool: usize,
}

pub use hearth_proto::AGENT_TOKEN_HEADER;

impl AgentConfig {
    /// Defaults for everything else (accel auto, qcow2 disks, 60 s boot timeout,
    /// host-wide slots in /run/hearth/slots, host ID kept in the run directory).
    pub fn new(listen: SocketAddr, images_dir: PathBuf, run_dir: PathBuf) -> Self {
        Self {
            listen,
            metrics_listen: None,
            images_dir,
            run_dir,
            slots_dir: net::slots::DEFAULT_SLOTS_DIR.into(),
            accel: Accel::Auto,
            host_id: None,
            disk: DiskKind::Qcow2,
            qemu_binary: "qemu-system-x86_64".into(),
            kernel: None,
            limits: SandboxLimits::default(),
            max_sandboxes: 64,
            capacity: admission::CapacityConfig::default(),
            guest_header_timeout: Duration::from_secs(30),
            listener: default_listener_limits(),
            boot_timeout: Duration::from_secs(60),
            token: None,
            tls: None,
            vm: vmm::VmHostConfig::default(),
            faults: faults::Faults::default(),
            warm_templates: Vec::new(),
            warm_pool: 0,
        }
    }

    /// [`AgentConfig::new`] on [`DEFAULT_LISTEN`] with `$HEARTH_IMAGES_DIR` and
    /// `$HEARTH_RUN_DIR` (or their defaults).
    pub fn from_env() -> Self {
        let dir = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Self::new(
            DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7070))),
            dir("HEARTH_IMAGES_DIR", DEFAULT_IMAGES_DIR),
            dir("HEARTH_RUN_DIR", DEFAULT_RUN_DIR),
        )
    }
}

/// The agent's listener: request heads within 10 s (also the keep-alive idle time),
/// request bodies may pause for up to an hour (stdin of an interactive process streams
/// through the proxy), room for the control plane's many concurrent streams, and 5 s
/// for in-flight requests at shutdown.
fn default_listener_limits() -> hearth_serve::ServerLimits {
    hearth_serve::ServerLimits {
        header_read_timeout: Duration::from_secs(10),
        body_idle_timeout: Duration::from_secs(3600),
        max_connections: 4096,
        shutdown_grace: Duration::from_secs(5),
        // The control plane speaks HTTP/1.1 to it (upgrades for WebSockets included).
        http2: false,
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("missing or broken host tools: {}; run `bash scripts/setup.sh` to install them", missing.join("; "))]
    MissingTools { missing: Vec<String> },
    #[error("cannot confine VMs with cgroups (set the VM cgroup parent to none to run without)")]
    Cgroups(#[source] vmm::cgroup::CgroupError),
    #[error("could not install the host network guard (nftables table inet hearth_host)")]
    HostGuard(#[source] net::NetError),
    #[error("could not create {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another agent holds {path}")]
    RunDirBusy { path: PathBuf },
    #[error("host ID file {path}")]
    HostId {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `e` and its sources, joined with ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// Tasks that `abort()` must stop (actors, reaper, server).
#[derive(Debug, Default)]
pub(crate) struct Tasks(Mutex<Vec<AbortHandle>>);

impl Tasks {
    pub fn track(&self, h: AbortHandle) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        v.retain(|h| !h.is_finished());
        v.push(h);
    }
    fn abort_all(&self) {
        let v = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for h in v {
            h.abort();
        }
    }
}

/// Bound on a guest's response head (status line and headers), bytes.
pub(crate) const GUEST_MAX_HEAD_BYTES: usize = 16 * 1024;
/// Bound on the number of headers in a guest's response.
pub(crate) const GUEST_MAX_HEADERS: usize = 64;

pub(crate) type HttpClient = Client<HttpConnector, axum::body::Body>;

/// State shared by the service, the proxy, the actors and the background tasks.
pub(crate) struct Ctx {
    pub config: AgentConfig,
    pub host_id: HostId,
    pub vmm: Arc<dyn vmm::Vmm>,
    pub accel_reason: String,
    pub disks: Arc<dyn disk::DiskProvisioner>,
    pub net: Arc<dyn net::NetworkProvider>,
    pub slots: net::slots::Slots,
    pub registry: registry::Registry,
    pub tasks: Tasks,
    pub http: HttpClient,
    pub capacity: admission::Capacity,
    /// The host's templates (`<images>/templates`).
    pub templates: templates::Store,
    /// Fork points being handed to their copies: never swept as unused.
    pub pinned: Mutex<std::collections::HashSet<TemplateName>>,
    /// Held by the warmer for each unit of its work (one warm variant, one
    /// pooled VM); `true` once [`Agent::destroy_all`] has closed it, after which
    /// the warmer makes nothing more.
    pub warming: tokio::sync::Mutex<bool>,
    pub metrics: metrics::Metrics,
}

impl Ctx {
    pub fn new(
        config: AgentConfig,
        host_id: HostId,
        vmm: Arc<dyn vmm::Vmm>,
        accel_reason: String,
        disks: Arc<dyn disk::DiskProvisioner>,
        net: Arc<dyn net::NetworkProvider>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        // No idle pooling: a guest address is reused by the next sandbox in the
        // same slot, and a pooled connection to a dead guest would hang.
        // Guests are hostile: bounded response heads (buffer and header count);
        // redirects are never followed (hyper's client does not).
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http1_max_buf_size(GUEST_MAX_HEAD_BYTES)
            .http1_max_headers(GUEST_MAX_HEADERS)
            .build(connector);
        let capacity =
            admission::Capacity::resolve(&config.capacity, config.max_sandboxes, &config.run_dir);
        Self {
            vmm,
            accel_reason,
            disks,
            net,
            slots: net::slots::Slots::new(config.slots_dir.clone()),
            host_id,
            registry: registry::Registry::default(),
            tasks: Tasks::default(),
            http,
            capacity,
            templates: templates::Store::new(config.images_dir.join("templates")),
            pinned: Mutex::default(),
            warming: tokio::sync::Mutex::new(false),
            metrics: metrics::Metrics::new(),
            config,
        }
    }

    pub fn kernel_path(&self) -> PathBuf {
        self.config
            .kernel
            .clone()
            .unwrap_or_else(|| self.config.images_dir.join("kernel/vmlinux"))
    }
    /// `<images>/kernel/initrd.cpio` next to the kernel, when it exists.
    pub fn initrd_path(&self) -> Option<PathBuf> {
        let p = self.kernel_path().with_file_name("initrd.cpio");
        p.is_file().then_some(p)
    }
    pub fn template_rootfs(&self, name: &TemplateName) -> PathBuf {
        self.templates.rootfs(name)
    }

    /// Delete the fork points no registered sandbox depends on any more.
    pub fn sweep_fork_points(&self) {
        for t in self.templates.list(true) {
            if !t.meta.hidden {
                continue;
            }
            let pinned = self
                .pinned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&t.name);
            if pinned || self.registry.uses_template(&t.name) {
                continue;
            }
            match self.templates.delete(&t.name) {
                Ok(()) => info!(template = %t.name, "removed an unused fork point"),
                Err(e) => {
                    warn!(template = %t.name, error = %error_chain(&e), "could not remove a fork point")
                }
            }
        }
    }
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.config.run_dir.join("sandboxes")
    }
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes_dir().join(id.as_str())
    }
    /// Templates present on this host (those with a root disk), sorted; fork
    /// points and warm variants are the host's own business.
    pub fn template_names(&self) -> Vec<String> {
        self.templates
            .list(false)
            .into_iter()
            .map(|t| t.name.to_string())
            .collect()
    }
}

/// Entry point.
pub struct Agent;

impl Agent {
    /// Probe the accelerator, recover what a previous run left, start the reaper
    /// and serve on `config.listen`.
    pub async fn start(config: AgentConfig) -> Result<RunningAgent, AgentError> {
        let missing = tools::missing(&config).await;
        if !missing.is_empty() {
            return Err(AgentError::MissingTools { missing });
        }
        for dir in [&config.run_dir, &config.run_dir.join("sandboxes")] {
            private_dir(dir).map_err(|source| AgentError::Dir {
                path: dir.clone(),
                source,
            })?;
        }
        let lock = lock_run_dir(&config.run_dir)?;
        // Before any VM is adopted or started: only root reaches guests.
        net::host_guard::install()
            .await
            .map_err(AgentError::HostGuard)?;
        let host_id = match &config.host_id {
            Some(id) => id.clone(),
            None => load_or_create_host_id(&config.run_dir)?,
        };
        let kernel = config
            .kernel
            .clone()
            .unwrap_or_else(|| config.images_dir.join("kernel/vmlinux"));
        let probe_rootfs = first_template_rootfs(&config);
        let initrd = kernel.with_file_name("initrd.cpio");
        let (accel, accel_reason) = vmm::qemu::resolve_accel(
            config.accel,
            &config.qemu_binary,
            &kernel,
            initrd.is_file().then_some(initrd.as_path()),
            probe_rootfs.as_deref(),
            &config.run_dir,
        )
        .await;
        let confinement = config
            .vm
            .confinement(host_id.as_str())
            .map_err(AgentError::Cgroups)?;
        let ctx = Arc::new(Ctx::new(
            config.clone(),
            host_id,
            Arc::new(vmm::qemu::QemuVmm::new(
                config.qemu_binary.clone(),
                accel,
                confinement,
            )),
            accel_reason,
            disk::provisioner(config.disk),
            Arc::new(net::NetnsProvider),
        ));
        let recovery = recovery::recover(&ctx).await;

        let listener = tokio::net::TcpListener::bind(ctx.config.listen)
            .await
            .map_err(|source| AgentError::Bind {
                addr: ctx.config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| AgentError::Bind {
            addr: ctx.config.listen,
            source,
        })?;
        let app = router(ctx.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let limits = ctx.config.listener.clone();
        let stop = async {
            let _ = stop_rx.await;
        };
        let server = match ctx.config.tls.clone() {
            Some(tls) => tokio::spawn(hearth_serve::serve_tls(listener, app, limits, tls, stop)),
            None => tokio::spawn(hearth_serve::serve(listener, app, limits, stop)),
        };
        let metrics_addr = match ctx.config.metrics_listen {
            Some(addr) => Some(serve_metrics(&ctx, addr).await?),
            None => None,
        };
        let reaper = tokio::spawn(reaper::run(ctx.clone()));
        ctx.tasks.track(reaper.abort_handle());
        if !ctx.config.warm_templates.is_empty() {
            let c = ctx.clone();
            let warmer = tokio::spawn(async move {
                warm::warm_templates(c.clone()).await;
                if c.config.warm_pool > 0 {
                    pool::run(c).await;
                }
            });
            ctx.tasks.track(warmer.abort_handle());
        }
        info!(
            %local_addr,
            host_id = %ctx.host_id,
            vmm = ctx.vmm.kind(),
            accel = ctx.vmm.accel().as_str(),
            reason = %ctx.accel_reason,
            "host agent serving"
        );
        if ctx.config.token.is_none() && ctx.config.tls.is_none() && !local_addr.ip().is_loopback()
        {
            warn!(%local_addr, "no agent token: anyone who reaches this port controls its VMs; set one (hearth agent --token-file)");
        }
        Ok(RunningAgent {
            _lock: lock,
            ctx,
            local_addr,
            metrics_addr,
            server,
            stop: Some(stop_tx),
            recovery,
        })
    }
}

/// Create `dir` (and parents) and make it 0700: run directories hold sockets,
/// disks and state that only the agent may reach.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Take `<run_dir>/agent.lock` (flock, exclusive): two agents must never manage
/// the same run directory. The kernel drops the lock when the process dies.
fn lock_run_dir(run_dir: &std::path::Path) -> Result<std::fs::File, AgentError> {
    use std::os::fd::AsRawFd;
    let path = run_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| AgentError::Dir {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock(2) on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(AgentError::RunDirBusy { path });
    }
    Ok(file)
}

/// The host ID kept in `<run_dir>/host-id`, created on first start.
fn load_or_create_host_id(run_dir: &std::path::Path) -> Result<HostId, AgentError> {
    let path = run_dir.join("host-id");
    if let Ok(raw) = std::fs::read_to_string(&path) {
        match raw.trim().parse() {
            Ok(id) => return Ok(id),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "invalid host ID file; replacing it")
            }
        }
    }
    let id = HostId::generate();
    std::fs::write(&path, format!("{id}\n")).map_err(|source| AgentError::HostId {
        path: path.clone(),
        source,
    })?;
    Ok(id)
}

fn first_template_rootfs(config: &AgentConfig) -> Option<PathBuf> {
    let mut names: Vec<_> = std::fs::read_dir(config.images_dir.join("templates"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("rootfs.ext4"))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Serve `GET /metrics` alone, without the agent token, on `addr` (a tracked task:
/// it stops with the agent). Returns the bound address.
async fn serve_metrics(ctx: &Arc<Ctx>, addr: SocketAddr) -> Result<SocketAddr, AgentError> {
    let bind = |source| AgentError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
    let local = listener.local_addr().map_err(bind)?;
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_route))
        .with_state(ctx.clone());
    let limits = hearth_serve::ServerLimits {
        max_connections: 64,
        ..ctx.config.listener.clone()
    };
    let server = tokio::spawn(hearth_serve::serve(
        listener,
        app,
        limits,
        std::future::pending(),
    ));
    ctx.tasks.track(server.abort_handle());
    info!(%local, "metrics listening (plain HTTP, GET /metrics only)");
    Ok(local)
}

/// `GET /metrics`: Prometheus text.
async fn metrics_route(
    axum::extract::State(ctx): axum::extract::State<Arc<Ctx>>,
) -> axum::response::Response {
    match metrics::render(&ctx) {
        Ok(text) => ([(http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        )
            .into_response(),
    }
}

/// The agent's HTTP surface: the guest proxy routes plus the Connect service.
pub(crate) fn router(ctx: Arc<Ctx>) -> axum::Router {
    let service = Arc::new(service::AgentService { ctx: ctx.clone() });
    let connect = ConnectRouter::new().add_service(service);
    let token = ctx.config.token.clone();
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics_route))
        .route(
            "/sandboxes/{id}/envd/{*rest}",
            axum::routing::any(proxy::handle),
        )
        .route(
            "/sandboxes/{id}/console",
            axum::routing::get(console_route::handle),
        )
        .route(
            "/templates/{name}/export",
            axum::routing::get(template_copy::handle_export),
        )
        .route(
            "/templates/{name}/import",
            axum::routing::put(template_copy::handle_import),
        )
        .route(
            "/sandboxes/{id}/port/{port}/{*rest}",
            axum::routing::any(proxy::handle_port),
        )
        .route(
            "/sandboxes/{id}/port/{port}",
            axum::routing::any(proxy::handle_port_root),
        )
        .route(
            "/sandboxes/{id}/port/{port}/",
            axum::routing::any(proxy::handle_port_root),
        )
        .with_state(ctx)
        .fallback_service(connect.into_axum_service())
        .layer(axum::middleware::from_fn(move |req, next| {
            check_token(token.clone(), req, next)
        }))
        // Liveness for supervisors and tests; says nothing about sandboxes, so no token.
        .route("/healthz", axum::routing::get(|| async { "ok" }))
}

/// Refuse any request without the agent token, when one is configured.
async fn check_token(
    token: Option<String>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(want) = token {
        let got = req
            .headers()
            .get(AGENT_TOKEN_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(got, want.as_bytes()) {
            let body = serde_json::json!({"error": {"code": "unauthenticated",
                "message": format!("missing or wrong {AGENT_TOKEN_HEADER}")}});
            return (http::StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A started agent.
pub struct RunningAgent {
    /// Exclusive lock on `<run_dir>/agent.lock`, released when this is dropped.
    _lock: std::fs::File,
    ctx: Arc<Ctx>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    server: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
    recovery: RecoveryReport,
}

impl RunningAgent {
    /// The address the agent listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the plain metrics listener, when one was configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// What start-up recovery adopted and cleaned.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// `"kvm"` or `"tcg"`, and why.
    pub fn accel(&self) -> (&'static str, &str) {
        (self.ctx.vmm.accel().as_str(), &self.ctx.accel_reason)
    }

    /// This host's ID.
    pub fn host_id(&self) -> &HostId {
        &self.ctx.host_id
    }

    /// IDs of the sandboxes this agent runs.
    pub fn sandbox_ids(&self) -> Vec<SandboxId> {
        self.ctx
            .registry
            .all()
            .iter()
            .map(|h| h.snapshot().spec.sandbox_id)
            .collect()
    }

    /// Destroy every sandbox (VMs, networks, disks, run directories). The
    /// warmer stops first (its VM in the making finishes and is destroyed
    /// too), so no pooled VM is added behind the sweep.
    pub async fn destroy_all(&self) {
        *self.ctx.warming.lock().await = true;
        let all = self.ctx.registry.all();
        futures::future::join_all(all.iter().map(|h| h.destroy("destroy_all"))).await;
    }

    /// Graceful stop: stop serving (in-flight requests get a few seconds), stop
    /// the reaper and the actors. VMs keep running and are re-adopted by the next
    /// start on the same run directory.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
        self.ctx.tasks.abort_all();
        info!("host agent stopped; VMs left running for the next start");
    }

    /// Simulated crash (tests): drop every task at once, no cleanup, no goodbye.
    pub fn abort(self) {
        self.server.abort();
        self.ctx.tasks.abort_all();
    }

    /// Wait until the server stops on its own (it normally runs until shutdown).
    pub async fn wait(&mut self) {
        let _ = (&mut self.server).await;
    }
}

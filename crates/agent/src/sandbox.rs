//! One actor per sandbox: a tokio task that owns the sandbox's VM, disk, network
//! slot and run directory, and receives requests over a channel so lifecycle steps
//! never interleave. Cleanup runs inside the actor, never in a request future, so
//! a cancelled RPC cannot leave resources behind.
//!
//! ```text
//!            create                 guest /health = 204
//!   (none) ---------> Starting ---------------------------> Running
//!                        |  boot failure / destroy               |  destroy, reaper
//!                        v                                       v
//!                  (cleaned up, gone)     Error <---- VM died  Stopping --> Stopped (gone)
//!                                           |  destroy              ^
//!                                           +-----------------------+
//! ```
//! Any state may go to `Error`; only `destroy` releases an `Error` sandbox's
//! resources, so the control plane sees what happened before it is gone.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_types::SandboxId;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, info_span, warn, Instrument};

use crate::disk::{Disk, DiskError};
use crate::net::slots::SlotError;
use crate::net::{NetError, SandboxNet};
use crate::registry::{AlreadyExists, Command, InsertError, SandboxHandle};
use crate::state::{self, AccessToken, SandboxRecord, SandboxSpec, SandboxState, StateError};
use crate::vmm::{console, guest_cmdline, Nic, VmHandle, VmSpec, VmmError};
use crate::Ctx;

/// Bound on the guest's `/init` call after it answered health.
const GUEST_INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this much of a `/init` or `/health` response body is read.
pub(crate) const GUEST_BODY_LIMIT: usize = 4096;
/// envd's header carrying the sandbox's access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";
/// How often the guest's health endpoint is polled while booting.
const HEALTH_POLL: Duration = Duration::from_millis(15);
/// Bound on one health request (the guest may not answer ARP yet).
const HEALTH_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);
/// The error of a sandbox whose VM ended without being asked to.
pub const VM_GONE: &str = "the VM shut down or rebooted itself";
/// How long QEMU gets to exit after `quit` before SIGKILL.
const STOP_GRACE: Duration = Duration::from_millis(1500);

/// Why a sandbox could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("run directory {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest kernel {path} is missing")]
    KernelMissing { path: PathBuf },
    #[error("network slot")]
    Slot(#[source] SlotError),
    #[error("network setup")]
    Net(#[source] NetError),
    #[error("root disk")]
    Disk(#[source] DiskError),
    #[error("VMM")]
    Vmm(#[source] VmmError),
    #[error("state file")]
    State(#[source] StateError),
    #[error("guest agent refused its initial configuration (/init): {message}")]
    GuestInit { message: String },
    #[error("guest agent did not answer /health within {after:?}; console: {console}")]
    BootTimeout { after: Duration, console: String },
    #[error("VM exited during boot; qemu: {qemu_log}; console: {console}")]
    VmExited { qemu_log: String, console: String },
    #[error("destroyed while starting")]
    Cancelled,
    #[error("template {template} has no saved VM this host can restore for this shape")]
    NotWarm { template: String },
}

impl SandboxError {
    /// What failed, for the control plane and its users: no host paths, no tool
    /// output, no guest text (the full chain goes to the agent log).
    pub fn public_message(&self) -> String {
        match self {
            Self::RunDir { .. } => "could not prepare the sandbox's run directory".into(),
            Self::KernelMissing { .. } => "the guest kernel is missing on this host".into(),
            Self::Slot(SlotError::Exhausted { max, .. }) => {
                format!("all {max} network slots of this host are taken")
            }
            Self::Slot(_) => "could not claim a network slot".into(),
            Self::Net(_) => "could not set up the sandbox network".into(),
            Self::Disk(_) => "could not create the sandbox disk".into(),
            Self::Vmm(_) => "could not start the VM".into(),
            Self::State(_) => "could not write the sandbox state".into(),
            Self::GuestInit { .. } => {
                "the guest agent did not accept its initial configuration".into()
            }
            Self::BootTimeout { after, .. } => format!(
                "the guest did not become healthy within {}s",
                after.as_secs_f64().ceil() as u64
            ),
            Self::VmExited { .. } => "the VM exited during boot".into(),
            Self::Cancelled => "destroyed while starting".into(),
            Self::NotWarm { .. } => self.to_string(),
        }
    }
}

/// What a sandbox holds on the host; released in reverse order.
#[derive(Debug)]
pub(crate) struct Resources {
    pub run_dir: PathBuf,
    pub run_dir_ours: bool,
    pub slot: Option<u32>,
    pub net: Option<SandboxNet>,
    pub disk: Option<Disk>,
    pub vm: Option<VmHandle>,
}

pub(crate) struct Actor {
    pub ctx: Arc<Ctx>,
    pub id: SandboxId,
    pub self_tx: mpsc::Sender<Command>,
    pub record: watch::Sender<SandboxRecord>,
    pub res: Resources,
}

impl Actor {
    /// Apply `f` to the record and persist it (when the run directory is ours).
    /// A failed write is logged: use [`Actor::commit`] where it must not be lost.
    pub fn update(&self, f: impl FnOnce(&mut SandboxRecord)) {
        self.record.send_modify(f);
        if self.res.run_dir_ours {
            let rec = self.record.borrow().clone();
            if let Err(e) = state::save(&rec) {
                warn!(error = %e, "could not write the state file");
            }
        }
    }

    /// Apply `f` and persist it; when the write fails the record is left as it
    /// was (in memory and on disk) and the error returned.
    pub fn commit(&self, f: impl FnOnce(&mut SandboxRecord)) -> Result<(), StateError> {
        let mut next = self.record.borrow().clone();
        f(&mut next);
        state::save(&next)?;
        self.record.send_replace(next);
        Ok(())
    }
}

type CreateReply = oneshot::Receiver<Result<SandboxRecord, SandboxError>>;

/// Why a create was not even started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Registry(#[from] InsertError),
    #[error("could not generate an access token")]
    Token(#[source] std::io::Error),
}

/// Admit and register `spec` (atomically, before any resource is taken) and
/// start its actor. The returned receiver yields once the guest answers (or the
/// create failed and everything was cleaned up).
pub(crate) fn start_create(ctx: &Arc<Ctx>, spec: SandboxSpec) -> Result<CreateReply, StartError> {
    start_create_from(ctx, spec, None)
}

/// [`start_create`] with the disk and memory from `base` (a fork point) rather
/// than from the spec's template.
pub(crate) fn start_create_from(
    ctx: &Arc<Ctx>,
    spec: SandboxSpec,
    base: Option<hearth_types::TemplateName>,
) -> Result<CreateReply, StartError> {
    let id = spec.sandbox_id.clone();
    let run_dir = ctx.sandbox_dir(&id);
    let token = AccessToken::generate().map_err(StartError::Token)?;
    let mut record = SandboxRecord::new(spec, run_dir.clone(), Some(token));
    record.base = base;
    let (tx, rx) = mpsc::channel(8);
    let (rec_tx, rec_rx) = watch::channel(record);
    ctx.registry.insert_admitted(
        id.clone(),
        SandboxHandle {
            tx: tx.clone(),
            record: rec_rx,
        },
        &ctx.capacity,
    )?;
    let (reply_tx, reply_rx) = oneshot::channel();
    let actor = Actor {
        ctx: ctx.clone(),
        id: id.clone(),
        self_tx: tx,
        record: rec_tx,
        res: Resources {
            run_dir,
            run_dir_ours: false,
            slot: None,
            net: None,
            disk: None,
            vm: None,
        },
    };
    let span = info_span!("sandbox", sandbox_id = %id);
    let task = tokio::spawn(run_create(actor, rx, reply_tx).instrument(span));
    ctx.tasks.track(task.abort_handle());
    Ok(reply_rx)
}

/// Register a sandbox found at recovery (running with `vm`, or paused without)
/// and start its actor.
pub(crate) fn adopt(
    ctx: &Arc<Ctx>,
    record: SandboxRecord,
    vm: Option<VmHandle>,
) -> Result<(), AlreadyExists> {
    let id = record.spec.sandbox_id.clone();
    let (tx, rx) = mpsc::channel(8);
    let res = Resources {
        run_dir: record.run_dir.clone(),
        run_dir_ours: true,
        slot: record.slot,
        net: record.net.clone(),
        disk: record.disk.clone(),
        vm,
    };
    let (rec_tx, rec_rx) = watch::channel(record);
    ctx.registry.insert(
        id.clone(),
        SandboxHandle {
            tx: tx.clone(),
            record: rec_rx,
        },
    )?;
    let actor = Actor {
        ctx: ctx.clone(),
        id: id.clone(),
        self_tx: tx,
        record: rec_tx,
        res,
    };
    if let Some(vm) = &actor.res.vm {
        follow_console(ctx, &actor.res.run_dir, vm);
    }
    let span = info_span!("sandbox", sandbox_id = %id);
    let task = tokio::spawn(serve(actor, rx).instrument(span));
    ctx.tasks.track(task.abort_handle());
    Ok(())
}

/// Record the VM's console into its capped `console.log` until the VM exits
/// (also after an agent restart: the VMM serves the socket again).
pub(crate) fn follow_console(ctx: &Ctx, run_dir: &std::path::Path, vm: &VmHandle) {
    let task = tokio::spawn(
        console::follow(
            run_dir.join(console::CONSOLE_SOCKET),
            run_dir.join(console::CONSOLE_LOG),
            ctx.config.vm.console_cap_bytes,
            vm.clone(),
        )
        .in_current_span(),
    );
    ctx.tasks.track(task.abort_handle());
}

async fn run_create(
    mut actor: Actor,
    mut rx: mpsc::Receiver<Command>,
    reply: oneshot::Sender<Result<SandboxRecord, SandboxError>>,
) {
    let started = Instant::now();
    let mut pending_destroy = None;
    let outcome = {
        let Actor {
            ctx,
            record,
            res,
            id,
            ..
        } = &mut actor;
        tokio::select! {
            r = boot(ctx, id, record, res) => r,
            cmd = rx.recv() => {
                if let Some(Command::Destroy { done, reason }) = cmd {
                    info!(%reason, "destroy requested while starting");
                    pending_destroy = Some(done);
                }
                Err(SandboxError::Cancelled)
            }
        }
    };
    match outcome {
        Ok(()) => {
            let boot_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
            actor.update(|r| {
                r.state = SandboxState::Running;
                r.boot_ms = boot_ms;
            });
            info!(boot_ms, guest = ?actor.record.borrow().guest_address, "sandbox running");
            let rec = actor.record.borrow().clone();
            // The requester may be gone (cancelled RPC): the sandbox runs regardless.
            let _ = reply.send(Ok(rec));
            serve(actor, rx).await;
        }
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "create failed, cleaning up");
            actor.record.send_modify(|r| {
                r.state = SandboxState::Error;
                r.error = Some(e.public_message());
            });
            let rid = actor.record.borrow().resource_id().clone();
            release(&actor.ctx, &rid, &mut actor.res).await;
            actor.ctx.registry.remove(&actor.id, &actor.self_tx);
            if actor.record.borrow().base.is_some() {
                actor.ctx.sweep_fork_points();
            }
            let _ = reply.send(Err(e));
            if let Some(done) = pending_destroy {
                let _ = done.send(());
            }
        }
    }
}

async fn boot(
    ctx: &Ctx,
    id: &SandboxId,
    record: &watch::Sender<SandboxRecord>,
    res: &mut Resources,
) -> Result<(), SandboxError> {
    let save = |res: &Resources| {
        if res.run_dir_ours {
            state::save(&record.borrow()).map_err(SandboxError::State)
        } else {
            Ok(())
        }
    };
    let spec = record.borrow().spec.clone();
    let kernel = ctx.kernel_path();
    if !kernel.exists() {
        return Err(SandboxError::KernelMissing { path: kernel });
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        let mut private = std::fs::DirBuilder::new();
        private.mode(0o700);
        private
            .recursive(true)
            .create(ctx.sandboxes_dir())
            .map_err(|source| SandboxError::RunDir {
                path: ctx.sandboxes_dir(),
                source,
            })?;
        private
            .recursive(false)
            .create(&res.run_dir)
            .map_err(|source| SandboxError::RunDir {
                path: res.run_dir.clone(),
                source,
            })?;
    }
    res.run_dir_ours = true;
    save(res)?;

    let slot = ctx
        .slots
        .claim(id, &res.run_dir)
        .map_err(SandboxError::Slot)?;
    res.slot = Some(slot);
    record.send_modify(|r| r.slot = Some(slot));
    save(res)?;

    let net = ctx.net.setup(slot, id).await.map_err(SandboxError::Net)?;
    res.net = Some(net.clone());
    record.send_modify(|r| r.net = Some(net.clone()));
    save(res)?;

    // A warm template (or fork point, or a built-in's warm variant) of this
    // exact shape, saved by this VMM: restore its memory instead of booting.
    let fits = |w: &crate::templates::WarmMeta| {
        w.vcpus == spec.vcpus
            && w.memory_mb == spec.memory_mb
            && w.disk_size_mb == spec.disk_size_mb
            && w.saved.compat == ctx.vmm.snapshot_compat()
    };
    let explicit = record.borrow().base.clone();
    let (base_name, warm) = match explicit {
        Some(b) => match ctx.templates.warm(&b).filter(fits) {
            Some(w) => (b, Some(w)),
            None => {
                return Err(SandboxError::NotWarm {
                    template: b.to_string(),
                })
            }
        },
        None => {
            // A variant older than its built-in's image (rebuilt since) is not used.
            let variant = crate::templates::warm_variant(&spec.template)
                .filter(|v| crate::warm::variant_is_fresh(ctx, &spec.template, v))
                .and_then(|v| Some((ctx.templates.warm(&v).filter(fits)?, v)));
            match (ctx.templates.warm(&spec.template).filter(fits), variant) {
                (Some(w), _) => (spec.template.clone(), Some(w)),
                (None, Some((w, v))) => {
                    // Tracked as the sandbox's base: the variant stays while used.
                    record.send_modify(|r| r.base = Some(v.clone()));
                    (v, Some(w))
                }
                (None, None) => (spec.template.clone(), None),
            }
        }
    };
    let base = ctx.template_rootfs(&base_name);
    let disk = ctx
        .disks
        .create(&base, &res.run_dir.join("disk"), spec.disk_size_mb)
        .await
        .map_err(SandboxError::Disk)?;
    res.disk = Some(disk.clone());
    record.send_modify(|r| r.disk = Some(disk.clone()));
    save(res)?;

    let memory = match &warm {
        // The memory is in the state: the VM's own fresh file receives it.
        Some(w) if w.saved.memory_included => {
            crate::vmm::Memory::Shared(res.run_dir.join(state::MEMORY_FILE))
        }
        // Shared by every sandbox from this template, copy-on-write.
        Some(_) => crate::vmm::Memory::Private(
            ctx.templates.dir(&base_name).join(crate::templates::MEMORY),
        ),
        None => crate::vmm::Memory::Shared(res.run_dir.join(state::MEMORY_FILE)),
    };
    let vm_spec = VmSpec {
        name: id.to_string(),
        vcpus: spec.vcpus,
        memory_mb: spec.memory_mb,
        kernel,
        initrd: ctx.initrd_path(),
        cmdline: guest_cmdline(Some(id.as_str())),
        disk: disk.path.clone(),
        disk_format: disk.format,
        nic: Some(Nic::Tap(net.tap.clone())),
        netns: Some(net.netns.clone()),
        run_dir: res.run_dir.clone(),
        runas: ctx.config.vm.uid_for_slot(slot),
        memory,
        incoming: warm.is_some(),
    };
    record.send_modify(|r| {
        r.memory = vm_spec.memory.clone();
        r.restored = warm.is_some();
    });
    let vm = ctx.vmm.spawn(&vm_spec).await.map_err(SandboxError::Vmm)?;
    follow_console(ctx, &res.run_dir, &vm);
    let pid = vm.pid;
    res.vm = Some(vm.clone());
    record.send_modify(|r| {
        r.pid = Some(pid);
        r.guest_address = Some(net.guest_address);
    });
    save(res)?;
    let token = record.borrow().access_token.clone();
    match &warm {
        Some(w) => {
            let state = std::fs::File::open(
                ctx.templates
                    .dir(&base_name)
                    .join(crate::templates::VMSTATE),
            )
            .map_err(|source| SandboxError::RunDir {
                path: ctx.templates.dir(&base_name),
                source,
            })?;
            ctx.vmm
                .restore(&vm, &w.saved, state)
                .await
                .map_err(SandboxError::Vmm)?;
            ctx.vmm.resume(&vm).await.map_err(SandboxError::Vmm)?;
            info!(pid, slot, template = %base_name, "VM restored, handing the guest its identity");
            wait_healthy(ctx, &net, &vm, &res.run_dir).await?;
            // The restored guest holds the template's token: replace it at once.
            init_guest(
                ctx,
                &net,
                id,
                &spec.env,
                Some(&w.access_token),
                token.as_ref(),
            )
            .await
        }
        None => {
            info!(pid, slot, guest = %net.guest_address, "VM started, waiting for the guest agent");
            wait_healthy(ctx, &net, &vm, &res.run_dir).await?;
            init_guest(ctx, &net, id, &spec.env, None, token.as_ref()).await
        }
    }
}

/// Hand the guest agent what it cannot know by itself: the sandbox's environment
/// variables (defaults for every process), the host's clock, its hostname (the
/// sandbox ID) and the sandbox's access token (envd's `POST /init`). `current` is the token the guest already
/// holds (sent in `X-Access-Token`; `None` on a fresh boot), `new` the one it
/// must require from now on (after a resume or restore the two differ).
/// The whole call, body included, is bounded in time and size.
pub(crate) async fn init_guest(
    ctx: &Ctx,
    net: &SandboxNet,
    id: &SandboxId,
    env: &std::collections::BTreeMap<String, String>,
    current: Option<&AccessToken>,
    new: Option<&AccessToken>,
) -> Result<(), SandboxError> {
    let mut body = serde_json::json!({
        "envVars": env,
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        // A restored or forked guest wakes up with its source's name.
        "hostname": id.as_str(),
    });
    if let Some(new) = new {
        body["accessToken"] = new.as_str().into();
    }
    guest_post(ctx, net, "/init", current, Some(body.to_string()))
        .await
        .map_err(|message| SandboxError::GuestInit { message })
}

/// `POST <path>` to the guest agent with the token `token` (and a JSON body),
/// bounded in time ([`GUEST_INIT_TIMEOUT`], body included) and in the size of
/// what is read back; a non-2xx answer is an error quoting its (escaped) body.
async fn guest_post(
    ctx: &Ctx,
    net: &SandboxNet,
    path: &str,
    token: Option<&AccessToken>,
    json: Option<String>,
) -> Result<(), String> {
    let mut req = http::Request::post(format!("http://{}{path}", net.guest_address));
    if json.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    if let Some(t) = token {
        req = req.header(ACCESS_TOKEN_HEADER, t.as_str());
    }
    let req = req
        .body(json.map_or_else(axum::body::Body::empty, axum::body::Body::from))
        .map_err(|e| e.to_string())?;
    let call = async {
        let resp = ctx
            .http
            .request(req)
            .await
            .map_err(|e| format!("request failed: {}", crate::error_chain(&e)))?;
        let status = resp.status();
        let body = read_at_most(resp.into_body(), GUEST_BODY_LIMIT).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "HTTP {status}: {}",
                escape_guest_text(&String::from_utf8_lossy(&body), 300)
            ))
        }
    };
    tokio::time::timeout(GUEST_INIT_TIMEOUT, call)
        .await
        .map_err(|_| format!("no complete answer within {GUEST_INIT_TIMEOUT:?}"))?
}

/// Ask the guest to flush its filesystems to its disk (`POST /sync`, hearth's
/// extension of envd), bounded in time. Before a disk-only snapshot of a running
/// sandbox: without it the copy holds only what the guest kernel had written back.
pub(crate) async fn sync_guest(
    ctx: &Ctx,
    net: &SandboxNet,
    token: Option<&AccessToken>,
) -> Result<(), String> {
    guest_post(ctx, net, "/sync", token, None).await
}

/// The first `limit` bytes of `body` (less if it ends or fails first); the rest
/// is never read.
async fn read_at_most(mut body: hyper::body::Incoming, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let take = data.len().min(limit - out.len());
                    out.extend_from_slice(&data[..take]);
                }
            }
            _ => break,
        }
    }
    out
}

/// Guest text made safe for a log line or an error ([`crate::vmm::escape_guest_text`]),
/// cut to at most `max` bytes (plus a "..." marker).
pub(crate) fn escape_guest_text(s: &str, max: usize) -> String {
    let mut out = crate::vmm::escape_guest_text(s.as_bytes());
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// The end of the VM's console, escaped (never reads the whole log).
fn console_tail(run_dir: &std::path::Path) -> String {
    console::read_tail(run_dir, 1500)
}

pub(crate) async fn wait_healthy(
    ctx: &Ctx,
    net: &SandboxNet,
    vm: &VmHandle,
    run_dir: &std::path::Path,
) -> Result<(), SandboxError> {
    let url = format!("http://{}/health", net.guest_address);
    let started = Instant::now();
    let mut ready_seen = false;
    loop {
        if !ready_seen
            && tracing::enabled!(tracing::Level::DEBUG)
            && console::tail_contains(run_dir, "HEARTH_GUEST_READY", 64 * 1024)
        {
            ready_seen = true;
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "guest printed READY"
            );
        }
        if !vm.is_alive() {
            let qemu_log = console::tail_bytes(&run_dir.join("qemu.log"), 500);
            return Err(SandboxError::VmExited {
                qemu_log: crate::vmm::escape_guest_text(qemu_log.trim_ascii()),
                console: console_tail(run_dir),
            });
        }
        if started.elapsed() > ctx.config.boot_timeout {
            return Err(SandboxError::BootTimeout {
                after: ctx.config.boot_timeout,
                console: console_tail(run_dir),
            });
        }
        let req = http::Request::get(&url).body(axum::body::Body::empty());
        if let Ok(req) = req {
            let attempt = tokio::time::timeout(HEALTH_ATTEMPT_TIMEOUT, async {
                let resp = ctx.http.request(req).await.ok()?;
                let status = resp.status();
                let _ = http_body_util::Limited::new(resp.into_body(), GUEST_BODY_LIMIT)
                    .collect()
                    .await;
                Some(status)
            });
            // A VM that dies ends the attempt at once rather than at its timeout.
            tokio::select! {
                r = attempt => if let Ok(Some(http::StatusCode::NO_CONTENT)) = r {
                    tracing::debug!(ms = started.elapsed().as_millis() as u64, "guest answered /health");
                    return Ok(());
                },
                () = vm.exited() => continue,
            }
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

/// Serve a running sandbox until it is destroyed.
async fn serve(mut actor: Actor, mut rx: mpsc::Receiver<Command>) {
    let mut watching = actor.res.vm.is_some();
    loop {
        let vm = actor.res.vm.clone();
        let exited = async {
            match &vm {
                Some(vm) if watching => vm.exited().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Command::Destroy { reason, done }) => {
                    let t = Instant::now();
                    actor.update(|r| r.state = SandboxState::Stopping);
                    info!(%reason, "destroying sandbox");
                    let rid = actor.record.borrow().resource_id().clone();
                    release(&actor.ctx, &rid, &mut actor.res).await;
                    actor.record.send_modify(|r| r.state = SandboxState::Stopped);
                    actor.ctx.registry.remove(&actor.id, &actor.self_tx);
                    if actor.record.borrow().base.is_some() {
                        actor.ctx.sweep_fork_points();
                    }
                    info!(ms = t.elapsed().as_millis() as u64, "sandbox destroyed");
                    let _ = done.send(());
                    // Later requests (queued destroys) find it gone.
                    rx.close();
                    while let Some(Command::Destroy { done, .. }) = rx.recv().await {
                        let _ = done.send(());
                    }
                    return;
                }
                Some(Command::Pause { reply }) => {
                    let r = crate::lifecycle::pause(&mut actor).await;
                    watching = actor.res.vm.is_some();
                    let _ = reply.send(r.map(|()| actor.record.borrow().clone()));
                }
                Some(Command::Pool { reply }) => {
                    let _ = reply.send(crate::pool::freeze(&mut actor).await);
                }
                Some(Command::Claim { spec, reply }) => {
                    match crate::pool::claim(&mut actor, *spec).await {
                        Ok(()) => {
                            let _ = reply.send(Ok(actor.record.borrow().clone()));
                        }
                        Err(e) => {
                            // The pooled VM is of no use: release it; the create
                            // goes the usual way.
                            actor.update(|r| r.state = SandboxState::Stopping);
                            let rid = actor.record.borrow().resource_id().clone();
                            release(&actor.ctx, &rid, &mut actor.res).await;
                            actor.ctx.registry.remove(&actor.id, &actor.self_tx);
                            let _ = reply.send(Err(e));
                            return;
                        }
                    }
                }
                Some(Command::Snapshot { request, reply }) => {
                    let r = crate::snapshot::snapshot(&mut actor, &request).await;
                    let _ = reply.send(r);
                }
                Some(Command::Resume { expires_at_unix_ms, reply }) => {
                    let r = crate::lifecycle::resume(&mut actor, expires_at_unix_ms).await;
                    watching = actor.res.vm.is_some();
                    let _ = reply.send(r.map(|()| actor.record.borrow().clone()));
                }
                // The registry dropped us: agent shutdown. Leave the VM running.
                None => return,
            },
            () = exited => {
                watching = false;
                // With -no-reboot a guest reboot, power-off or PID 1 death ends
                // the VMM: the sandbox stays in Error, never comes back by itself.
                // The console (guest text) goes to the log only, never to the API.
                let console = console_tail(&actor.res.run_dir);
                warn!(%console, "VM exited while running");
                actor.update(|r| {
                    r.state = SandboxState::Error;
                    r.error = Some(VM_GONE.to_owned());
                });
            }
        }
    }
}

/// Release everything in `res`: VM, network, slot, disk, run directory. `id`
/// names the host resources ([`SandboxRecord::resource_id`]).
/// Problems are logged; every step is attempted.
async fn release(ctx: &Ctx, id: &SandboxId, res: &mut Resources) {
    if let Some(vm) = res.vm.take() {
        stop_vm(ctx, &vm).await;
    }
    if let Err(e) = ctx.vmm.forget(id.as_str()).await {
        warn!(error = %crate::error_chain(&e), "VM cgroup removal failed");
    }
    if let Some(net) = res.net.take() {
        if let Err(e) = ctx.net.teardown(&net).await {
            warn!(error = %crate::error_chain(&e), "network teardown failed");
        }
    } else if let Some(slot) = res.slot {
        // Setup failed midway and undid itself; make sure of it.
        if let Some(net) = SandboxNet::planned(slot, id) {
            let _ = ctx.net.teardown(&net).await;
        }
    }
    if let Some(slot) = res.slot.take() {
        if let Err(e) = ctx.slots.release(slot, id) {
            warn!(error = %crate::error_chain(&e), slot, "slot release failed");
        }
    }
    if let Some(disk) = res.disk.take() {
        if let Err(e) = ctx.disks.remove(&disk.path).await {
            warn!(error = %crate::error_chain(&e), "disk removal failed");
        }
    }
    if res.run_dir_ours {
        match tokio::fs::remove_dir_all(&res.run_dir).await {
            Ok(()) => res.run_dir_ours = false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => res.run_dir_ours = false,
            Err(e) => warn!(error = %e, path = %res.run_dir.display(), "run dir removal failed"),
        }
    }
}

/// QMP `quit`, then SIGKILL if the process outlives the grace period.
pub(crate) async fn stop_vm(ctx: &Ctx, vm: &VmHandle) {
    if !vm.is_alive() {
        return;
    }
    if let Err(e) = ctx.vmm.stop(vm).await {
        warn!(error = %crate::error_chain(&e), pid = vm.pid, "QMP quit failed; killing");
    }
    if !vm.wait_exit(STOP_GRACE).await {
        warn!(pid = vm.pid, "VM still alive after quit; sending SIGKILL");
        if let Err(e) = ctx.vmm.kill(vm).await {
            warn!(error = %crate::error_chain(&e), "VM could not be killed");
        }
    }
}

/// Release what a state file records, for a sandbox that is not (or no longer)
/// adopted. Used by recovery; the VM is killed only if `pid` is still ours.
pub(crate) async fn release_recorded(ctx: &Ctx, record: &SandboxRecord, vm: Option<VmHandle>) {
    let mut res = Resources {
        run_dir: record.run_dir.clone(),
        run_dir_ours: true,
        slot: record.slot,
        net: record.net.clone(),
        disk: record.disk.clone(),
        vm,
    };
    release(ctx, record.resource_id(), &mut res).await;
}

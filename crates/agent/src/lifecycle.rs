//! Pause and resume of one sandbox, run inside its actor (so they never
//! interleave with each other, a destroy or a snapshot).
//!
//! Pause: `running -> pausing` (persisted), freeze the vCPUs, save the device
//! state (the memory already is the sandbox's own file, or goes into the state
//! when the VM maps a private base) into `vmstate.new`, fsync, rename to
//! `vmstate`, then the switch: `paused` with what was saved is written to
//! `state.json`. Only then is the VMM stopped and its slot, network and cgroup
//! released. Before the switch any failure unfreezes the VM and the sandbox is
//! `running` again; after it, a crash leaves a consistent paused sandbox (a
//! frozen VMM that recovery finds is simply stopped).
//!
//! Resume: `paused -> resuming` (admitted and persisted), claim any free slot,
//! build its network, start a VMM waiting for the state, load it, unfreeze it
//! (the point of no return: the guest now runs on the memory file), then give
//! the guest the clock and a new access token at `/init`. A failure before the
//! unfreeze kills that VMM and releases what it took: the snapshot is untouched
//! and the sandbox is `paused`. A failure after it pauses the sandbox again, so
//! memory and device state stay a matching pair.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{info, warn};

use crate::admission::Refusal;
use crate::faults::Injected;
use crate::net::SandboxNet;
use crate::sandbox::{
    follow_console, init_guest, stop_vm, wait_healthy, Actor, SandboxError, ACCESS_TOKEN_HEADER,
};
use crate::state::{now_unix_ms, AccessToken, Paused, SandboxState, MEMORY_FILE, VMSTATE_FILE};
use crate::vmm::{guest_cmdline, Memory, Nic, SavedState, VmHandle, VmSpec, VmmError};

/// Why a pause or resume did not happen (the sandbox is as it was, unless said).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("sandbox is {state}; {op} needs a {needs} sandbox")]
    WrongState {
        op: &'static str,
        state: SandboxState,
        needs: &'static str,
    },
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the saved state was made by another VMM ({saved}; this host runs {host})")]
    Incompatible { saved: String, host: String },
    #[error("{op} failed at {step}")]
    Vmm {
        op: &'static str,
        step: &'static str,
        #[source]
        source: VmmError,
    },
    #[error("{op} failed at {step}")]
    Io {
        op: &'static str,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} failed")]
    Sandbox {
        op: &'static str,
        #[source]
        source: SandboxError,
    },
    #[error("{op} failed")]
    Fault {
        op: &'static str,
        #[source]
        source: Injected,
    },
    #[error("{op} failed")]
    Template {
        op: &'static str,
        #[source]
        source: crate::templates::TemplateError,
    },
    #[error("the sandbox's actor is gone")]
    Gone,
}

impl LifecycleError {
    /// What failed, for the control plane and its users (no host paths, no tool
    /// output); the full chain goes to the agent log.
    pub fn public_message(&self) -> String {
        match self {
            Self::WrongState { .. } | Self::Refused(_) | Self::Incompatible { .. } => {
                self.to_string()
            }
            Self::Vmm { op, step, .. } | Self::Io { op, step, .. } => {
                format!("{op} failed at {step}; the sandbox is unchanged, retry")
            }
            Self::Sandbox { op, source } => {
                format!("{op} failed: {}; retry", source.public_message())
            }
            Self::Fault { op, source } => format!("{op} failed: {source}"),
            Self::Template { source, .. } => match source {
                crate::templates::TemplateError::Exists(_)
                | crate::templates::TemplateError::NotFound(_)
                | crate::templates::TemplateError::BuiltIn(_) => source.to_string(),
                _ => "snapshot failed while copying the sandbox; the sandbox is unchanged, retry"
                    .into(),
            },
            Self::Gone => self.to_string(),
        }
    }
}

fn vmm(op: &'static str, step: &'static str) -> impl FnOnce(VmmError) -> LifecycleError {
    move |source| LifecycleError::Vmm { op, step, source }
}

fn io(op: &'static str, step: &'static str) -> impl FnOnce(std::io::Error) -> LifecycleError {
    move |source| LifecycleError::Io { op, step, source }
}

/// Run the fault hook of `step` (tests arm steps to fail or hang; see [`crate::faults`]).
pub(crate) async fn fault(
    actor: &Actor,
    op: &'static str,
    step: &str,
) -> Result<(), LifecycleError> {
    actor
        .ctx
        .config
        .faults
        .check(step)
        .await
        .map_err(|source| LifecycleError::Fault { op, source })
}

/// Create `path` for writing (0600, truncated).
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// fsync `path` (a file or a directory).
fn sync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Pause a running sandbox (see the module docs). Pausing a paused one is a no-op.
pub(crate) async fn pause(actor: &mut Actor) -> Result<(), LifecycleError> {
    const OP: &str = "pause";
    let state = actor.record.borrow().state;
    match state {
        SandboxState::Paused => return Ok(()),
        SandboxState::Running => {}
        state => {
            return Err(LifecycleError::WrongState {
                op: OP,
                state,
                needs: "running",
            })
        }
    }
    let Some(vm) = actor.res.vm.clone() else {
        return Err(LifecycleError::WrongState {
            op: OP,
            state,
            needs: "running",
        });
    };
    let started = Instant::now();
    actor.update(|r| r.state = SandboxState::Pausing);
    let saved = match freeze_and_save(actor, &vm).await {
        Ok(saved) => saved,
        Err(e) => {
            // Not paused: unfreeze, and the sandbox runs on as before.
            if let Err(ue) = actor.ctx.vmm.resume(&vm).await {
                warn!(error = %crate::error_chain(&ue), "could not unfreeze the VM after a failed pause");
            }
            // Neither file is a paused sandbox's state: the switch never happened.
            let _ = std::fs::remove_file(actor.res.run_dir.join(".vmstate.new"));
            let _ = std::fs::remove_file(actor.res.run_dir.join(VMSTATE_FILE));
            actor.update(|r| r.state = SandboxState::Running);
            return Err(e);
        }
    };
    info!(
        ms = started.elapsed().as_millis() as u64,
        bytes = saved.bytes,
        memory_included = saved.memory_included,
        "state saved, sandbox paused; stopping its VMM"
    );
    // The switch is done: from here on the sandbox is paused whatever happens.
    let _ = fault(actor, OP, "pause:switched").await;
    release_vm(actor, &vm).await;
    info!(ms = started.elapsed().as_millis() as u64, "sandbox paused");
    Ok(())
}

/// Freeze, save into `vmstate`, persist `paused`. On error the VM is still
/// frozen (the caller unfreezes it) and the record still says `pausing`.
async fn freeze_and_save(actor: &mut Actor, vm: &VmHandle) -> Result<SavedState, LifecycleError> {
    const OP: &str = "pause";
    let ctx = actor.ctx.clone();
    fault(actor, OP, "pause:start").await?;
    ctx.vmm.pause(vm).await.map_err(vmm(OP, "freeze"))?;
    fault(actor, OP, "pause:frozen").await?;
    let tmp = actor.res.run_dir.join(".vmstate.new");
    let file = create_private(&tmp).map_err(io(OP, "state file"))?;
    let memory = actor.record.borrow().memory.clone();
    let saved = ctx
        .vmm
        .save(vm, &memory, file)
        .await
        .map_err(vmm(OP, "save"))?;
    fault(actor, OP, "pause:saved").await?;
    let dest = actor.res.run_dir.join(VMSTATE_FILE);
    sync_path(&tmp).map_err(io(OP, "state file sync"))?;
    std::fs::rename(&tmp, &dest).map_err(io(OP, "state file rename"))?;
    sync_path(&actor.res.run_dir).map_err(io(OP, "run directory sync"))?;
    fault(actor, OP, "pause:renamed").await?;
    let paused = Paused {
        saved: saved.clone(),
        paused_at_unix_ms: now_unix_ms(),
    };
    actor
        .commit(|r| {
            r.state = SandboxState::Paused;
            r.paused = Some(paused);
        })
        .map_err(|source| LifecycleError::Sandbox {
            op: OP,
            source: SandboxError::State(source),
        })?;
    Ok(saved)
}

/// Stop a paused sandbox's VMM and release its slot, network and cgroup.
async fn release_vm(actor: &mut Actor, vm: &VmHandle) {
    let ctx = actor.ctx.clone();
    stop_vm(&ctx, vm).await;
    actor.res.vm = None;
    let rid = actor.record.borrow().resource_id().clone();
    if let Err(e) = ctx.vmm.forget(rid.as_str()).await {
        warn!(error = %crate::error_chain(&e), "VM cgroup removal failed");
    }
    release_network(actor).await;
    actor.update(|r| {
        // What it takes next (a resume) is taken under its own ID.
        r.vm_id = None;
        r.pid = None;
        r.slot = None;
        r.net = None;
        r.guest_address = None;
    });
}

async fn release_network(actor: &mut Actor) {
    let ctx = actor.ctx.clone();
    let rid = actor.record.borrow().resource_id().clone();
    if let Some(net) = actor.res.net.take() {
        if let Err(e) = ctx.net.teardown(&net).await {
            warn!(error = %crate::error_chain(&e), "network teardown failed");
        }
    } else if let Some(slot) = actor.res.slot {
        if let Some(net) = SandboxNet::planned(slot, &rid) {
            let _ = ctx.net.teardown(&net).await;
        }
    }
    if let Some(slot) = actor.res.slot.take() {
        if let Err(e) = ctx.slots.release(slot, &rid) {
            warn!(error = %crate::error_chain(&e), slot, "slot release failed");
        }
    }
}

/// Resume a paused sandbox (see the module docs); `expires_at_unix_ms` 0 keeps
/// its deadline. Resuming a running one is a no-op.
pub(crate) async fn resume(
    actor: &mut Actor,
    expires_at_unix_ms: i64,
) -> Result<(), LifecycleError> {
    const OP: &str = "resume";
    let (state, paused) = {
        let r = actor.record.borrow();
        (r.state, r.paused.clone())
    };
    match (state, paused) {
        (SandboxState::Running, _) => Ok(()),
        (SandboxState::Paused, Some(paused)) => {
            let host = actor.ctx.vmm.snapshot_compat();
            if paused.saved.compat != host {
                return Err(LifecycleError::Incompatible {
                    saved: paused.saved.compat,
                    host,
                });
            }
            let ctx = actor.ctx.clone();
            let spec = actor.record.borrow().spec.clone();
            // Admission and the move to `resuming` in one step under the registry lock.
            let record = &actor.record;
            ctx.registry.admit_existing(&ctx.capacity, &spec, || {
                record.send_modify(|r| r.state = SandboxState::Resuming);
            })?;
            actor.update(|_| {});
            let started = Instant::now();
            let result = restore_and_run(actor, &paused, expires_at_unix_ms).await;
            match &result {
                Ok(()) => info!(ms = started.elapsed().as_millis() as u64, "sandbox resumed"),
                Err(e) => {
                    warn!(error = %crate::error_chain(e), "resume failed; the sandbox stays paused")
                }
            }
            result
        }
        (state, _) => Err(LifecycleError::WrongState {
            op: OP,
            state,
            needs: "paused",
        }),
    }
}

/// The VM a resume has started so far; undone by [`undo_resume`].
struct Started {
    vm: Option<VmHandle>,
    /// The memory file was created for this resume (the state carried memory).
    fresh_memory: Option<PathBuf>,
}

async fn restore_and_run(
    actor: &mut Actor,
    paused: &Paused,
    expires_at_unix_ms: i64,
) -> Result<(), LifecycleError> {
    const OP: &str = "resume";
    let mut started = Started {
        vm: None,
        fresh_memory: None,
    };
    match start_restored(actor, paused, &mut started).await {
        Ok(()) => {}
        Err(e) => {
            undo_resume(actor, started).await;
            return Err(e);
        }
    }
    let Some(vm) = started.vm.clone() else {
        return Err(LifecycleError::Gone);
    };
    // Point of no return: the guest runs on the memory file from here on.
    let ctx = actor.ctx.clone();
    if let Err(e) = ctx.vmm.resume(&vm).await.map_err(vmm(OP, "unfreeze")) {
        undo_resume(actor, started).await;
        return Err(e);
    }
    let handed = hand_over(actor, &vm).await;
    if let Err(e) = handed {
        // The guest ran: save it again so memory and device state still match.
        warn!(error = %crate::error_chain(&e), "guest did not take its new token; pausing it again");
        actor.update(|r| r.state = SandboxState::Running);
        actor.res.vm = Some(vm);
        if let Err(pe) = pause(actor).await {
            warn!(error = %crate::error_chain(&pe), "re-pause after a failed resume failed");
            actor.update(|r| {
                r.state = SandboxState::Error;
                r.error = Some("resume failed and the sandbox could not be paused again".into());
            });
        }
        return Err(e);
    }
    let _ = std::fs::remove_file(actor.res.run_dir.join(VMSTATE_FILE));
    actor.update(|r| {
        r.state = SandboxState::Running;
        r.paused = None;
        r.error = None;
        if expires_at_unix_ms > 0 {
            r.spec.expires_at_unix_ms = expires_at_unix_ms;
        }
    });
    Ok(())
}

/// Claim a slot, build the network, start a VMM waiting for the state and load
/// it; the VM stays frozen. What was taken is recorded in `started`/`actor.res`.
async fn start_restored(
    actor: &mut Actor,
    paused: &Paused,
    started: &mut Started,
) -> Result<(), LifecycleError> {
    const OP: &str = "resume";
    let ctx = actor.ctx.clone();
    let id = actor.id.clone();
    fault(actor, OP, "resume:start").await?;
    let slot = ctx
        .slots
        .claim(&id, &actor.res.run_dir)
        .map_err(|e| LifecycleError::Sandbox {
            op: OP,
            source: SandboxError::Slot(e),
        })?;
    actor.res.slot = Some(slot);
    actor.update(|r| r.slot = Some(slot));
    let net = ctx
        .net
        .setup(slot, &id)
        .await
        .map_err(|e| LifecycleError::Sandbox {
            op: OP,
            source: SandboxError::Net(e),
        })?;
    actor.res.net = Some(net.clone());
    actor.update(|r| r.net = Some(net.clone()));
    fault(actor, OP, "resume:network").await?;

    let memory_path = actor.res.run_dir.join(MEMORY_FILE);
    if paused.saved.memory_included {
        // The memory comes with the state: a fresh file receives it.
        match std::fs::remove_file(&memory_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(OP, "memory file")(e)),
        }
        started.fresh_memory = Some(memory_path.clone());
    } else if !memory_path.is_file() {
        return Err(io(OP, "memory file")(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the paused sandbox's memory file is missing",
        )));
    }
    let spec = actor.record.borrow().spec.clone();
    let disk = actor.res.disk.clone().ok_or_else(|| {
        io(OP, "disk")(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the paused sandbox has no disk",
        ))
    })?;
    let vm_spec = VmSpec {
        name: id.to_string(),
        vcpus: spec.vcpus,
        memory_mb: spec.memory_mb,
        kernel: ctx.kernel_path(),
        initrd: ctx.initrd_path(),
        cmdline: guest_cmdline(Some(id.as_str())),
        disk: disk.path.clone(),
        disk_format: disk.format,
        nic: Some(Nic::Tap(net.tap.clone())),
        netns: Some(net.netns.clone()),
        run_dir: actor.res.run_dir.clone(),
        runas: ctx.config.vm.uid_for_slot(slot),
        memory: Memory::Shared(memory_path.clone()),
        incoming: true,
    };
    let vm = ctx
        .vmm
        .spawn(&vm_spec)
        .await
        .map_err(vmm(OP, "VMM start"))?;
    started.vm = Some(vm.clone());
    follow_console(&ctx, &actor.res.run_dir, &vm);
    let pid = vm.pid;
    actor.res.vm = Some(vm.clone());
    actor.update(|r| {
        r.pid = Some(pid);
        r.memory = Memory::Shared(memory_path);
        r.guest_address = Some(net.guest_address);
    });
    fault(actor, OP, "resume:spawned").await?;
    let src =
        std::fs::File::open(actor.res.run_dir.join(VMSTATE_FILE)).map_err(io(OP, "state file"))?;
    ctx.vmm
        .restore(&vm, &paused.saved, src)
        .await
        .map_err(vmm(OP, "restore"))?;
    fault(actor, OP, "resume:restored").await?;
    Ok(())
}

/// Undo a resume that failed before its guest ran: the snapshot is untouched.
async fn undo_resume(actor: &mut Actor, started: Started) {
    let ctx = actor.ctx.clone();
    if let Some(vm) = started.vm {
        // Never `quit` gracefully: nothing of this VMM may be written anywhere.
        if let Err(e) = ctx.vmm.kill(&vm).await {
            warn!(error = %crate::error_chain(&e), "could not kill the resuming VM");
        }
        let rid = actor.record.borrow().resource_id().clone();
        if let Err(e) = ctx.vmm.forget(rid.as_str()).await {
            warn!(error = %crate::error_chain(&e), "VM cgroup removal failed");
        }
    }
    actor.res.vm = None;
    release_network(actor).await;
    if let Some(mem) = started.fresh_memory {
        let _ = std::fs::remove_file(mem);
    }
    actor.update(|r| {
        r.state = SandboxState::Paused;
        r.pid = None;
        r.slot = None;
        r.net = None;
        r.guest_address = None;
    });
}

/// Give the running guest the clock and a new access token. The new token is
/// persisted first, so a restarted agent can finish the rotation.
async fn hand_over(actor: &mut Actor, vm: &VmHandle) -> Result<(), LifecycleError> {
    const OP: &str = "resume";
    let ctx = actor.ctx.clone();
    let new = AccessToken::generate().map_err(io(OP, "access token"))?;
    actor.update(|r| r.next_access_token = Some(new.clone()));
    fault(actor, OP, "resume:running").await?;
    let rec = actor.record.borrow().clone();
    rotate_token(&ctx, &rec, vm, &new)
        .await
        .map_err(|source| LifecycleError::Sandbox { op: OP, source })?;
    actor.update(|r| {
        r.access_token = Some(new);
        r.next_access_token = None;
    });
    Ok(())
}

/// `/init` with the new token, once the guest answers; when the guest already
/// holds `new` (a previous attempt's answer was lost), the retry with `new` as
/// the current token succeeds.
pub(crate) async fn rotate_token(
    ctx: &crate::Ctx,
    rec: &crate::state::SandboxRecord,
    vm: &VmHandle,
    new: &AccessToken,
) -> Result<(), SandboxError> {
    let Some(net) = rec.net.as_ref() else {
        return Err(SandboxError::GuestInit {
            message: "the sandbox has no network".into(),
        });
    };
    let (id, env, current) = (
        &rec.spec.sandbox_id,
        &rec.spec.env,
        rec.access_token.as_ref(),
    );
    wait_healthy(ctx, net, vm, &rec.run_dir).await?;
    match init_guest(ctx, net, id, env, current, Some(new)).await {
        Ok(()) => Ok(()),
        Err(first) => {
            tracing::debug!(header = ACCESS_TOKEN_HEADER, error = %first, "retrying /init with the new token");
            init_guest(ctx, net, id, env, Some(new), Some(new))
                .await
                .map_err(|_| first)
        }
    }
}

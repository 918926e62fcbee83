//! Snapshot of a sandbox into a new template, run inside its actor (so it never
//! interleaves with a pause, resume or destroy of the same sandbox).
//!
//! A running sandbox is frozen only while its state is saved, its memory file
//! copied and its disk flattened, then unfrozen; a paused one is copied from its
//! files. Without memory the image is checked and shrunk (`resize2fs -M`; the
//! guest grows it back at boot); with memory it keeps its size, since the saved
//! guest knows it. Everything is built in a private directory and renamed into
//! place ([`crate::templates::Store`]), so a failure or a crash at any step
//! leaves no template and the sandbox as it was.

use std::time::Instant;

use hearth_types::TemplateName;
use tracing::{info, warn};

use crate::lifecycle::LifecycleError;
use crate::sandbox::Actor;
use crate::state::{now_unix_ms, SandboxState, MEMORY_FILE, VMSTATE_FILE};
use crate::templates::{self, TemplateEntry, TemplateError, TemplateMeta, WarmMeta};
use crate::vmm::{Memory, SavedState, VmHandle};

/// What a snapshot made.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub entry: TemplateEntry,
    /// How long a running source was frozen (0 for a paused one).
    pub frozen_ms: u32,
}

/// Options of one snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub template: TemplateName,
    /// Keep memory and device state (a warm template).
    pub memory: bool,
    /// A fork point: not listed, removed when unused.
    pub hidden: bool,
    /// Made as the warm variant of this built-in template.
    pub warm_of: Option<TemplateName>,
}

fn template(op: &'static str) -> impl FnOnce(TemplateError) -> LifecycleError {
    move |source| LifecycleError::Template { op, source }
}

/// Snapshot the actor's sandbox (running or paused) into `req.template`.
pub(crate) async fn snapshot(
    actor: &mut Actor,
    req: &SnapshotRequest,
) -> Result<Snapshot, LifecycleError> {
    const OP: &str = "snapshot";
    let state = actor.record.borrow().state;
    if !matches!(state, SandboxState::Running | SandboxState::Paused) {
        return Err(LifecycleError::WrongState {
            op: OP,
            state,
            needs: "running or paused",
        });
    }
    let store = actor.ctx.templates.clone();
    let tmp = store.begin(&req.template).map_err(template(OP))?;
    let started = Instant::now();
    let result = build(actor, req, &tmp).await;
    match result {
        Ok((frozen_ms, warm)) => {
            let finish = async {
                let rec = actor.record.borrow().clone();
                let rootfs = tmp.join(templates::ROOTFS);
                let size = std::fs::metadata(&rootfs).map_or(0, |m| m.len());
                templates::write_json(
                    &tmp.join(templates::META),
                    &TemplateMeta {
                        name: req.template.to_string(),
                        size_bytes: size,
                        source_sandbox_id: Some(rec.spec.sandbox_id.to_string()),
                        created_at_unix_ms: now_unix_ms(),
                        hidden: req.hidden,
                        warm_of: req.warm_of.as_ref().map(ToString::to_string),
                    },
                    0o644,
                )
                .map_err(template(OP))?;
                if let Some(saved) = warm {
                    let token = rec.access_token.clone().ok_or(LifecycleError::Gone)?;
                    templates::write_json(
                        &tmp.join(templates::WARM_META),
                        &WarmMeta {
                            saved,
                            vcpus: rec.spec.vcpus,
                            memory_mb: rec.spec.memory_mb,
                            // The disk size its guest knows (the image is that large).
                            disk_size_mb: rec.spec.disk_size_mb,
                            access_token: token,
                        },
                        0o600,
                    )
                    .map_err(template(OP))?;
                }
                fault(actor, "snapshot:built").await?;
                store.commit(&tmp, &req.template).map_err(template(OP))
            };
            if let Err(e) = finish.await {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            let entry = store.entry(req.template.clone());
            info!(
                template = %req.template,
                memory = req.memory,
                ms = started.elapsed().as_millis() as u64,
                frozen_ms,
                allocated = entry.allocated_bytes,
                "snapshot made"
            );
            Ok(Snapshot { entry, frozen_ms })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

async fn fault(actor: &Actor, step: &str) -> Result<(), LifecycleError> {
    crate::lifecycle::fault(actor, "snapshot", step).await
}

/// Fill `tmp` with the disk (and the saved VM); returns how long the VM was
/// frozen and, with memory, what was saved.
async fn build(
    actor: &mut Actor,
    req: &SnapshotRequest,
    tmp: &std::path::Path,
) -> Result<(u32, Option<SavedState>), LifecycleError> {
    const OP: &str = "snapshot";
    fault(actor, "snapshot:start").await?;
    let rec = actor.record.borrow().clone();
    let disk = actor.res.disk.clone().ok_or(LifecycleError::Gone)?;
    let rootfs = tmp.join(templates::ROOTFS);
    let (frozen_ms, saved) = match (rec.state, actor.res.vm.clone()) {
        (SandboxState::Running, Some(vm)) => {
            // Without memory the disk alone must hold what the guest wrote.
            if !req.memory {
                if let Some(net) = actor.res.net.clone() {
                    if let Err(e) =
                        crate::sandbox::sync_guest(&actor.ctx, &net, rec.access_token.as_ref())
                            .await
                    {
                        warn!(error = %e, "the guest did not sync its disks; the snapshot is crash-consistent only");
                    }
                }
            }
            let frozen = Instant::now();
            actor
                .ctx
                .vmm
                .pause(&vm)
                .await
                .map_err(|source| LifecycleError::Vmm {
                    op: OP,
                    step: "freeze",
                    source,
                })?;
            let copied = copy_frozen(actor, &vm, &rec.memory, req, &disk, tmp).await;
            // Running again whatever happened.
            if let Err(e) = actor.ctx.vmm.resume(&vm).await {
                warn!(error = %crate::error_chain(&e), "could not unfreeze the VM after its snapshot");
                actor.update(|r| {
                    r.state = SandboxState::Error;
                    r.error = Some("the VM could not be unfrozen after a snapshot".into());
                });
            }
            let frozen_ms = u32::try_from(frozen.elapsed().as_millis()).unwrap_or(u32::MAX);
            (frozen_ms, copied?)
        }
        (SandboxState::Paused, None) => {
            let paused = rec.paused.clone().ok_or(LifecycleError::Gone)?;
            let saved = if req.memory {
                let dir = &actor.res.run_dir;
                templates::copy_sparse(&dir.join(VMSTATE_FILE), &tmp.join(templates::VMSTATE))
                    .await
                    .map_err(template(OP))?;
                if !paused.saved.memory_included {
                    templates::copy_sparse(&dir.join(MEMORY_FILE), &tmp.join(templates::MEMORY))
                        .await
                        .map_err(template(OP))?;
                }
                Some(paused.saved)
            } else {
                None
            };
            templates::flatten(&disk.path, disk.format, &rootfs)
                .await
                .map_err(template(OP))?;
            (0, saved)
        }
        (state, _) => {
            return Err(LifecycleError::WrongState {
                op: OP,
                state,
                needs: "running or paused",
            })
        }
    };
    fault(actor, "snapshot:copied").await?;
    if !req.memory {
        templates::shrink(&rootfs).await.map_err(template(OP))?;
    }
    Ok((frozen_ms, saved))
}

/// With the VM frozen: save its state (with memory) and flatten its disk.
async fn copy_frozen(
    actor: &Actor,
    vm: &VmHandle,
    memory: &Memory,
    req: &SnapshotRequest,
    disk: &crate::disk::Disk,
    tmp: &std::path::Path,
) -> Result<Option<SavedState>, LifecycleError> {
    const OP: &str = "snapshot";
    fault(actor, "snapshot:frozen").await?;
    let saved = if req.memory {
        let path = tmp.join(templates::VMSTATE);
        let file = create_private(&path).map_err(|source| LifecycleError::Io {
            op: OP,
            step: "state file",
            source,
        })?;
        let saved = actor
            .ctx
            .vmm
            .save(vm, memory, file)
            .await
            .map_err(|source| LifecycleError::Vmm {
                op: OP,
                step: "save",
                source,
            })?;
        if let Memory::Shared(own) = memory {
            templates::copy_sparse(own, &tmp.join(templates::MEMORY))
                .await
                .map_err(template(OP))?;
        }
        Some(saved)
    } else {
        None
    };
    templates::flatten(&disk.path, disk.format, &tmp.join(templates::ROOTFS))
        .await
        .map_err(template(OP))?;
    Ok(saved)
}

fn create_private(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

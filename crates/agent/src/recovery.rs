//! Start-up reconciliation of what a previous run of this agent left behind.
//!
//! Scans `<run_dir>/sandboxes/*`: a sandbox whose QEMU process still runs is
//! re-adopted as `Running` (its console is followed again). The process is found
//! by the pid in `state.json`, or by QEMU's own pid file when the agent died before
//! recording it, and taken only when its command line carries `-name <sb-id>`, so
//! a reused PID is never taken for ours. Everything else recorded — process,
//! cgroup, network namespace, slot, disk, directory (with its sockets) — is
//! released. Slot claims that point into this run directory and VM cgroups of
//! this agent without an adopted sandbox are released too. A sandbox whose
//! deadline has passed is destroyed rather than adopted. Idempotent.

use std::sync::Arc;
use std::time::Duration;

use hearth_types::SandboxId;
use tracing::{info, warn};

use crate::net::SandboxNet;
use crate::sandbox::{adopt, release_recorded, stop_vm};
use crate::state::{self, now_unix_ms, SandboxRecord, SandboxState, MEMORY_FILE};
use crate::vmm::qmp::QmpClient;
use crate::vmm::{pid_alive, pid_cmdline_has_name, read_pid_file, VmHandle, PID_FILE};
use crate::Ctx;

/// What recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    pub adopted: Vec<SandboxId>,
    pub cleaned: Vec<String>,
}

pub(crate) async fn recover(ctx: &Arc<Ctx>) -> RecoveryReport {
    let mut report = RecoveryReport::default();
    let root = ctx.sandboxes_dir();
    let entries = match std::fs::read_dir(&root) {
        Ok(rd) => rd.filter_map(|e| e.ok()).collect::<Vec<_>>(),
        Err(_) => Vec::new(),
    };
    for entry in entries {
        let dir = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let record = match state::load(&dir) {
            Ok(r) => r,
            Err(e) => {
                warn!(dir = %dir.display(), error = %crate::error_chain(&e), "unreadable sandbox state; removing the directory");
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!(dir = %dir.display(), error = %e, "could not remove");
                }
                report.cleaned.push(name);
                continue;
            }
        };
        let id = record.spec.sandbox_id.clone();
        // Host resources (VM name included) may carry a pooled VM's ID.
        let rid = record.resource_id().clone();
        let is_ours = |pid: &u32| pid_alive(*pid) && pid_cmdline_has_name(*pid, rid.as_str());
        let ours = record
            .pid
            .filter(is_ours)
            .or_else(|| read_pid_file(&dir.join(PID_FILE)).filter(is_ours));
        let vm = ours.map(|pid| VmHandle::adopted(rid.to_string(), pid, dir.join("qmp.sock")));
        let record = match record.state {
            SandboxState::Pausing | SandboxState::Paused | SandboxState::Resuming => {
                match settle_lifecycle(ctx, record, vm.clone()).await {
                    Settled::Paused(record) => {
                        match adopt(ctx, record, None) {
                            Ok(()) => {
                                info!(sandbox_id = %id, "re-adopted paused sandbox");
                                report.adopted.push(id);
                            }
                            Err(e) => warn!(error = %e, "not adopted"),
                        }
                        continue;
                    }
                    Settled::Running(record) => record,
                    Settled::Lost(record) => {
                        release_recorded(ctx, &record, vm).await;
                        report.cleaned.push(id.to_string());
                        continue;
                    }
                }
            }
            _ => record,
        };
        let adoptable = record.state == SandboxState::Running && !record.expired(now_unix_ms());
        match vm {
            Some(vm) if adoptable => {
                // Reconnect the control socket to check the VMM still answers.
                let frozen = match QmpClient::connect(&vm.control_socket, Duration::from_secs(1))
                    .await
                {
                    Ok(mut qmp) => match qmp.query_status().await {
                        Ok(st) => {
                            info!(sandbox_id = %id, status = %st.status, "QMP reconnected");
                            !st.running
                        }
                        Err(e) => {
                            warn!(sandbox_id = %id, error = %crate::error_chain(&e), "QMP query-status failed");
                            false
                        }
                    },
                    Err(e) => {
                        warn!(sandbox_id = %id, error = %crate::error_chain(&e), "QMP reconnect failed; adopting by PID");
                        false
                    }
                };
                // A running sandbox found frozen was caught by the agent's death
                // mid-snapshot (or mid-fork): unfreeze it. Pooled VMs stay frozen.
                if frozen && !record.pooled {
                    // The QMP connection above is closed: QEMU serves one client.
                    match ctx.vmm.resume(&vm).await {
                        Ok(()) => {
                            info!(sandbox_id = %id, "unfroze a sandbox a snapshot was cut short on")
                        }
                        Err(e) => {
                            warn!(sandbox_id = %id, error = %crate::error_chain(&e), "could not unfreeze a frozen sandbox")
                        }
                    }
                }
                match adopt(ctx, record, Some(vm)) {
                    Ok(()) => {
                        info!(sandbox_id = %id, pid = ours.unwrap_or(0), "re-adopted running sandbox");
                        report.adopted.push(id);
                    }
                    Err(e) => warn!(error = %e, "not adopted"),
                }
            }
            vm => {
                info!(sandbox_id = %id, state = ?record.state, vm_alive = vm.is_some(),
                      expired = record.expired(now_unix_ms()), "cleaning up a sandbox left behind");
                release_recorded(ctx, &record, vm).await;
                report.cleaned.push(id.to_string());
            }
        }
    }
    // Claims whose sandbox directory was never written or is gone.
    for (slot, owner) in ctx.slots.claims_under(&root) {
        if owner.run_dir.parent() != Some(root.as_path()) {
            continue;
        }
        let Ok(id) = owner.sandbox_id.parse::<SandboxId>() else {
            continue;
        };
        if ctx.registry.get(&id).is_some() || ctx.registry.holds_resources_of(&id) {
            continue;
        }
        if let Some(net) = SandboxNet::planned(slot, &id) {
            if let Err(e) = ctx.net.teardown(&net).await {
                warn!(sandbox_id = %id, error = %crate::error_chain(&e), "orphan network teardown failed");
            }
        }
        match ctx.slots.release(slot, &id) {
            Ok(true) => {
                info!(sandbox_id = %id, slot, "released an orphaned slot");
                report.cleaned.push(id.to_string());
            }
            Ok(false) => {}
            Err(e) => warn!(error = %crate::error_chain(&e), "orphan slot release failed"),
        }
    }
    // VM cgroups of this agent whose sandbox was not adopted (e.g. its directory
    // is gone): whatever still runs in them is an orphaned VMM.
    for name in ctx.vmm.leftovers() {
        let adopted = name
            .parse::<SandboxId>()
            .map(|id| ctx.registry.get(&id).is_some() || ctx.registry.holds_resources_of(&id))
            .unwrap_or(false);
        if adopted {
            continue;
        }
        match ctx.vmm.forget(&name).await {
            Ok(()) => {
                info!(vm = %name, "removed a stale VM cgroup");
                report.cleaned.push(name);
            }
            Err(e) => {
                warn!(vm = %name, error = %crate::error_chain(&e), "stale VM cgroup removal failed")
            }
        }
    }
    // Template builds and deletions a crash cut short; fork points nobody uses.
    report.cleaned.extend(ctx.templates.sweep());
    ctx.sweep_fork_points();
    info!(
        adopted = report.adopted.len(),
        cleaned = report.cleaned.len(),
        "recovery finished"
    );
    report
}

/// Where a sandbox caught mid-pause or mid-resume by the agent's death ends up.
enum Settled {
    /// Paused, with no VMM left and nothing else held but its files.
    Paused(SandboxRecord),
    /// Running on its (unfrozen) VMM: adopt it as running.
    Running(SandboxRecord),
    /// Neither: release it.
    Lost(SandboxRecord),
}

/// Finish or undo what a pause or resume was doing when the agent died (the
/// steps and their switch point are in [`crate::lifecycle`]).
async fn settle_lifecycle(
    ctx: &Arc<Ctx>,
    mut record: SandboxRecord,
    vm: Option<VmHandle>,
) -> Settled {
    let id = record.resource_id().clone();
    let status = match &vm {
        Some(vm) => match QmpClient::connect(&vm.control_socket, Duration::from_secs(2)).await {
            Ok(mut qmp) => qmp.query_status().await.ok(),
            Err(_) => None,
        },
        None => None,
    };
    let _ = std::fs::remove_file(record.run_dir.join(".vmstate.new"));
    match (record.state, &vm) {
        // Before the switch: the VM is frozen (or running) with its memory intact.
        (SandboxState::Pausing, Some(vm)) => {
            if let Err(e) = ctx.vmm.resume(vm).await {
                warn!(sandbox_id = %id, error = %crate::error_chain(&e), "could not unfreeze a VM caught mid-pause");
                return Settled::Lost(record);
            }
            info!(sandbox_id = %id, "a pause was cut short; the sandbox runs on");
            record.state = SandboxState::Running;
            record.paused = None;
            persist(record, Settled::Running)
        }
        (SandboxState::Pausing, None) => {
            warn!(sandbox_id = %id, "VM gone mid-pause before its state was saved");
            Settled::Lost(record)
        }
        // The guest was unfrozen: it runs on the memory file, adopt it.
        (SandboxState::Resuming, Some(_)) if status.as_ref().is_some_and(|s| s.running) => {
            info!(sandbox_id = %id, "a resume was cut short after its guest ran; adopting it");
            if let Some(new) = record.next_access_token.clone() {
                if let Some(vm) = vm.clone() {
                    match crate::lifecycle::rotate_token(ctx, &record, &vm, &new).await {
                        Ok(()) => {
                            record.access_token = Some(new);
                            record.next_access_token = None;
                        }
                        Err(e) => {
                            warn!(sandbox_id = %id, error = %crate::error_chain(&e), "could not finish the token rotation");
                            return Settled::Lost(record);
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(record.run_dir.join(state::VMSTATE_FILE));
            record.state = SandboxState::Running;
            record.paused = None;
            persist(record, Settled::Running)
        }
        // Paused (VMM stopped or about to be), or a resume whose guest never ran:
        // the snapshot is intact. Stop what runs and release what it held.
        _ => {
            let Some(paused) = record.paused.clone() else {
                return Settled::Lost(record);
            };
            if let Some(vm) = &vm {
                if record.state == SandboxState::Resuming {
                    let _ = ctx.vmm.kill(vm).await;
                } else {
                    stop_vm(ctx, vm).await;
                }
            }
            if let Err(e) = ctx.vmm.forget(id.as_str()).await {
                warn!(sandbox_id = %id, error = %crate::error_chain(&e), "VM cgroup removal failed");
            }
            if let Some(net) = record
                .net
                .clone()
                .or_else(|| record.slot.and_then(|s| SandboxNet::planned(s, &id)))
            {
                let _ = ctx.net.teardown(&net).await;
            }
            if let Some(slot) = record.slot {
                let _ = ctx.slots.release(slot, &id);
            }
            if record.state == SandboxState::Resuming && paused.saved.memory_included {
                let _ = std::fs::remove_file(record.run_dir.join(MEMORY_FILE));
            }
            record.state = SandboxState::Paused;
            record.vm_id = None;
            record.pid = None;
            record.slot = None;
            record.net = None;
            record.guest_address = None;
            persist(record, Settled::Paused)
        }
    }
}

fn persist(record: SandboxRecord, wrap: fn(SandboxRecord) -> Settled) -> Settled {
    match state::save(&record) {
        Ok(()) => wrap(record),
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "could not write the settled state");
            wrap(record)
        }
    }
}

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
use crate::sandbox::{adopt, release_recorded};
use crate::state::{self, now_unix_ms, SandboxState};
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
        let is_ours = |pid: &u32| pid_alive(*pid) && pid_cmdline_has_name(*pid, id.as_str());
        let ours = record
            .pid
            .filter(is_ours)
            .or_else(|| read_pid_file(&dir.join(PID_FILE)).filter(is_ours));
        let vm = ours.map(|pid| VmHandle::adopted(id.to_string(), pid, dir.join("qmp.sock")));
        let adoptable = record.state == SandboxState::Running && !record.expired(now_unix_ms());
        match vm {
            Some(vm) if adoptable => {
                // Reconnect the control socket to check the VMM still answers.
                match QmpClient::connect(&vm.control_socket, Duration::from_secs(1)).await {
                    Ok(mut qmp) => match qmp.query_status().await {
                        Ok(st) => info!(sandbox_id = %id, status = %st.status, "QMP reconnected"),
                        Err(e) => {
                            warn!(sandbox_id = %id, error = %crate::error_chain(&e), "QMP query-status failed")
                        }
                    },
                    Err(e) => {
                        warn!(sandbox_id = %id, error = %crate::error_chain(&e), "QMP reconnect failed; adopting by PID")
                    }
                }
                match adopt(ctx, record, vm) {
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
        if ctx.registry.get(&id).is_some() {
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
            .map(|id| ctx.registry.get(&id).is_some())
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
    info!(
        adopted = report.adopted.len(),
        cleaned = report.cleaned.len(),
        "recovery finished"
    );
    report
}

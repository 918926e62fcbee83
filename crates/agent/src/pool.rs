//! A few VMs per warm built-in template, restored, warmed and frozen, ready to
//! become a sandbox in the time of one `/init`.
//!
//! A restore alone leaves the guest's first answer to TCG retranslating cold
//! code (~150-250 ms here) and QEMU's start (~50-100 ms) on the create's path.
//! The pool pays both ahead: for every template in `AgentConfig::warm_templates`
//! it keeps `AgentConfig::warm_pool` sandboxes restored from the template's warm
//! variant (default shape), whose guest has answered `/health` and `/init`, with
//! their vCPUs frozen. They are registered (admission counts them: they hold
//! memory, a slot and a VMM) but not listed. A create of that template and shape
//! takes one: the registry entry is re-keyed to the new ID under its lock, and
//! the actor unfreezes the VM and hands the guest its identity (hostname, env,
//! clock, a new access token) at `/init`. Its host resources keep the pooled
//! VM's name ([`crate::state::SandboxRecord::vm_id`]) until a pause releases
//! them. Pooled VMs survive an agent restart like any other VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_types::{SandboxId, TemplateName};
use tracing::{debug, info, warn};

use crate::lifecycle::LifecycleError;
use crate::sandbox::{init_guest, Actor};
use crate::state::{AccessToken, SandboxRecord, SandboxSpec, SandboxState};
use crate::templates::warm_variant;
use crate::Ctx;

/// How often the pool is topped up.
const TICK: Duration = Duration::from_secs(1);

/// Keep the pool full, forever (a tracked background task).
pub(crate) async fn run(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for name in ctx.config.warm_templates.clone() {
            let stopped = ctx.warming.lock().await;
            if *stopped {
                return;
            }
            let ready = warm_variant(&name).is_some_and(|v| ctx.templates.warm(&v).is_some());
            if !ready || pooled(&ctx, &name) >= ctx.config.warm_pool {
                continue;
            }
            if let Err(e) = fill_one(&ctx, &name).await {
                drop(stopped);
                // Capacity, a broken variant: try again later, quietly.
                debug!(template = %name, error = %e, "could not add a VM to the warm pool");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

/// Pooled VMs of template `name`.
fn pooled(ctx: &Ctx, name: &TemplateName) -> usize {
    ctx.registry
        .all()
        .iter()
        .filter(|h| {
            let r = h.record.borrow();
            r.pooled && r.spec.template == *name
        })
        .count()
}

/// Restore one VM of `name`'s warm variant, let it answer, freeze it.
async fn fill_one(ctx: &Arc<Ctx>, name: &TemplateName) -> Result<(), String> {
    let (id, rec) = crate::warm::create_default(ctx, name).await?;
    let handle = ctx.registry.get(&id).ok_or("the pooled VM vanished")?;
    if !rec.restored {
        handle.destroy("not restored: no use in the pool").await;
        return Err("the create booted instead of restoring".into());
    }
    handle
        .freeze_for_pool()
        .await
        .map_err(|e| crate::error_chain(&e))?;
    info!(template = %name, sandbox_id = %id, "VM added to the warm pool");
    Ok(())
}

/// Freeze a freshly restored sandbox and mark it pooled (runs in its actor).
pub(crate) async fn freeze(actor: &mut Actor) -> Result<(), LifecycleError> {
    let vm = actor.res.vm.clone().ok_or(LifecycleError::Gone)?;
    actor
        .ctx
        .vmm
        .pause(&vm)
        .await
        .map_err(|source| LifecycleError::Vmm {
            op: "pool",
            step: "freeze",
            source,
        })?;
    actor.update(|r| r.pooled = true);
    Ok(())
}

/// Give `spec` a pooled VM, if one of its template and shape is ready: `None`
/// when there is none (boot or restore as usual), else the actor's answer.
pub(crate) async fn take(
    ctx: &Arc<Ctx>,
    spec: &SandboxSpec,
) -> Option<Result<SandboxRecord, LifecycleError>> {
    let handle = ctx.registry.take_pooled(spec)?;
    Some(handle.claim(spec.clone()).await)
}

/// Turn the actor's pooled VM into the sandbox `spec` (runs in its actor, whose
/// registry key already is `spec`'s ID). On error the caller releases it.
pub(crate) async fn claim(actor: &mut Actor, spec: SandboxSpec) -> Result<(), LifecycleError> {
    let started = Instant::now();
    // The registry knows it by the new ID already (also for the release on error).
    let pooled_id = std::mem::replace(&mut actor.id, spec.sandbox_id.clone());
    let vm = actor.res.vm.clone().ok_or(LifecycleError::Gone)?;
    let net = actor.res.net.clone().ok_or(LifecycleError::Gone)?;
    let current = actor.record.borrow().access_token.clone();
    let new = AccessToken::generate().map_err(|source| LifecycleError::Io {
        op: "create",
        step: "access token",
        source,
    })?;
    actor.update(|r| {
        r.vm_id = Some(r.resource_id().clone());
        r.spec = spec.clone();
        r.pooled = false;
        r.state = SandboxState::Starting;
        r.started_at_unix_ms = crate::state::now_unix_ms();
    });
    let ctx = actor.ctx.clone();
    ctx.config
        .faults
        .check("pool:claim")
        .await
        .map_err(|source| LifecycleError::Fault {
            op: "create",
            source,
        })?;
    ctx.vmm
        .resume(&vm)
        .await
        .map_err(|source| LifecycleError::Vmm {
            op: "create",
            step: "unfreeze",
            source,
        })?;
    init_guest(
        &ctx,
        &net,
        &spec.sandbox_id,
        &spec.env,
        current.as_ref(),
        Some(&new),
    )
    .await
    .map_err(|source| LifecycleError::Sandbox {
        op: "create",
        source,
    })?;
    let boot_ms = u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX);
    actor.update(|r| {
        r.access_token = Some(new);
        r.state = SandboxState::Running;
        r.boot_ms = boot_ms;
        r.restored = true;
    });
    info!(sandbox_id = %spec.sandbox_id, pooled_vm = %pooled_id, boot_ms, "sandbox made from a pooled VM");
    Ok(())
}

/// Log why a pooled VM could not be used (the create then goes the usual way).
pub(crate) fn log_miss(id: &SandboxId, e: &LifecycleError) {
    warn!(sandbox_id = %id, error = %crate::error_chain(e), "a pooled VM failed; starting the sandbox the usual way");
}

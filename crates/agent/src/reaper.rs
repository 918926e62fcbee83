//! Background task destroying sandboxes whose `expires_at_unix_ms` has passed.
//! Ticks every second, logs what it did; it never touches resources itself, it
//! asks the sandbox's actor to destroy.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::state::{now_unix_ms, SandboxState};
use crate::Ctx;

pub(crate) const TICK: Duration = Duration::from_secs(1);

/// One pass: ask every expired sandbox's actor to destroy it. Returns how many.
pub(crate) fn reap_once(ctx: &Arc<Ctx>) -> usize {
    let now = now_unix_ms();
    let mut n = 0;
    for handle in ctx.registry.all() {
        let rec = handle.snapshot();
        // Paused sandboxes do not time out here: the control plane keeps their retention.
        if !matches!(
            rec.state,
            SandboxState::Starting | SandboxState::Running | SandboxState::Error
        ) || !rec.expired(now)
        {
            continue;
        }
        n += 1;
        let id = rec.spec.sandbox_id.clone();
        let late_ms = now - rec.spec.expires_at_unix_ms;
        let task = tokio::spawn(async move {
            handle.destroy("expired").await;
            info!(sandbox_id = %id, late_ms, "reaper destroyed an expired sandbox");
        });
        ctx.tasks.track(task.abort_handle());
    }
    n
}

pub(crate) async fn run(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        reap_once(&ctx);
    }
}

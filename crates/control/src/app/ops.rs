//! Long operations on sandboxes (create, pause, resume, snapshot, fork, delete):
//! how they outlive their request and how the reconciler knows they run.
//!
//! - [`App::detached`] runs an operation, from its first write to its last, in a
//!   task of its own: a client that disconnects or times out drops only the wait
//!   for the answer (hyper then writes nothing to the dead connection), never the
//!   operation halfway between the database and the host.
//! - [`App::begin_op`] registers a sandbox as having an operation in flight until
//!   the returned guard drops (after the operation's last write). The reconciler of
//!   this control plane leaves such rows alone whatever its host says; a reconciler
//!   of another replica, which cannot see this set, has `Policy::transition_grace`
//!   and compare-and-set writes on the row as it read it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use hearth_types::SandboxId;

use super::{audit, App, AppError, AppResult};

/// Sandboxes with operations in flight on this control plane (a count per sandbox:
/// a reconciler's pause may overlap a user's).
#[derive(Debug, Default, Clone)]
pub(crate) struct InFlight(Arc<Mutex<HashMap<SandboxId, u32>>>);

/// Held while an operation on one sandbox runs; unregisters it when dropped.
#[derive(Debug)]
pub(crate) struct OpGuard {
    set: InFlight,
    id: SandboxId,
}

impl InFlight {
    fn begin(&self, id: &SandboxId) -> OpGuard {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(id.clone()).or_insert(0) += 1;
        }
        OpGuard {
            set: self.clone(),
            id: id.clone(),
        }
    }

    fn contains(&self, id: &SandboxId) -> bool {
        self.0.lock().map(|m| m.contains_key(id)).unwrap_or(false)
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        // A poisoned map only loses the reconciler's early skip; grace still holds.
        if let Ok(mut m) = self.set.0.lock() {
            if let Some(n) = m.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.id);
                }
            }
        }
    }
}

impl App {
    /// Run `op` (an operation's whole body) out of the request's cancellation scope,
    /// on behalf of the request's API key, and wait for its outcome.
    pub(crate) async fn detached<T, F, Fut>(self: &Arc<Self>, what: &str, op: F) -> AppResult<T>
    where
        F: FnOnce(Arc<App>) -> Fut,
        Fut: Future<Output = AppResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let task = tokio::spawn(audit::keep_caller(op(self.clone())));
        task.await
            .map_err(|e| AppError::Internal(format!("{what} task failed: {e}")))?
    }

    /// Mark `id` as having an operation in flight until the guard drops.
    pub(crate) fn begin_op(&self, id: &SandboxId) -> OpGuard {
        self.in_flight.begin(id)
    }

    /// Whether an operation on `id` runs on this control plane now.
    pub(crate) fn op_in_flight(&self, id: &SandboxId) -> bool {
        self.in_flight.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_overlapping_operations() {
        let set = InFlight::default();
        let id = SandboxId::generate();
        let other = SandboxId::generate();
        let a = set.begin(&id);
        let b = set.begin(&id);
        assert!(!set.contains(&other));
        drop(a);
        assert!(set.contains(&id), "b still runs");
        drop(b);
        assert!(!set.contains(&id));
        assert!(set.0.lock().unwrap().is_empty());
    }
}

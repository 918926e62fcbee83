//! The in-memory map `SandboxId -> actor handle`: the truth about what runs on
//! this host. Owns insertion (with the duplicate check and host admission, both
//! under one lock so check and reservation are atomic) and removal; it never
//! touches a VM, disk or network itself.

use std::collections::HashMap;
use std::sync::Mutex;

use hearth_types::SandboxId;
use tokio::sync::{mpsc, oneshot, watch};

use crate::admission::{Capacity, Refusal, Usage};
use crate::lifecycle::LifecycleError;
use crate::state::SandboxRecord;

/// A request to a sandbox actor.
#[derive(Debug)]
pub(crate) enum Command {
    /// Stop the VM and release everything; the reply fires once all is gone.
    Destroy {
        reason: String,
        done: oneshot::Sender<()>,
    },
    /// Pause a running sandbox ([`crate::lifecycle::pause`]).
    Pause { reply: LifecycleReply },
    /// Resume a paused sandbox ([`crate::lifecycle::resume`]); 0 keeps the deadline.
    Resume {
        expires_at_unix_ms: i64,
        reply: LifecycleReply,
    },
    /// Freeze a just-restored sandbox and keep it in the warm pool ([`crate::pool`]).
    Pool {
        reply: oneshot::Sender<Result<(), LifecycleError>>,
    },
    /// Become the sandbox `spec` (a pooled VM taken by a create, re-keyed already).
    Claim {
        spec: Box<crate::state::SandboxSpec>,
        reply: LifecycleReply,
    },
    /// Snapshot it into a new template ([`crate::snapshot::snapshot`]).
    Snapshot {
        request: crate::snapshot::SnapshotRequest,
        reply: oneshot::Sender<Result<crate::snapshot::Snapshot, LifecycleError>>,
    },
}

pub(crate) type LifecycleReply = oneshot::Sender<Result<SandboxRecord, LifecycleError>>;

/// How to reach one sandbox actor and read its latest record.
#[derive(Debug, Clone)]
pub(crate) struct SandboxHandle {
    pub tx: mpsc::Sender<Command>,
    pub record: watch::Receiver<SandboxRecord>,
}

impl SandboxHandle {
    pub fn snapshot(&self) -> SandboxRecord {
        self.record.borrow().clone()
    }

    /// Ask the actor to destroy the sandbox and wait until it has.
    pub async fn destroy(&self, reason: &str) {
        let (done, wait) = oneshot::channel();
        let cmd = Command::Destroy {
            reason: reason.to_owned(),
            done,
        };
        if self.tx.send(cmd).await.is_ok() {
            // A dropped sender means the actor finished (or was aborted) anyway.
            let _ = wait.await;
        }
    }

    /// Ask the actor to pause the sandbox; resolves once it is paused (or not).
    pub async fn pause(&self) -> Result<SandboxRecord, LifecycleError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(Command::Pause { reply })
            .await
            .map_err(|_| LifecycleError::Gone)?;
        wait.await.map_err(|_| LifecycleError::Gone)?
    }

    /// Ask the actor to snapshot the sandbox into a new template.
    pub async fn snapshot_to_template(
        &self,
        request: crate::snapshot::SnapshotRequest,
    ) -> Result<crate::snapshot::Snapshot, LifecycleError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(Command::Snapshot { request, reply })
            .await
            .map_err(|_| LifecycleError::Gone)?;
        wait.await.map_err(|_| LifecycleError::Gone)?
    }

    /// Ask the actor to freeze its VM for the warm pool.
    pub async fn freeze_for_pool(&self) -> Result<(), LifecycleError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(Command::Pool { reply })
            .await
            .map_err(|_| LifecycleError::Gone)?;
        wait.await.map_err(|_| LifecycleError::Gone)?
    }

    /// Ask the actor of a pooled VM to become sandbox `spec`.
    pub async fn claim(
        &self,
        spec: crate::state::SandboxSpec,
    ) -> Result<SandboxRecord, LifecycleError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(Command::Claim {
                spec: Box::new(spec),
                reply,
            })
            .await
            .map_err(|_| LifecycleError::Gone)?;
        wait.await.map_err(|_| LifecycleError::Gone)?
    }

    /// Ask the actor to resume the sandbox; resolves once it runs (or not).
    pub async fn resume(&self, expires_at_unix_ms: i64) -> Result<SandboxRecord, LifecycleError> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(Command::Resume {
                expires_at_unix_ms,
                reply,
            })
            .await
            .map_err(|_| LifecycleError::Gone)?;
        wait.await.map_err(|_| LifecycleError::Gone)?
    }
}

#[derive(Debug, thiserror::Error)]
#[error("sandbox {id} already exists on this host")]
pub struct AlreadyExists {
    pub id: SandboxId,
}

/// Why a sandbox could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error(transparent)]
    Exists(#[from] AlreadyExists),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// The live sandboxes of this host.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    map: Mutex<HashMap<SandboxId, SandboxHandle>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, SandboxHandle>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single insert/remove calls), so poisoning is ignored.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, id: SandboxId, handle: SandboxHandle) -> Result<(), AlreadyExists> {
        let mut map = self.lock();
        if map.contains_key(&id) {
            return Err(AlreadyExists { id });
        }
        map.insert(id, handle);
        Ok(())
    }

    /// Insert `handle` if `capacity` admits its spec beside every registered
    /// sandbox. Check and insertion happen under one lock: concurrent creates
    /// can never both take the last place.
    pub fn insert_admitted(
        &self,
        id: SandboxId,
        handle: SandboxHandle,
        capacity: &Capacity,
    ) -> Result<(), InsertError> {
        let mut map = self.lock();
        if map.contains_key(&id) {
            return Err(AlreadyExists { id }.into());
        }
        let used = usage_of(&map);
        capacity.admit(&used, &handle.record.borrow().spec)?;
        map.insert(id, handle);
        Ok(())
    }

    /// Admit `spec` for a sandbox already registered but holding no VM (a paused
    /// one being resumed): the check against every VM-holding sandbox and `take`
    /// (which moves the sandbox into a VM-holding state) happen under one lock.
    pub fn admit_existing(
        &self,
        capacity: &Capacity,
        spec: &crate::state::SandboxSpec,
        take: impl FnOnce(),
    ) -> Result<(), Refusal> {
        let map = self.lock();
        let used = usage_of(&map);
        capacity.admit(&used, spec)?;
        take();
        Ok(())
    }

    /// What the registered sandboxes hold.
    pub fn usage(&self) -> Usage {
        usage_of(&self.lock())
    }

    pub fn get(&self, id: &SandboxId) -> Option<SandboxHandle> {
        self.lock().get(id).cloned()
    }

    /// Remove `id` if it still maps to the actor behind `tx`.
    pub fn remove(&self, id: &SandboxId, tx: &mpsc::Sender<Command>) {
        let mut map = self.lock();
        if map.get(id).is_some_and(|h| h.tx.same_channel(tx)) {
            map.remove(id);
        }
    }

    /// How many registered sandboxes' disk or memory come from template `name`.
    pub fn template_users(&self, name: &hearth_types::TemplateName) -> usize {
        self.lock()
            .values()
            .filter(|h| {
                let r = h.record.borrow();
                r.spec.template == *name || r.base.as_ref() == Some(name)
            })
            .count()
    }

    /// Take a pooled VM of `spec`'s template and shape for `spec`: under one lock,
    /// the entry is found and re-keyed to `spec`'s ID (so no other create can take
    /// it). `None` when there is none or the ID is taken.
    pub fn take_pooled(&self, spec: &crate::state::SandboxSpec) -> Option<SandboxHandle> {
        let mut map = self.lock();
        if map.contains_key(&spec.sandbox_id) {
            return None;
        }
        let key = map
            .iter()
            .find(|(k, h)| {
                let r = h.record.borrow();
                r.pooled
                    && r.state == crate::state::SandboxState::Running
                    && **k == r.spec.sandbox_id
                    && r.spec.template == spec.template
                    && (r.spec.vcpus, r.spec.memory_mb, r.spec.disk_size_mb)
                        == (spec.vcpus, spec.memory_mb, spec.disk_size_mb)
            })
            .map(|(k, _)| k.clone())?;
        let handle = map.remove(&key)?;
        map.insert(spec.sandbox_id.clone(), handle.clone());
        Some(handle)
    }

    /// Take up to `max` pooled VMs not yet given to a create that match `pred` out
    /// of the registry (under its lock, so no create can take them any more), for
    /// the caller to destroy.
    pub fn evict_pooled(
        &self,
        max: usize,
        pred: impl Fn(&SandboxRecord) -> bool,
    ) -> Vec<SandboxHandle> {
        let mut map = self.lock();
        let keys: Vec<SandboxId> = map
            .iter()
            .filter(|(k, h)| {
                let r = h.record.borrow();
                r.pooled && **k == r.spec.sandbox_id && pred(&r)
            })
            .map(|(k, _)| k.clone())
            .take(max)
            .collect();
        keys.iter().filter_map(|k| map.remove(k)).collect()
    }

    /// Whether a registered sandbox's host resources are named by `rid` (a pooled
    /// VM it was given).
    pub fn holds_resources_of(&self, rid: &SandboxId) -> bool {
        self.lock()
            .values()
            .any(|h| h.record.borrow().resource_id() == rid)
    }

    /// Whether a registered sandbox's disk or memory comes from template `name`.
    pub fn uses_template(&self, name: &hearth_types::TemplateName) -> bool {
        self.template_users(name) > 0
    }

    pub fn all(&self) -> Vec<SandboxHandle> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

fn usage_of(map: &HashMap<SandboxId, SandboxHandle>) -> Usage {
    let mut used = Usage::default();
    for h in map.values() {
        let r = h.record.borrow();
        // Paused sandboxes (and those in error, whose VM is gone) hold no host
        // memory, vCPUs or VM; their disks are already on the disk.
        if r.state.holds_vm() {
            used.add(&r.spec, r.state);
            if r.pooled {
                used.pooled_sandboxes += 1;
                used.pooled_memory_mb += u64::from(r.spec.memory_mb);
                used.pooled_vcpus += u64::from(r.spec.vcpus);
            }
        }
    }
    used
}

//! [`Hosts`]: the host agents this control plane drives and the scheduler that picks
//! one for a new sandbox. It holds clients and their last reports, nothing else.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use hearth_db::HostStatus;
use hearth_types::{HostId, TemplateName};

use super::{HostClient, HostInfo};

/// One registered host: its client and what it last said about itself.
#[derive(Clone)]
pub struct HostEntry {
    pub client: Arc<dyn HostClient>,
    pub info: Option<HostInfo>,
    /// `Some` for a host enrolled through the database (see `app::fleet`): its ID,
    /// the fingerprint its client pins, and its status. `None`: a static host
    /// (`--agent-url`), always schedulable.
    pub enrolled: Option<Enrolled>,
}

/// What the registry knows of an enrolled host's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrolled {
    pub id: HostId,
    pub fingerprint: String,
    pub status: HostStatus,
}

impl HostEntry {
    /// Whether new sandboxes may go to this host: static hosts always, enrolled ones
    /// only while `active` (not draining, unreachable or revoked).
    pub fn schedulable(&self) -> bool {
        self.enrolled
            .as_ref()
            .is_none_or(|e| e.status == HostStatus::Active)
    }

    /// Whether the host is believed to answer (static hosts: always tried).
    pub fn reachable(&self) -> bool {
        self.enrolled
            .as_ref()
            .is_none_or(|e| matches!(e.status, HostStatus::Active | HostStatus::Draining))
    }
}

/// The host agents this control plane drives, and the scheduler over them.
#[derive(Clone)]
pub struct Hosts {
    entries: Arc<RwLock<Vec<HostEntry>>>,
}

impl Hosts {
    pub fn new(clients: Vec<Arc<dyn HostClient>>) -> Self {
        Self {
            entries: Arc::new(RwLock::new(
                clients
                    .into_iter()
                    .map(|client| HostEntry {
                        client,
                        info: None,
                        enrolled: None,
                    })
                    .collect(),
            )),
        }
    }

    pub fn entries(&self) -> Vec<HostEntry> {
        self.entries.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Remember what the host of `client` said about itself (matched by client, so
    /// entries added or removed meanwhile do not shift it).
    pub fn set_info(&self, client: &Arc<dyn HostClient>, info: HostInfo) {
        if let Ok(mut e) = self.entries.write() {
            if let Some(entry) = e.iter_mut().find(|e| Arc::ptr_eq(&e.client, client)) {
                entry.info = Some(info);
            }
        }
    }

    /// The client of the host with ID `id`, if it is registered and has answered.
    pub fn get(&self, id: &HostId) -> Option<Arc<dyn HostClient>> {
        self.entries()
            .into_iter()
            .find(|e| {
                e.enrolled.as_ref().is_some_and(|n| &n.id == id)
                    || e.info.as_ref().is_some_and(|i| &i.host_id == id)
            })
            .map(|e| e.client)
    }

    /// The enrolled host `id`'s registration (`None`: not registered).
    pub fn enrolled(&self, id: &HostId) -> Option<Enrolled> {
        self.entries()
            .into_iter()
            .find_map(|e| e.enrolled.filter(|n| &n.id == id))
    }

    /// Register enrolled host `e.id` with `client` (replacing an entry of the same ID,
    /// its connections dropped with it).
    pub fn put_enrolled(&self, e: Enrolled, client: Arc<dyn HostClient>) {
        if let Ok(mut entries) = self.entries.write() {
            entries.retain(|x| x.enrolled.as_ref().is_none_or(|n| n.id != e.id));
            entries.push(HostEntry {
                client,
                info: None,
                enrolled: Some(e),
            });
        }
    }

    /// Set the status of enrolled host `id` (what scheduling and the reconciler read).
    pub fn set_status(&self, id: &HostId, status: HostStatus) {
        if let Ok(mut entries) = self.entries.write() {
            for n in entries.iter_mut().filter_map(|x| x.enrolled.as_mut()) {
                if &n.id == id {
                    n.status = status;
                }
            }
        }
    }

    /// Forget enrolled host `id` (revoked): no call goes to it from now on.
    pub fn remove_enrolled(&self, id: &HostId) {
        if let Ok(mut entries) = self.entries.write() {
            entries.retain(|x| x.enrolled.as_ref().is_none_or(|n| &n.id != id));
        }
    }

    /// Pick the host for a new sandbox of `template`: among hosts that answered and
    /// carry the template, the one with the fewest active sandboxes.
    pub fn pick(&self, template: &TemplateName, load: &HashMap<HostId, u64>) -> Option<HostId> {
        self.entries()
            .into_iter()
            // Draining, unreachable and revoked hosts take no new sandboxes.
            .filter(HostEntry::schedulable)
            .filter_map(|e| e.info)
            .filter(|i| i.templates.contains(template))
            .min_by_key(|i| {
                (
                    load.get(&i.host_id).copied().unwrap_or(0),
                    i.host_id.clone(),
                )
            })
            .map(|i| i.host_id)
    }
}

//! [`Hosts`]: the host agents this control plane drives and the scheduler that picks
//! one for a new sandbox. It holds clients and their last reports, nothing else.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use hearth_types::{HostId, TemplateName};

use super::{HostClient, HostInfo};

/// One registered host: its client and what it last said about itself.
#[derive(Clone)]
pub struct HostEntry {
    pub client: Arc<dyn HostClient>,
    pub info: Option<HostInfo>,
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
                    .map(|client| HostEntry { client, info: None })
                    .collect(),
            )),
        }
    }

    pub fn entries(&self) -> Vec<HostEntry> {
        self.entries.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Remember what host `index` said about itself.
    pub fn set_info(&self, index: usize, info: HostInfo) {
        if let Ok(mut e) = self.entries.write() {
            if let Some(entry) = e.get_mut(index) {
                entry.info = Some(info);
            }
        }
    }

    /// The client of the host with ID `id`, if it is registered and has answered.
    pub fn get(&self, id: &HostId) -> Option<Arc<dyn HostClient>> {
        self.entries()
            .into_iter()
            .find(|e| e.info.as_ref().is_some_and(|i| &i.host_id == id))
            .map(|e| e.client)
    }

    /// Pick the host for a new sandbox of `template`: among hosts that answered and
    /// carry the template, the one with the fewest active sandboxes.
    pub fn pick(&self, template: &TemplateName, load: &HashMap<HostId, u64>) -> Option<HostId> {
        self.entries()
            .into_iter()
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

//! [`Hosts`]: the host agents this control plane drives and the scheduler that picks
//! one for a new sandbox. It holds clients, their last reports and the placements in
//! flight, nothing else; the choice itself is [`super::placement::choose`].
//!
//! A report is only as fresh as the last reconciler pass, so a burst of creates
//! would all see the same free capacity. Every pick therefore reserves what it
//! placed ([`Placement`]) until the host's own report includes it: a create that
//! fails or is refused releases its reservation at once (the guard is dropped); one
//! that lands keeps it until a report asked for after it landed replaces it. These
//! reservations live in this process: two control-plane replicas do not see each
//! other's, and the host's admission stays the last word (a refusal is a 409).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hearth_types::{HostId, TeamId, TemplateName};

use super::placement::{self, Candidate, Held, Need, NoPlacement};
use super::{HostClient, HostInfo};

/// A landed placement whose host never reported again is dropped after this long.
const LANDED_MAX_AGE: Duration = Duration::from_secs(300);

/// One registered host: its client and what it last said about itself.
#[derive(Clone)]
pub struct HostEntry {
    pub client: Arc<dyn HostClient>,
    pub info: Option<HostInfo>,
}

/// A placement this process made that the host has not reported yet.
#[derive(Debug, Clone)]
struct Reservation {
    host: HostId,
    team: TeamId,
    need: Need,
    /// When its create succeeded; `None` while it is in flight.
    landed: Option<Instant>,
}

#[derive(Debug, Default)]
struct Book {
    next: u64,
    held: HashMap<u64, Reservation>,
}

/// The host agents this control plane drives, and the scheduler over them.
#[derive(Clone)]
pub struct Hosts {
    entries: Arc<RwLock<Vec<HostEntry>>>,
    book: Arc<Mutex<Book>>,
}

/// What to place (see [`Hosts::pick`]).
#[derive(Debug, Clone)]
pub struct PlacementRequest<'a> {
    pub team: TeamId,
    pub template: &'a TemplateName,
    pub need: Need,
    /// Only this host may take it (a team's snapshot lives on one host).
    pub only: Option<&'a HostId>,
}

/// Active sandboxes per host, from the database: all teams, and the requesting team's.
#[derive(Debug, Clone, Default)]
pub struct Loads {
    pub all: HashMap<HostId, u64>,
    pub team: HashMap<HostId, u64>,
}

/// A host chosen for one sandbox, its capacity reserved until the guard is dropped
/// (the create failed or was refused) or [`Placement::landed`] is called and the
/// host next reports.
pub struct Placement {
    book: Arc<Mutex<Book>>,
    id: u64,
    host_id: HostId,
    landed: bool,
}

impl Placement {
    pub fn host_id(&self) -> &HostId {
        &self.host_id
    }

    /// The sandbox runs on the host: keep the reservation until the host's next
    /// report (which counts the sandbox itself).
    pub fn landed(mut self) {
        let mut book = lock(&self.book);
        if let Some(r) = book.held.get_mut(&self.id) {
            r.landed = Some(Instant::now());
        }
        self.landed = true;
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if !self.landed {
            lock(&self.book).held.remove(&self.id);
        }
    }
}

fn lock(book: &Mutex<Book>) -> std::sync::MutexGuard<'_, Book> {
    book.lock().unwrap_or_else(|p| p.into_inner())
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
            book: Arc::default(),
        }
    }

    pub fn entries(&self) -> Vec<HostEntry> {
        self.entries.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Remember what host `index` said about itself in answer to a call made at
    /// `asked`. Placements there that landed before `asked` are in the report now
    /// and stop being held.
    pub fn set_info(&self, index: usize, info: HostInfo, asked: Instant) {
        let host = info.host_id.clone();
        if let Ok(mut e) = self.entries.write() {
            if let Some(entry) = e.get_mut(index) {
                entry.info = Some(info);
            }
        }
        lock(&self.book)
            .held
            .retain(|_, r| r.host != host || r.landed.is_none_or(|t| t > asked));
    }

    /// The client of the host with ID `id`, if it is registered and has answered.
    pub fn get(&self, id: &HostId) -> Option<Arc<dyn HostClient>> {
        self.entries()
            .into_iter()
            .find(|e| e.info.as_ref().is_some_and(|i| &i.host_id == id))
            .map(|e| e.client)
    }

    /// What placements in flight hold on each host.
    pub fn held(&self) -> HashMap<HostId, Held> {
        let mut out: HashMap<HostId, Held> = HashMap::new();
        for r in lock(&self.book).held.values() {
            out.entry(r.host.clone()).or_default().add(&r.need);
        }
        out
    }

    /// Pick the host for a new sandbox ([`placement::choose`] over every host that
    /// answered) and reserve what it needs there, in one step under the book's lock,
    /// so that concurrent picks see each other.
    pub fn pick(
        &self,
        req: &PlacementRequest<'_>,
        loads: &Loads,
    ) -> Result<Placement, NoPlacement> {
        let infos: Vec<HostInfo> = self
            .entries()
            .into_iter()
            .filter_map(|e| e.info)
            .filter(|i| req.only.is_none_or(|only| &i.host_id == only))
            .collect();
        let mut book = lock(&self.book);
        book.held
            .retain(|_, r| r.landed.is_none_or(|t| t.elapsed() < LANDED_MAX_AGE));
        let candidates: Vec<Candidate> = infos
            .into_iter()
            .map(|info| {
                let mut held = Held::default();
                let mut team_held = 0;
                for r in book.held.values().filter(|r| r.host == info.host_id) {
                    held.add(&r.need);
                    team_held += u64::from(r.team == req.team);
                }
                let count = |m: &HashMap<HostId, u64>| m.get(&info.host_id).copied().unwrap_or(0);
                // A create's row is counted as soon as it is inserted, its reservation
                // until the next report: for that moment it counts twice, which only
                // moves the order, never what fits.
                Candidate {
                    active: count(&loads.all) + u64::from(held.sandboxes),
                    team_active: count(&loads.team) + team_held,
                    held,
                    info,
                }
            })
            .collect();
        let host_id = placement::choose(&candidates, req.template, &req.need)?;
        let id = book.next;
        book.next += 1;
        book.held.insert(
            id,
            Reservation {
                host: host_id.clone(),
                team: req.team,
                need: req.need,
                landed: None,
            },
        );
        Ok(Placement {
            book: self.book.clone(),
            id,
            host_id,
            landed: false,
        })
    }
}

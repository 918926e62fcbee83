//! [`Hosts`]: the host agents this control plane drives and the scheduler that picks
//! one for a new sandbox. It holds clients, their last reports and the placements in
//! flight, nothing else; the choice itself is [`super::placement::choose`].
//!
//! A report is only as fresh as the last reconciler pass, so a burst of creates
//! would all see the same free capacity. Every pick therefore reserves what it
//! placed ([`Placement`], keyed by the new sandbox's ID) until the host's own report
//! counts it: a report whose `vm_sandboxes` lists the ID ends the reservation (also
//! mid-create: the agent counts a sandbox from the moment it admits it), and so does
//! any report asked for after the create landed (the sandbox may be gone already); a
//! create that fails or is refused releases it at once (the guard is dropped). These
//! reservations live in this process: two control-plane replicas do not see each
//! other's, and the host's admission stays the last word (a refusal is a 409).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hearth_db::HostStatus;
use hearth_types::{HostId, SandboxId, TeamId, TemplateName};

use super::placement::{self, Candidate, Held, Need, NoPlacement};
use super::{HostClient, HostInfo};

/// A landed placement whose host never reported again is dropped after this long.
const LANDED_MAX_AGE: Duration = Duration::from_secs(300);

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

/// A placement this process made that the host has not reported yet.
#[derive(Debug, Clone)]
struct Reservation {
    sandbox: SandboxId,
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
    /// The new sandbox (its reservation ends when a report of its host lists it).
    pub sandbox: &'a SandboxId,
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
                    .map(|client| HostEntry {
                        client,
                        info: None,
                        enrolled: None,
                    })
                    .collect(),
            )),
            book: Arc::default(),
        }
    }

    pub fn entries(&self) -> Vec<HostEntry> {
        self.entries.read().map(|e| e.clone()).unwrap_or_default()
    }

    /// Remember what the host of `client` said about itself in answer to a call made
    /// at `asked` (matched by client, so entries added or removed meanwhile do not
    /// shift it). Placements there that the report counts, or that landed before
    /// `asked`, stop being held.
    pub fn set_info(&self, client: &Arc<dyn HostClient>, info: HostInfo, asked: Instant) {
        let host = info.host_id.clone();
        {
            let mut book = lock(&self.book);
            book.held.retain(|_, r| {
                let counted =
                    info.vm_sandboxes.contains(&r.sandbox) || r.landed.is_some_and(|t| t < asked);
                r.host != host || !counted
            });
        }
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

    /// What placements in flight hold on each host.
    pub fn held(&self) -> HashMap<HostId, Held> {
        let mut out: HashMap<HostId, Held> = HashMap::new();
        for r in lock(&self.book).held.values() {
            out.entry(r.host.clone())
                .or_default()
                .add(&r.need, r.landed.is_none());
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
            // Draining, unreachable and revoked hosts take no new sandboxes.
            .filter(HostEntry::schedulable)
            .filter_map(|e| e.info)
            .filter(|i| req.only.is_none_or(|only| &i.host_id == only))
            // A template pinned to one host (a team's snapshot) is there because the
            // catalogue says so; the host's last report may predate it (a create right
            // after the snapshot), so it counts as listed.
            .map(|mut i| {
                if req.only.is_some() && !i.templates.contains(req.template) {
                    i.templates.push(req.template.clone());
                }
                i
            })
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
                    held.add(&r.need, r.landed.is_none());
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
                sandbox: req.sandbox.clone(),
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

#[cfg(test)]
mod tests {
    use super::super::{AgentHostClient, HostCapacity};
    use super::*;

    fn report(host: &HostId, memory_used_mb: u64) -> HostInfo {
        HostInfo {
            host_id: host.clone(),
            vmm: "qemu".into(),
            accel: "tcg".into(),
            templates: vec!["minimal".parse().unwrap()],
            running: 0,
            capacity: HostCapacity {
                memory_capacity_mb: 512,
                memory_used_mb,
                vcpus_capacity: 8,
                disk_free_mb: 100_000,
                max_sandboxes: 8,
                ..Default::default()
            },
            warm: Vec::new(),
            vm_sandboxes: Default::default(),
        }
    }

    /// A host with room for two 256 MiB sandboxes, and a pick of one.
    fn setup() -> (Hosts, HostId) {
        // Never called: the registry only keeps it.
        let client = AgentHostClient::new("http://127.0.0.1:9", None).unwrap();
        let hosts = Hosts::new(vec![Arc::new(client)]);
        let host = HostId::generate();
        set(&hosts, report(&host, 0), Instant::now());
        (hosts, host)
    }

    fn set(hosts: &Hosts, info: HostInfo, asked: Instant) {
        let client = hosts.entries()[0].client.clone();
        hosts.set_info(&client, info, asked);
    }

    fn pick(hosts: &Hosts) -> Result<Placement, NoPlacement> {
        pick_id(hosts, &SandboxId::generate())
    }

    fn pick_id(hosts: &Hosts, sandbox: &SandboxId) -> Result<Placement, NoPlacement> {
        let template = "minimal".parse().unwrap();
        let req = PlacementRequest {
            sandbox,
            team: TeamId::PLATFORM,
            template: &template,
            need: Need {
                vcpus: 1,
                memory_mb: 256,
                disk_size_mb: 1024,
            },
            only: None,
        };
        hosts.pick(&req, &Loads::default())
    }

    #[test]
    fn a_landed_placement_is_held_until_a_report_asked_after_it() {
        let (hosts, host) = setup();
        let a = pick(&hosts).unwrap();
        let b = pick(&hosts).unwrap();
        assert!(
            matches!(pick(&hosts), Err(NoPlacement::NoCapacity { .. })),
            "two in flight fill it"
        );
        // One fails: its room is back at once.
        drop(b);
        let b = pick(&hosts).unwrap();
        drop(b);
        // One lands; a report asked before it landed does not know it.
        let asked_before = Instant::now();
        a.landed();
        set(&hosts, report(&host, 0), asked_before);
        assert_eq!(hosts.held()[&host].sandboxes, 1);
        let c = pick(&hosts).unwrap();
        assert!(pick(&hosts).is_err(), "the landed one still counts");
        drop(c);
        // A report asked after it landed counts it itself.
        let later = Instant::now() + Duration::from_millis(1);
        set(&hosts, report(&host, 256), later);
        assert!(hosts.held().is_empty());
        let d = pick(&hosts).unwrap();
        assert!(pick(&hosts).is_err(), "reported 256 + one in flight");
        drop(d);
    }

    #[test]
    fn a_report_that_counts_a_create_in_flight_ends_its_reservation() {
        let (hosts, host) = setup();
        let id = SandboxId::generate();
        let a = pick_id(&hosts, &id).unwrap();
        // Asked mid-create: the agent admitted it already and lists it.
        let mut r = report(&host, 256);
        r.vm_sandboxes.insert(id);
        set(&hosts, r, Instant::now());
        assert!(hosts.held().is_empty(), "not counted twice");
        a.landed();
        let b = pick(&hosts).unwrap();
        assert!(
            pick(&hosts).is_err(),
            "256 reported + 256 in flight fill 512"
        );
        drop(b);
    }
}

//! The scheduler's choice, as a pure function: given what every host last reported,
//! what this control plane has placed there since, and the request, which host takes
//! the sandbox, or why none can. No clock, no I/O, no locks: [`super::Hosts::pick`]
//! gathers the inputs and keeps the reservations.
//!
//! The rules, in order:
//! 1. **Template**: only hosts that list the template are eligible (copying a
//!    template to a host that lacks it is not built yet; see [`choose`]).
//! 2. **Fit**, by the agent's own admission rules (`hearth_agent::admission`): free
//!    guest memory (`memory_capacity_mb - memory_used_mb`), free vCPUs, free disk
//!    (`disk_free_mb`, already net of the reserve and of disks still being made) and a
//!    free sandbox slot (`max_sandboxes` over sandboxes holding a VM) must each cover
//!    the request. Pooled VMs count as free: a create takes one of its shape or evicts
//!    them. Placements in flight (picked, not yet in a report) are taken off first.
//! 3. **Spread**: fewest of the requesting team's active sandboxes on the host.
//! 4. **Warmth**: a ready pooled VM of the template at this shape, then a warm
//!    memory snapshot at this shape (a restore, not a boot), then the rest.
//! 5. **Load**: lowest committed share of memory or vCPUs (the larger of the two),
//!    then fewest active sandboxes, then the host ID (a stable order).

use std::fmt;

use hearth_types::{HostId, TemplateName};

use super::{HostCapacity, HostInfo};

/// What a sandbox takes from its host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
}

/// What placements in flight on one host hold (see [`super::Hosts::pick`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub sandboxes: u32,
    pub memory_mb: u64,
    pub vcpus: u64,
    pub disk_mb: u64,
}

impl Held {
    /// Count one placement; its disk only while it is `starting` (as the agent
    /// counts disks: a sandbox's disk is promised until it runs, then it is on the
    /// filesystem, where `disk_free_mb` measures it).
    pub fn add(&mut self, n: &Need, starting: bool) {
        self.sandboxes = self.sandboxes.saturating_add(1);
        self.memory_mb = self.memory_mb.saturating_add(u64::from(n.memory_mb));
        self.vcpus = self.vcpus.saturating_add(u64::from(n.vcpus));
        if starting {
            self.disk_mb = self.disk_mb.saturating_add(u64::from(n.disk_size_mb));
        }
    }
}

/// One host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub info: HostInfo,
    /// Placements in flight there.
    pub held: Held,
    /// Its active sandboxes (all teams), placements in flight included.
    pub active: u64,
    /// The requesting team's active sandboxes there, placements in flight included.
    pub team_active: u64,
}

/// What a host can still take: its report, less what is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    pub vcpus: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub slots: u64,
}

impl Free {
    pub fn of(c: &HostCapacity, held: &Held) -> Self {
        let vm_sandboxes = u64::from(c.vm_sandboxes.saturating_sub(c.pooled_sandboxes));
        Free {
            vcpus: c
                .vcpus_capacity
                .saturating_sub(c.vcpus_used.saturating_sub(c.pooled_vcpus))
                .saturating_sub(held.vcpus),
            memory_mb: c
                .memory_capacity_mb
                .saturating_sub(c.memory_used_mb.saturating_sub(c.pooled_memory_mb))
                .saturating_sub(held.memory_mb),
            disk_mb: c.disk_free_mb.saturating_sub(held.disk_mb),
            slots: u64::from(c.max_sandboxes)
                .saturating_sub(vm_sandboxes)
                .saturating_sub(u64::from(held.sandboxes)),
        }
    }

    /// The parts of `need` this does not cover (empty: it fits).
    pub fn shortages(&self, need: &Need) -> Vec<&'static str> {
        let mut short = Vec::new();
        if self.vcpus < u64::from(need.vcpus) {
            short.push("vCPUs");
        }
        if self.memory_mb < u64::from(need.memory_mb) {
            short.push("memory");
        }
        if self.disk_mb < u64::from(need.disk_size_mb) {
            short.push("disk");
        }
        if self.slots == 0 {
            short.push("sandbox slots");
        }
        short
    }

    /// Share of the host's memory or vCPUs committed (the larger), per mille: the
    /// "load" of rule 5. A host that reports no capacity counts as full.
    fn load_permille(c: &HostCapacity, free: &Free) -> u64 {
        let share = |free: u64, total: u64| match total {
            0 => 1000,
            t => 1000 - (free.min(t) * 1000 / t),
        };
        share(free.memory_mb, c.memory_capacity_mb).max(share(free.vcpus, c.vcpus_capacity))
    }
}

/// Why no host was chosen. The messages go to the API caller as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoPlacement {
    /// No host agent has answered.
    NoHosts,
    /// No answering host holds the template.
    NoTemplate { template: TemplateName },
    /// Hosts hold the template but none has room; `best` is the one with the most
    /// free memory (then vCPUs), and what it lacks.
    NoCapacity {
        need: Need,
        best: HostId,
        free: Free,
        short: Vec<&'static str>,
    },
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl fmt::Display for NoPlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoPlacement::NoHosts => write!(f, "no host agent is reachable"),
            NoPlacement::NoTemplate { template } => {
                write!(f, "no reachable host holds template '{template}'")
            }
            NoPlacement::NoCapacity {
                need,
                best,
                free,
                short,
            } => write!(
                f,
                "no host can take {}, {} MiB of memory and {} MiB of disk: the most free is \
                 {best} with {}, {} MiB of memory, {} MiB of disk and {} (short of {})",
                plural(u64::from(need.vcpus), "vCPU", "vCPUs"),
                need.memory_mb,
                need.disk_size_mb,
                plural(free.vcpus, "vCPU", "vCPUs"),
                free.memory_mb,
                free.disk_mb,
                plural(free.slots, "free sandbox slot", "free sandbox slots"),
                short.join(" and "),
            ),
        }
    }
}

/// How much of the start a host has ready for this request (rule 4; lower is better).
fn warmth(info: &HostInfo, template: &TemplateName, need: &Need) -> u8 {
    let warm = info.warm.iter().find(|w| {
        &w.template == template
            && (w.vcpus, w.memory_mb, w.disk_size_mb)
                == (need.vcpus, need.memory_mb, need.disk_size_mb)
    });
    match warm {
        Some(w) if w.pooled > 0 => 0,
        Some(_) => 1,
        None => 2,
    }
}

/// The host for a sandbox of `template` needing `need`, by the rules of the module
/// docs.
pub fn choose(
    candidates: &[Candidate],
    template: &TemplateName,
    need: &Need,
) -> Result<HostId, NoPlacement> {
    if candidates.is_empty() {
        return Err(NoPlacement::NoHosts);
    }
    // Rule 1. Template copy goes here: once a host can be given a template
    // (issue 8, part 2), hosts without it become eligible after the holders, and
    // the caller copies the template before the create. Until then they are not.
    let holders: Vec<(&Candidate, Free)> = candidates
        .iter()
        .filter(|c| c.info.templates.contains(template))
        .map(|c| (c, Free::of(&c.info.capacity, &c.held)))
        .collect();
    if holders.is_empty() {
        return Err(NoPlacement::NoTemplate {
            template: template.clone(),
        });
    }
    // Rule 2.
    let fitting = holders
        .iter()
        .filter(|(_, free)| free.shortages(need).is_empty());
    // Rules 3 to 5.
    let chosen = fitting.min_by_key(|(c, free)| {
        (
            c.team_active,
            warmth(&c.info, template, need),
            Free::load_permille(&c.info.capacity, free),
            c.active,
            c.info.host_id.clone(),
        )
    });
    if let Some((c, _)) = chosen {
        return Ok(c.info.host_id.clone());
    }
    let (best, free) = holders
        .iter()
        .max_by_key(|(c, free)| {
            (
                free.memory_mb,
                free.vcpus,
                std::cmp::Reverse(c.info.host_id.clone()),
            )
        })
        .map(|(c, free)| (c.info.host_id.clone(), *free))
        .ok_or(NoPlacement::NoHosts)?;
    Err(NoPlacement::NoCapacity {
        need: *need,
        best,
        short: free.shortages(need),
        free,
    })
}

#[cfg(test)]
mod tests {
    use super::super::WarmShape;
    use super::*;

    fn host(n: u8, mem_free: u64, vcpus_free: u64) -> Candidate {
        Candidate {
            info: HostInfo {
                host_id: format!("host-00000000000{n}").parse().unwrap(),
                vmm: "qemu".into(),
                accel: "tcg".into(),
                templates: vec!["minimal".parse().unwrap()],
                running: 0,
                capacity: HostCapacity {
                    memory_capacity_mb: 8192,
                    memory_used_mb: 8192 - mem_free,
                    vcpus_capacity: 8,
                    vcpus_used: 8 - vcpus_free,
                    disk_free_mb: 100_000,
                    max_sandboxes: 10,
                    ..Default::default()
                },
                warm: Vec::new(),
                vm_sandboxes: Default::default(),
            },
            held: Held::default(),
            active: 0,
            team_active: 0,
        }
    }

    fn minimal() -> TemplateName {
        "minimal".parse().unwrap()
    }

    const SMALL: Need = Need {
        vcpus: 1,
        memory_mb: 256,
        disk_size_mb: 1024,
    };

    fn pick(hosts: &[Candidate], need: Need) -> Result<u8, NoPlacement> {
        choose(hosts, &minimal(), &need).map(|h| h.as_str().as_bytes()[16] - b'0')
    }

    #[test]
    fn the_table() {
        // (what differs, hosts, the request, the host chosen)
        type Case = (&'static str, Vec<Candidate>, Need, u8);
        let warm = |mut c: Candidate, pooled| {
            c.info.warm.push(WarmShape {
                template: minimal(),
                vcpus: 1,
                memory_mb: 256,
                disk_size_mb: 1024,
                pooled,
            });
            c
        };
        let team = |mut c: Candidate, n| {
            c.team_active = n;
            c
        };
        let active = |mut c: Candidate, n| {
            c.active = n;
            c
        };
        let without_template = |mut c: Candidate| {
            c.info.templates.clear();
            c
        };
        let cases: Vec<Case> = vec![
            (
                "least loaded by committed memory",
                vec![host(1, 1000, 8), host(2, 4000, 8)],
                SMALL,
                2,
            ),
            (
                "vCPUs count as load too",
                vec![host(1, 8192, 1), host(2, 6000, 8)],
                SMALL,
                2,
            ),
            (
                "only a host the request fits",
                vec![host(1, 8000, 1), host(2, 3000, 4)],
                Need { vcpus: 2, ..SMALL },
                2,
            ),
            (
                "fewest of the team's sandboxes beats a lighter host",
                vec![team(host(1, 8000, 8), 2), team(host(2, 1000, 8), 1)],
                SMALL,
                2,
            ),
            (
                "warm snapshot beats a lighter host",
                vec![host(1, 8000, 8), warm(host(2, 1000, 8), 0)],
                SMALL,
                2,
            ),
            (
                "a pooled VM beats a warm snapshot",
                vec![warm(host(1, 8000, 8), 0), warm(host(2, 1000, 8), 1)],
                SMALL,
                2,
            ),
            (
                "warm at another shape is cold",
                vec![host(1, 8000, 8), warm(host(2, 7000, 8), 1)],
                Need {
                    memory_mb: 512,
                    ..SMALL
                },
                1,
            ),
            (
                "the team's spread beats warmth",
                vec![team(warm(host(1, 8000, 8), 1), 1), host(2, 8000, 8)],
                SMALL,
                2,
            ),
            (
                "a host without the template is never chosen",
                vec![without_template(host(1, 8000, 8)), host(2, 300, 1)],
                SMALL,
                2,
            ),
            (
                "equal load: fewest active sandboxes, then host ID",
                vec![
                    active(host(1, 4000, 8), 3),
                    active(host(2, 4000, 8), 1),
                    host(3, 4000, 8),
                ],
                SMALL,
                3,
            ),
        ];
        for (what, hosts, need, want) in cases {
            assert_eq!(pick(&hosts, need), Ok(want), "{what}");
        }
    }

    #[test]
    fn placements_in_flight_and_pooled_vms_change_what_fits() {
        let mut a = host(1, 512, 8);
        let b = host(2, 300, 8);
        assert_eq!(pick(&[a.clone(), b.clone()], SMALL), Ok(1));
        a.held.add(&SMALL, true);
        a.held.add(&SMALL, true);
        // Host 1 reported 512 MiB free but two creates are on their way there.
        assert_eq!(pick(&[a.clone(), b.clone()], SMALL), Ok(2));
        // Pooled VMs give their place to creates: their memory is free.
        a.info.capacity.pooled_memory_mb = 512;
        a.info.capacity.pooled_vcpus = 2;
        a.info.capacity.pooled_sandboxes = 2;
        a.info.capacity.vm_sandboxes = 2;
        assert_eq!(
            pick(&[a, b], SMALL),
            Ok(1),
            "it fits again and is the lighter"
        );
    }

    #[test]
    fn slots_and_disk_are_limits() {
        let mut a = host(1, 8000, 8);
        a.info.capacity.vm_sandboxes = 10;
        let mut b = host(2, 8100, 8);
        b.info.capacity.disk_free_mb = 1000;
        let err = pick(&[a.clone(), b.clone()], SMALL).unwrap_err();
        let NoPlacement::NoCapacity { short, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(short, &["disk"], "host 2 has the most free memory: {err}");
        b.info.capacity.disk_free_mb = 1024;
        assert_eq!(pick(&[a, b], SMALL), Ok(2));
    }

    #[test]
    fn refusals_name_the_shortage() {
        assert_eq!(pick(&[], SMALL), Err(NoPlacement::NoHosts));
        let mut lone = host(1, 8000, 8);
        lone.info.templates.clear();
        assert_eq!(
            pick(&[lone], SMALL).unwrap_err().to_string(),
            "no reachable host holds template 'minimal'"
        );
        let err = pick(
            &[host(1, 3000, 1), host(2, 2000, 2)],
            Need {
                vcpus: 2,
                memory_mb: 4096,
                disk_size_mb: 1024,
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no host can take 2 vCPUs, 4096 MiB of memory and 1024 MiB of disk: the most free \
             is host-000000000001 with 1 vCPU, 3000 MiB of memory, 100000 MiB of disk and 10 \
             free sandbox slots (short of vCPUs and memory)"
        );
    }

    #[test]
    fn a_host_reporting_no_capacity_takes_nothing() {
        let mut a = host(1, 0, 0);
        a.info.capacity = HostCapacity::default();
        let err = pick(&[a], SMALL).unwrap_err();
        assert!(matches!(err, NoPlacement::NoCapacity { .. }), "{err}");
    }
}

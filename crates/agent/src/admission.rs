//! Host admission: whether this host can hold one more sandbox.
//!
//! Owns the capacity model (memory with an overcommit ratio and a host reserve,
//! a vCPU limit, free disk on the run directory's filesystem with a reserve, and
//! the sandbox count) and the refusal messages. The check itself runs inside
//! [`crate::registry::Registry::insert_admitted`], under the registry's lock, so
//! checking and reserving are one atomic step: a sandbox counts from the moment it
//! is registered (before any slot, disk or VM is taken) until it leaves the
//! registry (failed create, destroy). Sandboxes re-adopted at recovery and those
//! in `Error` (which still hold their disk until destroyed) count too.

use std::path::{Path, PathBuf};

use crate::state::{SandboxSpec, SandboxState};

/// Capacity settings (part of [`crate::AgentConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityConfig {
    /// Guest memory the host may promise, as a multiple of (host memory - reserve).
    pub memory_overcommit: f64,
    /// Host memory kept for the host itself (agent, QEMU overhead, page cache).
    pub memory_reserve_mb: u64,
    /// Host memory; `None` = `MemTotal` from /proc/meminfo.
    pub host_memory_mb: Option<u64>,
    /// Total vCPUs of all sandboxes; `None` = 4 x the host's cores.
    pub vcpu_limit: Option<u32>,
    /// Free space kept on the run directory's filesystem.
    pub disk_reserve_mb: u64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            memory_overcommit: 1.0,
            memory_reserve_mb: 1024,
            host_memory_mb: None,
            vcpu_limit: None,
            disk_reserve_mb: 2048,
        }
    }
}

/// What the registered sandboxes hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub sandboxes: usize,
    pub memory_mb: u64,
    pub vcpus: u64,
    /// Disk of sandboxes still starting: promised, maybe not yet on the filesystem.
    pub disk_pending_mb: u64,
    /// The part of the above held by pooled VMs, which give their place to a
    /// create (the service evicts them until it fits).
    pub pooled_sandboxes: usize,
    pub pooled_memory_mb: u64,
    pub pooled_vcpus: u64,
}

impl Usage {
    pub fn add(&mut self, spec: &SandboxSpec, state: SandboxState) {
        self.sandboxes += 1;
        self.memory_mb += u64::from(spec.memory_mb);
        self.vcpus += u64::from(spec.vcpus);
        if state == SandboxState::Starting {
            self.disk_pending_mb += u64::from(spec.disk_size_mb);
        }
    }
}

/// Why a create was refused. The messages go to the control plane as they are:
/// they name the limit and the numbers, never a host path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("host sandboxes: this host runs its maximum of {max} sandboxes")]
    Sandboxes { max: usize },
    #[error("host memory: this sandbox needs {need} MiB, {left} MiB of {total} MiB left (overcommit {overcommit:?})")]
    Memory {
        need: u64,
        left: u64,
        total: u64,
        overcommit: f64,
    },
    #[error("host vCPUs: this sandbox needs {need}, {left} of {total} left")]
    Vcpus { need: u64, left: u64, total: u64 },
    #[error("host disk: this sandbox needs {need} MiB, {left} MiB free beyond the {reserve} MiB reserve")]
    Disk { need: u64, left: u64, reserve: u64 },
    #[error("host disk: free space could not be measured")]
    DiskUnknown,
}

/// The host's limits, resolved once at start.
#[derive(Debug, Clone)]
pub struct Capacity {
    pub max_sandboxes: usize,
    /// Guest memory the host may promise in total (after reserve and overcommit).
    pub memory_mb: u64,
    pub vcpus: u64,
    pub overcommit: f64,
    pub disk_reserve_mb: u64,
    /// A path on the filesystem that holds sandbox disks.
    pub disk_dir: PathBuf,
}

impl Capacity {
    /// Resolve `cfg` against this host.
    pub fn resolve(cfg: &CapacityConfig, max_sandboxes: usize, disk_dir: &Path) -> Self {
        let host_mb = cfg.host_memory_mb.unwrap_or_else(host_memory_mb);
        let usable = host_mb.saturating_sub(cfg.memory_reserve_mb) as f64;
        let overcommit = if cfg.memory_overcommit.is_finite() && cfg.memory_overcommit > 0.0 {
            cfg.memory_overcommit
        } else {
            1.0
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        Self {
            max_sandboxes,
            memory_mb: (usable * overcommit) as u64,
            vcpus: cfg.vcpu_limit.map_or(4 * cores, u64::from),
            overcommit,
            disk_reserve_mb: cfg.disk_reserve_mb,
            disk_dir: disk_dir.to_owned(),
        }
    }

    /// Free MiB on the disk filesystem beyond the reserve.
    pub fn disk_free_mb(&self) -> Option<u64> {
        free_mb(&self.disk_dir).map(|f| f.saturating_sub(self.disk_reserve_mb))
    }

    /// Whether `spec` fits beside `used`. Cheap (one statvfs): runs under the
    /// registry lock.
    pub fn admit(&self, used: &Usage, spec: &SandboxSpec) -> Result<(), Refusal> {
        if used.sandboxes >= self.max_sandboxes {
            return Err(Refusal::Sandboxes {
                max: self.max_sandboxes,
            });
        }
        let need = u64::from(spec.memory_mb);
        let left = self.memory_mb.saturating_sub(used.memory_mb);
        if need > left {
            return Err(Refusal::Memory {
                need,
                left,
                total: self.memory_mb,
                overcommit: self.overcommit,
            });
        }
        let need = u64::from(spec.vcpus);
        let left = self.vcpus.saturating_sub(used.vcpus);
        if need > left {
            return Err(Refusal::Vcpus {
                need,
                left,
                total: self.vcpus,
            });
        }
        let need = u64::from(spec.disk_size_mb);
        let left = self
            .disk_free_mb()
            .ok_or(Refusal::DiskUnknown)?
            .saturating_sub(used.disk_pending_mb);
        if need > left {
            return Err(Refusal::Disk {
                need,
                left,
                reserve: self.disk_reserve_mb,
            });
        }
        Ok(())
    }
}

/// `MemTotal` in MiB (0 when /proc/meminfo is unreadable: then nothing is admitted).
fn host_memory_mb() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// Free MiB (for unprivileged users, as `df` shows) of the filesystem holding `dir`.
fn free_mb(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct we own; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vcpus: u32, memory_mb: u32, disk_size_mb: u32) -> SandboxSpec {
        SandboxSpec {
            sandbox_id: hearth_types::SandboxId::generate(),
            template: "minimal".parse().unwrap(),
            vcpus,
            memory_mb,
            disk_size_mb,
            expires_at_unix_ms: 0,
            env: Default::default(),
            team_id: String::new(),
        }
    }

    fn cap(host_mb: u64, overcommit: f64, vcpus: u32) -> Capacity {
        let cfg = CapacityConfig {
            memory_overcommit: overcommit,
            memory_reserve_mb: 1000,
            host_memory_mb: Some(host_mb),
            vcpu_limit: Some(vcpus),
            disk_reserve_mb: 0,
        };
        Capacity::resolve(&cfg, 10, Path::new("/"))
    }

    #[test]
    fn memory_counts_reserve_and_overcommit() {
        let c = cap(3000, 1.0, 100);
        assert_eq!(c.memory_mb, 2000);
        let mut used = Usage::default();
        used.add(&spec(1, 1800, 1), SandboxState::Running);
        let err = c.admit(&used, &spec(1, 256, 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "host memory: this sandbox needs 256 MiB, 200 MiB of 2000 MiB left (overcommit 1.0)"
        );
        assert!(c.admit(&used, &spec(1, 200, 1)).is_ok());
        assert_eq!(cap(3000, 1.5, 100).memory_mb, 3000);
    }

    #[test]
    fn vcpus_and_count_are_limits() {
        let c = cap(100_000, 1.0, 3);
        let mut used = Usage::default();
        used.add(&spec(2, 1, 1), SandboxState::Running);
        assert_eq!(
            c.admit(&used, &spec(2, 1, 1)).unwrap_err(),
            Refusal::Vcpus {
                need: 2,
                left: 1,
                total: 3
            }
        );
        let mut c = cap(100_000, 1.0, 100);
        c.max_sandboxes = 1;
        assert!(matches!(
            c.admit(&used, &spec(1, 1, 1)),
            Err(Refusal::Sandboxes { max: 1 })
        ));
    }

    #[test]
    fn disk_keeps_its_reserve_and_counts_starting_sandboxes() {
        let mut c = cap(100_000, 1.0, 100);
        let free = c.disk_free_mb().unwrap();
        assert!(c.admit(&Usage::default(), &spec(1, 1, 1)).is_ok());
        c.disk_reserve_mb = free;
        let err = c.admit(&Usage::default(), &spec(1, 1, 1)).unwrap_err();
        assert!(matches!(err, Refusal::Disk { need: 1, .. }), "{err}");
        c.disk_reserve_mb = 0;
        let mut used = Usage::default();
        used.add(&spec(1, 1, free as u32), SandboxState::Starting);
        assert!(c.admit(&used, &spec(1, 1, 1)).is_err());
        let mut used = Usage::default();
        used.add(&spec(1, 1, free as u32), SandboxState::Running);
        assert!(c.admit(&used, &spec(1, 1, 1)).is_ok());
    }
}

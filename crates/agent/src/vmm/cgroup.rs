//! One cgroup per VM: memory, CPU and pids limits for a VMM process.
//!
//! Owns the cgroup directories under `<mount>/<parent>/<vm-name>` (cgroup v2, the
//! unified hierarchy) or under each of the v1 `memory`, `cpu` and `pids`
//! hierarchies, their limits, the descriptors used to move a process in before it
//! execs, and their removal. It never touches cgroups outside its parent, and it
//! does not decide the limits' sizes (the driver does, from the VM's spec).
//!
//! Placement: [`VmCgroup::procs_fds`] are opened before `fork`; the child writes
//! `"0"` (= itself) into each between fork and exec, so the VMM's first
//! instruction already runs inside its limits.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The CFS period used for CPU quotas (100 ms, the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Errors creating, filling or removing a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {root} (need v2 with memory, cpu and pids, or the v1 memory, cpu and pids hierarchies)")]
    Unsupported { root: PathBuf },
    #[error("cgroup file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path} still holds processes")]
    Busy { path: PathBuf },
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v2: one hierarchy mounted at this path.
    V2 { root: PathBuf },
    /// cgroup v1: one mount per controller.
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
}

impl Layout {
    /// Look at `mount` (normally `/sys/fs/cgroup`): v2 when it is a unified mount
    /// offering memory, cpu and pids; else v1 when those three hierarchies exist.
    pub fn detect(mount: &Path) -> Result<Layout, CgroupError> {
        if let Ok(c) = std::fs::read_to_string(mount.join("cgroup.controllers")) {
            let has = |n: &str| c.split_whitespace().any(|w| w == n);
            if has("memory") && has("cpu") && has("pids") {
                return Ok(Layout::V2 {
                    root: mount.to_owned(),
                });
            }
        }
        let memory = mount.join("memory");
        let cpu = mount.join("cpu");
        let pids = mount.join("pids");
        if memory.join("memory.limit_in_bytes").exists()
            && cpu.join("cpu.cfs_quota_us").exists()
            && pids.join("cgroup.procs").exists()
        {
            return Ok(Layout::V1 { memory, cpu, pids });
        }
        Err(CgroupError::Unsupported {
            root: mount.to_owned(),
        })
    }

    pub fn version(&self) -> u8 {
        match self {
            Layout::V2 { .. } => 2,
            Layout::V1 { .. } => 1,
        }
    }
}

/// Limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// CPU time per [`CPU_PERIOD_US`], in microseconds (vCPUs x period).
    pub cpu_quota_us: u64,
    pub pids_max: u32,
}

/// The per-VM cgroups of one driver: `<parent>/<vm-name>` in each hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    /// Relative path below each hierarchy's mount, e.g. `hearth/<host-id>`.
    parent: PathBuf,
}

/// A created cgroup, with `cgroup.procs` of each hierarchy open for writing.
#[derive(Debug)]
pub struct VmCgroup {
    pub dirs: Vec<PathBuf>,
    procs: Vec<OwnedFd>,
}

impl VmCgroup {
    /// Descriptors the child writes `"0"` into before exec (see the module docs).
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path))
}

impl Cgroups {
    pub fn new(layout: Layout, parent: impl Into<PathBuf>) -> Self {
        Self {
            layout,
            parent: parent.into(),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The hierarchy mounts this driver uses (one for v2).
    fn mounts(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::V2 { root } => vec![root],
            Layout::V1 { memory, cpu, pids } => vec![memory, cpu, pids],
        }
    }

    /// The directories of VM `name`, one per hierarchy.
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        self.mounts()
            .into_iter()
            .map(|m| m.join(&self.parent).join(name))
            .collect()
    }

    /// Where the processes of VM `name` are listed (memory hierarchy for v1).
    pub fn procs_file(&self, name: &str) -> PathBuf {
        self.dirs(name)[0].join("cgroup.procs")
    }

    /// Create the cgroup of VM `name` with `limits` (an existing one is reused
    /// and its limits rewritten).
    pub fn create(&self, name: &str, limits: Limits) -> Result<VmCgroup, CgroupError> {
        let made = self.create_inner(name, limits);
        if made.is_err() {
            let _ = self.remove_now(name);
        }
        made
    }

    fn create_inner(&self, name: &str, limits: Limits) -> Result<VmCgroup, CgroupError> {
        let dirs = self.dirs(name);
        match &self.layout {
            Layout::V2 { root } => {
                // Controllers must be enabled on every ancestor's subtree_control.
                let mut cur = root.clone();
                for part in self.parent.components() {
                    write(&cur.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
                    cur.push(part);
                    std::fs::create_dir_all(&cur).map_err(io(&cur))?;
                }
                write(&cur.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
                let d = &dirs[0];
                std::fs::create_dir_all(d).map_err(io(d))?;
                write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                let swap = d.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(
                    &d.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
                write(&d.join("pids.max"), &limits.pids_max.to_string())?;
            }
            Layout::V1 { .. } => {
                for d in &dirs {
                    std::fs::create_dir_all(d).map_err(io(d))?;
                }
                let (mem, cpu, pids) = (&dirs[0], &dirs[1], &dirs[2]);
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                // With swap accounting, memory+swap gets the same bound (no swapping past it).
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory_bytes.to_string())?;
                }
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &cpu.join("cpu.cfs_quota_us"),
                    &limits.cpu_quota_us.to_string(),
                )?;
                write(&pids.join("pids.max"), &limits.pids_max.to_string())?;
            }
        }
        let mut procs = Vec::new();
        for d in &dirs {
            let p = d.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(io(&p))?;
            procs.push(OwnedFd::from(f));
        }
        Ok(VmCgroup { dirs, procs })
    }

    /// PIDs in VM `name`'s cgroup (empty when it does not exist).
    pub fn pids(&self, name: &str) -> Vec<u32> {
        std::fs::read_to_string(self.procs_file(name))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Names of the VM cgroups present under the parent.
    pub fn list(&self) -> Vec<String> {
        let dir = self.mounts()[0].join(&self.parent);
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        v.sort();
        v
    }

    /// One attempt at removing VM `name`'s cgroup in every hierarchy; a missing
    /// directory is fine.
    fn remove_now(&self, name: &str) -> Result<(), CgroupError> {
        let mut result = Ok(());
        for d in self.dirs(name) {
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    result = Err(CgroupError::Busy { path: d });
                }
                Err(source) => result = Err(CgroupError::Io { path: d, source }),
            }
        }
        result
    }

    /// Remove VM `name`'s cgroup: SIGKILL whatever still runs in it (only the
    /// VM's own processes can be there), then retry the removal for up to 2 s
    /// while the kernel finishes tearing the processes down.
    pub async fn remove(&self, name: &str) -> Result<(), CgroupError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            for pid in self.pids(name) {
                super::signal_pid(pid, libc::SIGKILL);
            }
            match self.remove_now(name) {
                Err(CgroupError::Busy { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }
}

impl Cgroups {
    /// Remove the (empty) parent directory in every hierarchy, e.g. when a
    /// benchmark is done with its own parent. A parent still holding VM groups
    /// stays; errors are ignored.
    pub fn remove_parent(&self) {
        for m in self.mounts() {
            let _ = std::fs::remove_dir(m.join(&self.parent));
        }
    }
}

/// Read one number from a cgroup file (tests and diagnostics).
pub fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1(root: &Path) -> Layout {
        for (c, f) in [
            ("memory", "memory.limit_in_bytes"),
            ("cpu", "cpu.cfs_quota_us"),
            ("pids", "cgroup.procs"),
        ] {
            std::fs::create_dir_all(root.join(c)).unwrap();
            std::fs::write(root.join(c).join(f), "").unwrap();
        }
        Layout::detect(root).unwrap()
    }

    #[test]
    fn detects_v1_and_v2_and_neither() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(
            Layout::detect(t.path()),
            Err(CgroupError::Unsupported { .. })
        ));
        assert_eq!(v1(t.path()).version(), 1);
        let t2 = tempfile::tempdir().unwrap();
        std::fs::write(
            t2.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(
            Layout::detect(t2.path()).unwrap(),
            Layout::V2 {
                root: t2.path().to_owned()
            }
        );
        std::fs::write(t2.path().join("cgroup.controllers"), "cpu io\n").unwrap();
        assert!(Layout::detect(t2.path()).is_err());
    }

    #[test]
    fn v2_writes_limits_and_enables_controllers_on_ancestors() {
        // A plain directory stands in for the unified mount: files are just written.
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("cgroup.controllers"), "memory cpu pids").unwrap();
        let cg = Cgroups::new(Layout::detect(t.path()).unwrap(), "hearth/host-1");
        let d = t.path().join("hearth/host-1/sb-x");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cgroup.procs"), "").unwrap();
        let limits = Limits {
            memory_bytes: 512 << 20,
            cpu_quota_us: 200_000,
            pids_max: 64,
        };
        let made = cg.create("sb-x", limits).unwrap();
        assert_eq!(made.procs_fds().len(), 1);
        let read = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(read("hearth/host-1/sb-x/memory.max"), "536870912");
        assert_eq!(read("hearth/host-1/sb-x/cpu.max"), "200000 100000");
        assert_eq!(read("hearth/host-1/sb-x/pids.max"), "64");
        for anc in ["", "hearth/", "hearth/host-1/"] {
            assert_eq!(
                read(&format!("{anc}cgroup.subtree_control")),
                "+memory +cpu +pids"
            );
        }
        assert_eq!(cg.list(), vec!["sb-x".to_owned()]);
    }
}

//! QEMU `microvm` driver.
//!
//! Owns the QEMU command line, the process start (inside the sandbox's network
//! namespace, in its own session so that the agent's death does not take VMs with
//! it), the QMP-driven stop, and the KVM boot probe behind [`Accel::Auto`]. It does
//! not create disks, taps or run directories.
//!
//! Confinement of every sandbox VM ([`LaunchMode::Sandbox`]):
//! * `-runas UID:GID` with the spec's own unprivileged uid (QEMU drops to it after
//!   opening its devices, sockets and files as root);
//! * `-sandbox on,obsolete=deny,spawn=deny,resourcecontrol=deny` (seccomp;
//!   `elevateprivileges=deny` kills QEMU when combined with `-runas`);
//! * the root disk passed as two descriptors (`-add-fd`, read-write + read-only,
//!   `/dev/fdset/1`), so the uid never needs a path into the root-only run dir;
//! * a cgroup per VM ([`super::cgroup`]) entered before exec: memory = guest
//!   memory + a configured QEMU overhead, CPU = vCPUs, a pids cap;
//! * `-no-reboot`: a guest that reboots (or whose PID 1 dies) ends QEMU;
//! * the serial console on a Unix socket (`console.sock`), never a growing file.
//!
//! Guest memory ([`Memory`]) is a `memory-backend-file` when it is a file: the
//! agent (root) makes sure it exists with the right length before QEMU starts,
//! and QEMU opens it before it drops to the runas uid, so the uid needs no path
//! to it. Lifecycle ([`Vmm::pause`] .. [`Vmm::restore`]) is QMP: `stop`/`cont`,
//! and migration to or from a descriptor the agent opened (`getfd` with
//! `SCM_RIGHTS`, `migrate`/`migrate-incoming uri=fd:NAME`: `spawn=deny` forbids
//! `exec:` and QEMU 7.2 has no `file:`), with `x-ignore-shared` exactly when the
//! memory stays in a shared file. A VM to restore into starts with `-incoming
//! defer -S` and stays frozen after the load until `cont`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::cgroup::{Cgroups, Limits, CPU_PERIOD_US};
use super::qmp::{MigrationInfo, QmpClient, QmpError};
use super::{
    signal_pid, Accel, DiskFormat, Memory, Nic, ResolvedAccel, SavedState, VmHandle, VmSpec, Vmm,
    VmmError,
};

/// How long the KVM probe may take before we call KVM unusable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);
/// What the guest prints when booted with `hearth.probe=1`.
pub const PROBE_MARKER: &str = "HEARTH_PROBE_OK";

/// The seccomp policy of every sandbox VM (see the module docs).
pub const SECCOMP: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";
/// Largest TCG translation cache (MiB): bounds QEMU's biggest anonymous allocation
/// besides guest memory, so the cgroup overhead can be a constant.
pub const TCG_TB_SIZE_MB: u32 = 64;
/// Default memory allowed on top of guest memory in a VM's cgroup (MiB): the TCG
/// translation cache ([`TCG_TB_SIZE_MB`]), QEMU's heap and the page cache of the
/// kernel and initrd it reads, with margin (measured: docs/contracts.md).
pub const DEFAULT_MEMORY_OVERHEAD_MB: u32 = 192;
/// Default pids cap of a VM's cgroup (QEMU threads: vCPUs, I/O workers, RCU).
pub const DEFAULT_PIDS_MAX: u32 = 256;

/// How a VM is confined by this driver.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// `None`: no cgroups (tests without root).
    pub cgroups: Option<Cgroups>,
    /// Memory allowed on top of guest memory, MiB.
    pub memory_overhead_mb: u32,
    pub pids_max: u32,
}

impl Confinement {
    /// No cgroup (uid and seccomp still come from the spec and the mode).
    pub fn none() -> Self {
        Self {
            cgroups: None,
            memory_overhead_mb: DEFAULT_MEMORY_OVERHEAD_MB,
            pids_max: DEFAULT_PIDS_MAX,
        }
    }

    /// The cgroup limits of `spec`.
    pub fn limits(&self, spec: &VmSpec) -> Limits {
        Limits {
            memory_bytes: (u64::from(spec.memory_mb) + u64::from(self.memory_overhead_mb)) << 20,
            cpu_quota_us: u64::from(spec.vcpus.max(1)) * CPU_PERIOD_US,
            pids_max: self.pids_max,
        }
    }
}

/// The QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    binary: PathBuf,
    accel: ResolvedAccel,
    confinement: Confinement,
    /// The binary's version, asked once (`--version`) for [`Vmm::snapshot_compat`].
    version: Arc<OnceLock<String>>,
}

impl QemuVmm {
    /// The driver for `binary`. Its version is asked in the background right
    /// away, so the first save does not wait for `--version` (~30 ms).
    pub fn new(binary: PathBuf, accel: ResolvedAccel, confinement: Confinement) -> Self {
        let version = Arc::new(OnceLock::new());
        let (bin, cell) = (binary.clone(), Arc::clone(&version));
        std::thread::spawn(move || {
            if let Some(v) = qemu_version(&bin) {
                let _ = cell.set(v);
            }
        });
        Self {
            binary,
            accel,
            confinement,
            version,
        }
    }

    /// The QEMU version (`7.2.22`), or `None` when the binary cannot tell.
    fn version(&self) -> Option<&str> {
        if let Some(v) = self.version.get() {
            return Some(v);
        }
        let v = qemu_version(&self.binary)?;
        Some(self.version.get_or_init(|| v))
    }
}

/// Ask `binary --version` (bounded by [`VERSION_TIMEOUT`]) for its upstream
/// version: `QEMU emulator version 7.2.22 (Debian ...)` gives `7.2.22`. The
/// distribution's package revision is left out: stable releases of one upstream
/// version keep the migration format.
fn qemu_version(binary: &Path) -> Option<String> {
    use std::io::Read;
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + VERSION_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = Vec::new();
    child.stdout.take()?.take(4096).read_to_end(&mut out).ok()?;
    parse_qemu_version(&String::from_utf8_lossy(&out))
}

/// `7.2.22` out of `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)`.
pub fn parse_qemu_version(output: &str) -> Option<String> {
    let rest = output.lines().next()?.split("version ").nth(1)?;
    let v = rest.split_whitespace().next()?;
    (!v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
    .then(|| v.to_owned())
}

/// How long `qemu-system-x86_64 --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// The id of the guest-memory backend object.
const MEMORY_BACKEND_ID: &str = "mem";
/// The name under which a migration descriptor is handed to QEMU (`getfd`).
const MIGRATION_FD: &str = "hearth-migration";
/// How long a VM whose control socket closed gets to be seen exited.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// Bound of each QMP command of a lifecycle operation.
pub const LIFECYCLE_QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a migration may take besides the per-GiB allowance.
pub const MIGRATION_BASE_TIMEOUT: Duration = Duration::from_secs(20);
/// Extra migration time per GiB of guest memory (or state) moved through the
/// stream (full saves of a 1 GiB TCG guest take seconds on a busy host).
pub const MIGRATION_TIMEOUT_PER_GIB: Duration = Duration::from_secs(60);

/// The migration deadline for `bytes` moved through the stream.
pub fn migration_timeout(bytes: u64) -> Duration {
    let gib = bytes.div_ceil(1 << 30);
    MIGRATION_BASE_TIMEOUT
        + MIGRATION_TIMEOUT_PER_GIB * u32::try_from(gib).unwrap_or(u32::MAX / 120)
}

/// A path as a QEMU option value (`,` doubled), refusing what QEMU cannot take.
fn option_path(path: &Path) -> Option<String> {
    path.to_str().map(|p| p.replace(',', ",,"))
}

/// The length a memory file of `spec` must have.
fn memory_bytes(spec: &VmSpec) -> u64 {
    u64::from(spec.memory_mb) << 20
}

/// Make sure the memory file of `spec` is there before QEMU starts: a
/// [`Memory::Shared`] file is created (0600, sparse, exactly `memory_mb` MiB) when
/// absent and refused when its length differs (it may hold a paused VM's memory:
/// never truncated); a [`Memory::Private`] base must exist with that length.
pub fn prepare_memory(spec: &VmSpec) -> Result<(), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let (path, create) = match &spec.memory {
        Memory::Anonymous => return Ok(()),
        Memory::Shared(p) => (p, true),
        Memory::Private(p) => (p, false),
    };
    let err = |source: std::io::Error| VmmError::Memory {
        name: spec.name.clone(),
        path: path.clone(),
        source,
    };
    let invalid = |msg: String| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
    if option_path(path).is_none() {
        return Err(invalid("the path is not UTF-8".into()));
    }
    let want = memory_bytes(spec);
    if create {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => return f.set_len(want).map_err(err),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
    }
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    if !meta.file_type().is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() != want {
        return Err(invalid(format!(
            "is {} bytes, the VM has {} MiB of memory ({want} bytes)",
            meta.len(),
            spec.memory_mb
        )));
    }
    Ok(())
}

/// What kind of VM the command line is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchMode {
    /// A sandbox: confined, disk passed as the two descriptors `(rw, ro)`,
    /// console on a socket.
    Sandbox { disk_fds: (i32, i32) },
    /// The KVM boot probe: disk by path with `snapshot=on` (writes go to a
    /// throwaway overlay), console to a file, not confined.
    Probe,
}

/// The full QEMU argument list for `spec` in `mode`.
pub fn qemu_args(spec: &VmSpec, accel: ResolvedAccel, mode: LaunchMode) -> Vec<String> {
    let (accel_arg, cpu) = match accel {
        ResolvedAccel::Kvm => ("kvm".to_owned(), "host"),
        ResolvedAccel::Tcg => (format!("tcg,tb-size={TCG_TB_SIZE_MB}"), "max"),
    };
    let drive = match mode {
        LaunchMode::Sandbox { .. } => format!(
            "id=root,file=/dev/fdset/1,format={},if=none,file.locking=off",
            spec.disk_format.as_str()
        ),
        LaunchMode::Probe => format!(
            "id=root,file={},format={},if=none,snapshot=on",
            spec.disk.display(),
            spec.disk_format.as_str()
        ),
    };
    let (machine, backend) = match &spec.memory {
        Memory::Anonymous => ("microvm".to_owned(), None),
        Memory::Shared(p) | Memory::Private(p) => {
            let share = if matches!(spec.memory, Memory::Shared(_)) {
                "on"
            } else {
                "off"
            };
            (
                format!("microvm,memory-backend={MEMORY_BACKEND_ID}"),
                Some(format!(
                    "memory-backend-file,id={MEMORY_BACKEND_ID},size={}M,mem-path={},share={share}",
                    spec.memory_mb,
                    // prepare_memory refused non-UTF-8 paths before we get here.
                    option_path(p).unwrap_or_default()
                )),
            )
        }
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        spec.name.clone(),
        "-M".into(),
        machine,
        "-accel".into(),
        accel_arg,
        "-cpu".into(),
        cpu.into(),
        "-m".into(),
        spec.memory_mb.to_string(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
    ];
    if let Some(backend) = backend {
        args.extend(["-object".into(), backend]);
    }
    if spec.incoming {
        // Frozen, waiting for `migrate-incoming`; still frozen after the load.
        args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    }
    match mode {
        LaunchMode::Sandbox { disk_fds: (rw, ro) } => {
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id=con,path={},server=on,wait=off",
                    spec.console_socket().display()
                ),
                "-serial".into(),
                "chardev:con".into(),
                "-add-fd".into(),
                format!("fd={rw},set=1"),
                "-add-fd".into(),
                format!("fd={ro},set=1"),
                "-sandbox".into(),
                SECCOMP.into(),
            ]);
            if let Some(uid) = spec.runas {
                args.extend(["-runas".into(), format!("{uid}:{uid}")]);
            }
        }
        LaunchMode::Probe => args.extend([
            "-serial".into(),
            format!("file:{}", spec.console_log().display()),
        ]),
    }
    args.extend([
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-append".into(),
        spec.cmdline.clone(),
        "-drive".into(),
        drive,
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
    ]);
    if let Some(initrd) = &spec.initrd {
        args.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    let netdev = match &spec.nic {
        Some(Nic::Tap(tap)) => Some(format!("tap,id=n0,ifname={tap},script=no,downscript=no")),
        Some(Nic::Isolated) => Some("hubport,id=n0,hubid=0".to_owned()),
        None => None,
    };
    if let Some(netdev) = netdev {
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={}", crate::net::GUEST_MAC),
        ]);
    }
    args.extend([
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            spec.control_socket().display()
        ),
        "-pidfile".into(),
        spec.pid_file().display().to_string(),
    ]);
    args
}

/// Start QEMU for `spec`; the returned handle's `exited` flag flips when it is
/// reaped. With `cgroups`, the process runs in its VM cgroup from the start, and
/// the cgroup is removed once the process has been reaped.
async fn spawn_qemu(
    binary: &Path,
    spec: &VmSpec,
    accel: ResolvedAccel,
    probe: bool,
    confinement: &Confinement,
) -> Result<VmHandle, VmmError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&spec.run_dir)
        .map_err(|source| VmmError::RunDir {
            path: spec.run_dir.clone(),
            source,
        })?;
    let stderr_path = spec.run_dir.join("qemu.log");
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&stderr_path)
        .map_err(|source| VmmError::RunDir {
            path: stderr_path,
            source,
        })?;
    prepare_memory(spec)?;
    let netns: Option<OwnedFd> = match &spec.netns {
        Some(ns) => Some(
            std::fs::File::open(format!("/run/netns/{ns}"))
                .map(OwnedFd::from)
                .map_err(|source| VmmError::Netns {
                    netns: ns.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    // The disk, opened by us: QEMU probes read-only first, then opens read-write.
    let disk_fds: Option<(OwnedFd, OwnedFd)> = if probe {
        None
    } else {
        let open = |write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(&spec.disk)
                .map(OwnedFd::from)
                .map_err(|source| VmmError::Disk {
                    name: spec.name.clone(),
                    path: spec.disk.clone(),
                    source,
                })
        };
        Some((open(true)?, open(false)?))
    };
    let mode = match &disk_fds {
        Some((rw, ro)) => LaunchMode::Sandbox {
            disk_fds: (rw.as_raw_fd(), ro.as_raw_fd()),
        },
        None => LaunchMode::Probe,
    };
    let cgroup = match (&confinement.cgroups, probe) {
        (Some(cg), false) => Some(cg.create(&spec.name, confinement.limits(spec)).map_err(
            |source| VmmError::Cgroup {
                name: spec.name.clone(),
                source,
            },
        )?),
        _ => None,
    };
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(qemu_args(spec, accel, mode))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    let ns_fd = netns.as_ref().map(|fd| fd.as_raw_fd());
    let inherit: Vec<i32> = match mode {
        LaunchMode::Sandbox { disk_fds: (rw, ro) } => vec![rw, ro],
        LaunchMode::Probe => Vec::new(),
    };
    let procs_fds = cgroup.as_ref().map(|c| c.procs_fds()).unwrap_or_default();
    // SAFETY: the closure runs between fork and exec and only calls the
    // async-signal-safe syscalls write(2), setns(2), setsid(2) and fcntl(2) on
    // descriptors that stay open in the parent (owned by `netns`, `disk_fds` and
    // `cgroup`) until after spawn returns; it allocates nothing (the vectors were
    // built before the fork and are only read).
    unsafe {
        cmd.pre_exec(move || {
            // Into the VM's cgroups first: everything below already counts.
            for &fd in &procs_fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The disk descriptors survive exec (only in the child).
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(netns);
    drop(disk_fds);
    let mut child = match spawned {
        Ok(c) => c,
        Err(source) => {
            if let (Some(cg), Some(_)) = (&confinement.cgroups, &cgroup) {
                let _ = cg.remove(&spec.name).await;
            }
            return Err(VmmError::Spawn {
                binary: binary.display().to_string(),
                source,
            });
        }
    };
    drop(cgroup);
    let pid = child.id().unwrap_or(0);
    let (tx, rx) = watch::channel(false);
    let name = spec.name.clone();
    let cgroups = if probe {
        None
    } else {
        confinement.cgroups.clone()
    };
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => tracing::debug!(vm = %name, pid, %status, "VMM process exited"),
            Err(e) => warn!(vm = %name, pid, error = %e, "waiting for the VMM process failed"),
        }
        // The cgroup goes before the exit is announced: a VM of the same name
        // spawned once this one has exited (a restore after a save) makes its
        // own group, which a late removal would pull from under it (ENODEV
        // when entering it, or a SIGKILL of the new VM).
        if let Some(cg) = cgroups {
            if let Err(e) = cg.remove(&name).await {
                warn!(vm = %name, error = %crate::error_chain(&e), "could not remove the VM's cgroup");
            }
        }
        let _ = tx.send(true);
    });
    Ok(VmHandle::owned(
        spec.name.clone(),
        pid,
        spec.control_socket(),
        rx,
    ))
}

#[async_trait::async_trait]
impl Vmm for QemuVmm {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn accel(&self) -> ResolvedAccel {
        self.accel
    }

    async fn spawn(&self, spec: &VmSpec) -> Result<VmHandle, VmmError> {
        spawn_qemu(&self.binary, spec, self.accel, false, &self.confinement).await
    }

    async fn forget(&self, name: &str) -> Result<(), VmmError> {
        match &self.confinement.cgroups {
            Some(cg) => cg.remove(name).await.map_err(|source| VmmError::Cgroup {
                name: name.to_owned(),
                source,
            }),
            None => Ok(()),
        }
    }

    fn leftovers(&self) -> Vec<String> {
        self.confinement
            .cgroups
            .as_ref()
            .map(Cgroups::list)
            .unwrap_or_default()
    }

    async fn stop(&self, vm: &VmHandle) -> Result<(), VmmError> {
        let control = |source| VmmError::Control {
            name: vm.name.clone(),
            source,
        };
        let mut qmp = QmpClient::connect(&vm.control_socket, Duration::from_secs(1))
            .await
            .map_err(control)?;
        qmp.quit().await.map_err(control)
    }

    /// `qemu-<version>/microvm/<accel>/<cpu model>`; under KVM the CPU model is the
    /// host's (`-cpu host`), so its model name is part of the key. The TCG
    /// translation cache is not part of a saved state and is left out.
    fn snapshot_compat(&self) -> String {
        let version = self.version().unwrap_or("unknown");
        let cpu = match self.accel {
            ResolvedAccel::Tcg => "max".to_owned(),
            ResolvedAccel::Kvm => format!("host:{}", host_cpu_model()),
        };
        format!("qemu-{version}/microvm/{}/{cpu}", self.accel.as_str())
    }

    async fn pause(&self, vm: &VmHandle) -> Result<(), VmmError> {
        let mut qmp = lifecycle_qmp(vm, "pause").await?;
        checked(vm, "pause", qmp.stop().await).await
    }

    async fn resume(&self, vm: &VmHandle) -> Result<(), VmmError> {
        let mut qmp = lifecycle_qmp(vm, "resume").await?;
        checked(vm, "resume", qmp.cont().await).await?;
        let st = checked(vm, "resume", qmp.query_status().await).await?;
        if !st.running {
            return Err(lifecycle(
                vm,
                "resume",
                format!("the VM is {} after cont", st.status),
            ));
        }
        Ok(())
    }

    async fn save(
        &self,
        vm: &VmHandle,
        memory: &Memory,
        dest: std::fs::File,
    ) -> Result<SavedState, VmmError> {
        const OP: &str = "save";
        let compat = self.snapshot_compat();
        let mut qmp = lifecycle_qmp(vm, OP).await?;
        let st = checked(vm, OP, qmp.query_status().await).await?;
        if st.running {
            return Err(lifecycle(
                vm,
                OP,
                "the VM is running; pause it first".into(),
            ));
        }
        if st.status == "postmigrate" {
            // QEMU 7.2 inactivated the disks at the last save and only `cont`
            // takes them back; QEMU itself refuses ("Can't migrate the vm that
            // was paused due to previous migration", checked here).
            return Err(lifecycle(
                vm,
                OP,
                "the VM was already saved; resume or stop it first".into(),
            ));
        }
        let ignore_shared = matches!(memory, Memory::Shared(_));
        let moved = if ignore_shared {
            0
        } else {
            checked(vm, OP, qmp.base_memory().await).await?
        };
        let t0 = std::time::Instant::now();
        start_migration(&mut qmp, vm, OP, ignore_shared, &dest, false).await?;
        let t1 = std::time::Instant::now();
        let info = wait_migration(&mut qmp, vm, OP, migration_timeout(moved)).await?;
        tracing::debug!(
            vm = %vm.name,
            start_ms = (t1 - t0).as_secs_f64() * 1000.0,
            migrate_ms = t1.elapsed().as_secs_f64() * 1000.0,
            "saved"
        );
        let bytes = match dest.metadata() {
            Ok(m) if m.is_file() => m.len(),
            _ => info.ram_transferred,
        };
        Ok(SavedState {
            memory_included: !ignore_shared,
            bytes,
            compat,
        })
    }

    async fn restore(
        &self,
        vm: &VmHandle,
        saved: &SavedState,
        src: std::fs::File,
    ) -> Result<(), VmmError> {
        const OP: &str = "restore";
        let here = self.snapshot_compat();
        if saved.compat != here || self.version().is_none() {
            return Err(lifecycle(
                vm,
                OP,
                format!(
                    "the state was saved by {:?}, this host runs {here:?}",
                    saved.compat
                ),
            ));
        }
        let size = src.metadata().map(|m| m.len()).unwrap_or(saved.bytes);
        let mut qmp = lifecycle_qmp(vm, OP).await?;
        start_migration(&mut qmp, vm, OP, !saved.memory_included, &src, true).await?;
        wait_migration(&mut qmp, vm, OP, migration_timeout(size)).await?;
        Ok(())
    }
}

/// The host CPU's model name (`/proc/cpuinfo`), for the KVM compatibility key.
fn host_cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().replace('/', "_"))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn lifecycle(vm: &VmHandle, operation: &'static str, reason: String) -> VmmError {
    VmmError::Lifecycle {
        operation,
        name: vm.name.clone(),
        reason,
    }
}

/// The end of QEMU's stderr (`qemu.log` next to the control socket), escaped.
fn qemu_log_tail(vm: &VmHandle) -> String {
    let Some(dir) = vm.control_socket.parent() else {
        return String::new();
    };
    let log = super::console::tail_bytes(&dir.join("qemu.log"), 400);
    super::escape_guest_text(log.trim_ascii())
}

/// `result` of a QMP command during `operation`, its error explained.
async fn checked<T>(
    vm: &VmHandle,
    operation: &'static str,
    result: Result<T, QmpError>,
) -> Result<T, VmmError> {
    match result {
        Ok(v) => Ok(v),
        Err(e) => Err(qmp_failed(vm, operation, e).await),
    }
}

/// A QMP failure during `operation`: a VMM that died says so, with its last
/// words. A closed socket usually means QEMU is exiting (a failed incoming load
/// ends QEMU 7.2), so that case waits a moment for the exit to be seen.
async fn qmp_failed(vm: &VmHandle, operation: &'static str, e: QmpError) -> VmmError {
    if matches!(e, QmpError::Closed | QmpError::Io(_)) {
        vm.wait_exit(EXIT_GRACE).await;
    }
    if !vm.is_alive() {
        let why = qemu_log_tail(vm);
        return lifecycle(
            vm,
            operation,
            if why.is_empty() {
                format!("the VM process exited ({e})")
            } else {
                format!("the VM process exited; the end of its stderr: {why}")
            },
        );
    }
    VmmError::Control {
        name: vm.name.clone(),
        source: e,
    }
}

async fn lifecycle_qmp(vm: &VmHandle, operation: &'static str) -> Result<QmpClient, VmmError> {
    if !vm.is_alive() {
        return Err(lifecycle(vm, operation, "the VM process is gone".into()));
    }
    // A VMM spawned a moment ago (a restore right after spawn) serves its QMP
    // socket ~200 ms later under TCG: retry a refused or missing socket while
    // the process lives, within the same bound.
    let deadline = tokio::time::Instant::now() + LIFECYCLE_QMP_TIMEOUT;
    loop {
        match QmpClient::connect(&vm.control_socket, LIFECYCLE_QMP_TIMEOUT).await {
            Ok(qmp) => return Ok(qmp),
            Err(QmpError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && vm.is_alive()
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(qmp_failed(vm, operation, e).await),
        }
    }
}

/// Set `x-ignore-shared`, hand QEMU `stream` and start the migration (outgoing,
/// or incoming into a VM started with `-incoming defer`).
async fn start_migration(
    qmp: &mut QmpClient,
    vm: &VmHandle,
    operation: &'static str,
    ignore_shared: bool,
    stream: &std::fs::File,
    incoming: bool,
) -> Result<(), VmmError> {
    let caps = qmp
        .set_migration_capability("x-ignore-shared", ignore_shared)
        .await;
    checked(vm, operation, caps).await?;
    let given = qmp.getfd(MIGRATION_FD, stream.as_fd()).await;
    checked(vm, operation, given).await?;
    let uri = format!("fd:{MIGRATION_FD}");
    let started = if incoming {
        qmp.migrate_incoming(&uri).await
    } else {
        qmp.migrate(&uri).await
    };
    if let Err(e) = started {
        // QEMU takes the descriptor only once the migration starts.
        let _ = qmp.closefd(MIGRATION_FD).await;
        return Err(qmp_failed(vm, operation, e).await);
    }
    Ok(())
}

/// Poll `query-migrate` until `completed` (Ok) or `failed`/`cancelled` (QEMU's
/// reason), at most `limit`; a VM that dies meanwhile is an error, never a hang.
async fn wait_migration(
    qmp: &mut QmpClient,
    vm: &VmHandle,
    operation: &'static str,
    limit: Duration,
) -> Result<MigrationInfo, VmmError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        let info = checked(vm, operation, qmp.query_migrate().await).await?;
        match info.status.as_str() {
            "completed" => return Ok(info),
            "failed" | "cancelled" => {
                return Err(lifecycle(
                    vm,
                    operation,
                    format!(
                        "migration {}: {}",
                        info.status,
                        info.error.as_deref().unwrap_or("no reason given")
                    ),
                ))
            }
            _ => {}
        }
        if tokio::time::Instant::now() + pause > deadline {
            // An outgoing migration can be cancelled (the VM stays frozen); an
            // incoming one cannot, the caller kills that VM.
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(lifecycle(
                vm,
                operation,
                format!("migration still {} after {limit:?}", info.status),
            ));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// Pick the accelerator: explicit choices are taken as they are; `Auto` boots the
/// real guest kernel under KVM with `hearth.probe=1` and falls back to TCG unless
/// the guest reports [`PROBE_MARKER`] within [`PROBE_TIMEOUT`]. Never hangs.
/// Returns the choice and the reason, for logs and `Info`.
pub async fn resolve_accel(
    requested: Accel,
    binary: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    probe_rootfs: Option<&Path>,
    scratch_dir: &Path,
) -> (ResolvedAccel, String) {
    let (accel, reason) = match requested {
        Accel::Kvm => (
            ResolvedAccel::Kvm,
            "kvm requested by configuration".to_owned(),
        ),
        Accel::Tcg => (
            ResolvedAccel::Tcg,
            "tcg requested by configuration".to_owned(),
        ),
        Accel::Auto => {
            if !Path::new("/dev/kvm").exists() {
                (ResolvedAccel::Tcg, "/dev/kvm is absent".to_owned())
            } else if !kernel.exists() {
                (
                    ResolvedAccel::Tcg,
                    format!("no guest kernel at {} to probe KVM with", kernel.display()),
                )
            } else if let Some(rootfs) = probe_rootfs {
                match probe_kvm(binary, kernel, initrd, rootfs, scratch_dir).await {
                    Ok(ms) => (
                        ResolvedAccel::Kvm,
                        format!("KVM boot probe succeeded in {ms} ms"),
                    ),
                    Err(why) => (ResolvedAccel::Tcg, format!("KVM boot probe failed: {why}")),
                }
            } else {
                (
                    ResolvedAccel::Tcg,
                    "no template root disk to probe KVM with".to_owned(),
                )
            }
        }
    };
    info!(accel = accel.as_str(), %reason, "accelerator chosen");
    (accel, reason)
}

async fn probe_kvm(
    binary: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    rootfs: &Path,
    scratch_dir: &Path,
) -> Result<u128, String> {
    let dir = scratch_dir.join(format!("kvm-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = VmSpec {
        name: "hearth-kvm-probe".into(),
        vcpus: 1,
        memory_mb: 256,
        kernel: kernel.to_owned(),
        initrd: initrd.map(Path::to_owned),
        cmdline: super::probe_cmdline(),
        disk: rootfs.to_owned(),
        disk_format: DiskFormat::Raw,
        nic: None,
        netns: None,
        run_dir: dir.clone(),
        runas: None,
        memory: crate::vmm::Memory::Anonymous,
        incoming: false,
    };
    let started = std::time::Instant::now();
    let result = async {
        let vm = spawn_qemu(
            binary,
            &spec,
            ResolvedAccel::Kvm,
            true,
            &Confinement::none(),
        )
        .await
        .map_err(|e| format!("could not start QEMU: {e}"))?;
        let deadline = started + PROBE_TIMEOUT;
        let outcome = loop {
            if super::console::tail_contains(&spec.run_dir, PROBE_MARKER, 64 * 1024) {
                break Ok(started.elapsed().as_millis());
            }
            if !vm.is_alive() {
                let log = super::console::tail_bytes(&spec.run_dir.join("qemu.log"), 300);
                break Err(format!(
                    "QEMU exited without {PROBE_MARKER}: {}",
                    super::escape_guest_text(log.trim_ascii())
                ));
            }
            if std::time::Instant::now() >= deadline {
                break Err(format!(
                    "no {PROBE_MARKER} on the console within {PROBE_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        signal_pid(vm.pid, libc::SIGKILL);
        vm.wait_exit(Duration::from_secs(5)).await;
        outcome
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The last `max` bytes of `s` (on a char boundary), trimmed.
pub fn tail(s: &str, max: usize) -> String {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "sb-abcdefghijklmnop".into(),
            vcpus: 2,
            memory_mb: 256,
            kernel: "/img/kernel/vmlinux".into(),
            initrd: Some("/img/kernel/initrd.cpio".into()),
            cmdline: super::super::guest_cmdline(Some("sb-abcdefghijklmnop")),
            disk: "/run/sb/disk.qcow2".into(),
            disk_format: DiskFormat::Qcow2,
            nic: Some(Nic::Tap("tap0".into())),
            netns: Some("hearth-sb-abcdefghijklmnop".into()),
            run_dir: "/run/sb".into(),
            runas: Some(2_000_007),
            memory: crate::vmm::Memory::Anonymous,
            incoming: false,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> &'a str {
        let i = args.iter().position(|a| a == flag).expect(flag);
        &args[i + 1]
    }

    #[test]
    fn tcg_command_line() {
        let a = qemu_args(
            &spec(),
            ResolvedAccel::Tcg,
            LaunchMode::Sandbox { disk_fds: (7, 8) },
        );
        assert_eq!(after(&a, "-M"), "microvm");
        assert_eq!(after(&a, "-accel"), "tcg,tb-size=64");
        assert_eq!(after(&a, "-cpu"), "max");
        assert_eq!(after(&a, "-m"), "256");
        assert_eq!(after(&a, "-smp"), "2");
        assert_eq!(after(&a, "-name"), "sb-abcdefghijklmnop");
        assert_eq!(after(&a, "-serial"), "chardev:con");
        assert_eq!(
            after(&a, "-chardev"),
            "socket,id=con,path=/run/sb/console.sock,server=on,wait=off"
        );
        assert_eq!(
            after(&a, "-drive"),
            "id=root,file=/dev/fdset/1,format=qcow2,if=none,file.locking=off"
        );
        let fds: Vec<&String> = a
            .iter()
            .zip(a.iter().skip(1))
            .filter(|(f, _)| *f == "-add-fd")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(fds, ["fd=7,set=1", "fd=8,set=1"]);
        assert_eq!(after(&a, "-runas"), "2000007:2000007");
        assert_eq!(
            after(&a, "-sandbox"),
            "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
        );
        assert!(!a.iter().any(|x| x.contains("elevateprivileges")));
        assert_eq!(after(&a, "-pidfile"), "/run/sb/qemu.pid");
        assert_eq!(
            after(&a, "-netdev"),
            "tap,id=n0,ifname=tap0,script=no,downscript=no"
        );
        assert_eq!(
            after(&a, "-qmp"),
            "unix:/run/sb/qmp.sock,server=on,wait=off"
        );
        assert!(after(&a, "-append").contains("tsc_early_khz=2000000 tsc=reliable"));
        for f in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(a.iter().any(|x| x == f), "{f}");
        }
    }

    #[test]
    fn kvm_probe_command_line() {
        let mut s = spec();
        s.nic = None;
        s.runas = None;
        let a = qemu_args(&s, ResolvedAccel::Kvm, LaunchMode::Probe);
        assert_eq!(after(&a, "-accel"), "kvm");
        assert_eq!(after(&a, "-cpu"), "host");
        assert_eq!(
            after(&a, "-drive"),
            "id=root,file=/run/sb/disk.qcow2,format=qcow2,if=none,snapshot=on"
        );
        assert_eq!(after(&a, "-serial"), "file:/run/sb/console.log");
        assert!(a.iter().any(|x| x == "-no-reboot"));
        for f in ["-netdev", "-runas", "-add-fd"] {
            assert!(!a.iter().any(|x| x == f), "{f}");
        }
    }

    #[test]
    fn isolated_nic_and_cgroup_limits() {
        let mut s = spec();
        s.nic = Some(Nic::Isolated);
        let a = qemu_args(
            &s,
            ResolvedAccel::Tcg,
            LaunchMode::Sandbox { disk_fds: (3, 4) },
        );
        assert_eq!(after(&a, "-netdev"), "hubport,id=n0,hubid=0");
        let l = Confinement::none().limits(&s);
        assert_eq!(
            l.memory_bytes,
            (256 + u64::from(DEFAULT_MEMORY_OVERHEAD_MB)) << 20
        );
        assert_eq!(l.cpu_quota_us, 200_000);
        assert_eq!(l.pids_max, DEFAULT_PIDS_MAX);
    }

    #[test]
    fn file_backed_memory_and_incoming_command_line() {
        let mut s = spec();
        let a = qemu_args(
            &s,
            ResolvedAccel::Tcg,
            LaunchMode::Sandbox { disk_fds: (7, 8) },
        );
        for f in ["-object", "-incoming", "-S"] {
            assert!(
                !a.iter().any(|x| x == f),
                "{f} without file memory/incoming"
            );
        }
        s.memory = Memory::Shared("/run/sb,x/memory".into());
        s.incoming = true;
        let a = qemu_args(
            &s,
            ResolvedAccel::Tcg,
            LaunchMode::Sandbox { disk_fds: (7, 8) },
        );
        assert_eq!(after(&a, "-M"), "microvm,memory-backend=mem");
        // A comma in the path is doubled, so it cannot add an option.
        assert_eq!(
            after(&a, "-object"),
            "memory-backend-file,id=mem,size=256M,mem-path=/run/sb,,x/memory,share=on"
        );
        assert_eq!(after(&a, "-m"), "256");
        assert_eq!(after(&a, "-incoming"), "defer");
        assert!(a.iter().any(|x| x == "-S"));
        s.memory = Memory::Private("/tpl/memory".into());
        s.incoming = false;
        let a = qemu_args(
            &s,
            ResolvedAccel::Tcg,
            LaunchMode::Sandbox { disk_fds: (7, 8) },
        );
        assert_eq!(
            after(&a, "-object"),
            "memory-backend-file,id=mem,size=256M,mem-path=/tpl/memory,share=off"
        );
        assert!(!a.iter().any(|x| x == "-incoming" || x == "-S"));
    }

    #[test]
    fn memory_files_are_made_sparse_and_never_truncated() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.memory_mb = 64;
        let shared = dir.path().join("memory");
        s.memory = Memory::Shared(shared.clone());
        prepare_memory(&s).unwrap();
        let m = std::fs::metadata(&shared).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            m.blocks()
        );
        // An existing file of the right length is kept as it is (a paused VM's memory).
        std::fs::write(&shared, b"x").unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shared)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        prepare_memory(&s).unwrap();
        assert_eq!(&std::fs::read(&shared).unwrap()[..1], b"x");
        // Another length is refused, and the file stays as it was.
        s.memory_mb = 128;
        let err = prepare_memory(&s).unwrap_err();
        assert!(matches!(err, VmmError::Memory { .. }), "{err}");
        assert!(format!("{:?}", err).contains("67108864 bytes"), "{err:?}");
        assert_eq!(std::fs::metadata(&shared).unwrap().len(), 64 << 20);
        // A private base must exist with the right length; a symlink or directory is refused.
        s.memory = Memory::Private(dir.path().join("absent"));
        assert!(prepare_memory(&s).is_err());
        assert!(!dir.path().join("absent").exists());
        s.memory_mb = 64;
        s.memory = Memory::Private(shared.clone());
        prepare_memory(&s).unwrap();
        std::os::unix::fs::symlink(&shared, dir.path().join("link")).unwrap();
        s.memory = Memory::Shared(dir.path().join("link"));
        assert!(prepare_memory(&s).is_err());
        s.memory = Memory::Shared(dir.path().to_owned());
        assert!(prepare_memory(&s).is_err());
    }

    #[test]
    fn qemu_version_and_migration_timeouts() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            )
            .as_deref(),
            Some("7.2.22")
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2\n").as_deref(),
            Some("10.0.2")
        );
        assert_eq!(parse_qemu_version("garbage"), None);
        assert_eq!(parse_qemu_version("version x/../y"), None);
        assert_eq!(migration_timeout(0), MIGRATION_BASE_TIMEOUT);
        assert_eq!(
            migration_timeout(1 << 30),
            MIGRATION_BASE_TIMEOUT + MIGRATION_TIMEOUT_PER_GIB
        );
        assert!(migration_timeout(u64::MAX) > migration_timeout(4 << 30));
    }

    #[test]
    fn snapshot_compat_names_version_machine_accel_and_cpu() {
        let vmm = QemuVmm::new(
            "/nonexistent/qemu".into(),
            ResolvedAccel::Tcg,
            Confinement::none(),
        );
        assert_eq!(vmm.snapshot_compat(), "qemu-unknown/microvm/tcg/max");
        let kvm = QemuVmm::new(
            "/nonexistent/qemu".into(),
            ResolvedAccel::Kvm,
            Confinement::none(),
        );
        assert!(kvm
            .snapshot_compat()
            .starts_with("qemu-unknown/microvm/kvm/host:"));
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("héllo", 4), "llo");
    }
}

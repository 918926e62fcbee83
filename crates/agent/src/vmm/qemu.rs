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

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::cgroup::{Cgroups, Limits, CPU_PERIOD_US};
use super::qmp::QmpClient;
use super::{signal_pid, Accel, DiskFormat, Nic, ResolvedAccel, VmHandle, VmSpec, Vmm, VmmError};

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
}

impl QemuVmm {
    pub fn new(binary: PathBuf, accel: ResolvedAccel, confinement: Confinement) -> Self {
        Self {
            binary,
            accel,
            confinement,
        }
    }
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
            "id=root,file=/dev/fdset/1,format={},if=none",
            spec.disk_format.as_str()
        ),
        LaunchMode::Probe => format!(
            "id=root,file={},format={},if=none,snapshot=on",
            spec.disk.display(),
            spec.disk_format.as_str()
        ),
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        spec.name.clone(),
        "-M".into(),
        "microvm".into(),
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
        let _ = tx.send(true);
        if let Some(cg) = cgroups {
            if let Err(e) = cg.remove(&name).await {
                warn!(vm = %name, error = %crate::error_chain(&e), "could not remove the VM's cgroup");
            }
        }
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
            "id=root,file=/dev/fdset/1,format=qcow2,if=none"
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
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("héllo", 4), "llo");
    }
}

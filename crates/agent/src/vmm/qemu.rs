//! QEMU `microvm` driver.
//!
//! Owns the QEMU command line, the process start (inside the sandbox's network
//! namespace, in its own session so that the agent's death does not take VMs with
//! it), the QMP-driven stop, and the KVM boot probe behind [`Accel::Auto`]. It does
//! not create disks, taps or run directories.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::qmp::QmpClient;
use super::{signal_pid, Accel, DiskFormat, ResolvedAccel, VmHandle, VmSpec, Vmm, VmmError};

/// How long the KVM probe may take before we call KVM unusable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(4);
/// What the guest prints when booted with `hearth.probe=1`.
pub const PROBE_MARKER: &str = "HEARTH_PROBE_OK";

/// The QEMU driver.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    binary: PathBuf,
    accel: ResolvedAccel,
}

impl QemuVmm {
    pub fn new(binary: PathBuf, accel: ResolvedAccel) -> Self {
        Self { binary, accel }
    }
}

/// The full QEMU argument list for `spec`. `snapshot` opens the disk with
/// `snapshot=on` (writes go to a throwaway overlay; used by the probe).
pub fn qemu_args(spec: &VmSpec, accel: ResolvedAccel, snapshot: bool) -> Vec<String> {
    let run = &spec.run_dir;
    let (accel_arg, cpu) = match accel {
        ResolvedAccel::Kvm => ("kvm", "host"),
        ResolvedAccel::Tcg => ("tcg", "max"),
    };
    let mut drive = format!(
        "id=root,file={},format={},if=none",
        spec.disk.display(),
        spec.disk_format.as_str()
    );
    if snapshot {
        drive.push_str(",snapshot=on");
    }
    let mut args: Vec<String> = vec![
        "-name".into(),
        spec.name.clone(),
        "-M".into(),
        "microvm".into(),
        "-accel".into(),
        accel_arg.into(),
        "-cpu".into(),
        cpu.into(),
        "-m".into(),
        spec.memory_mb.to_string(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-serial".into(),
        format!("file:{}", spec.console_log().display()),
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-append".into(),
        spec.cmdline.clone(),
        "-drive".into(),
        drive,
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
    ];
    if let Some(initrd) = &spec.initrd {
        args.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    if let Some(tap) = &spec.tap {
        args.extend([
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
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
        run.join("qemu.pid").display().to_string(),
    ]);
    args
}

/// Start QEMU for `spec`; the returned handle's `exited` flag flips when it is reaped.
async fn spawn_qemu(
    binary: &Path,
    spec: &VmSpec,
    accel: ResolvedAccel,
    snapshot: bool,
) -> Result<VmHandle, VmmError> {
    std::fs::create_dir_all(&spec.run_dir).map_err(|source| VmmError::RunDir {
        path: spec.run_dir.clone(),
        source,
    })?;
    let stderr_path = spec.run_dir.join("qemu.log");
    let stderr = std::fs::File::create(&stderr_path).map_err(|source| VmmError::RunDir {
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
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(qemu_args(spec, accel, snapshot))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    let ns_fd = netns.as_ref().map(|fd| fd.as_raw_fd());
    // SAFETY: the closure runs between fork and exec and only calls the
    // async-signal-safe syscalls setns(2) and setsid(2); `ns_fd` stays open in the
    // parent (owned by `netns`) until after spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
        binary: binary.display().to_string(),
        source,
    })?;
    drop(netns);
    let pid = child.id().unwrap_or(0);
    let (tx, rx) = watch::channel(false);
    let name = spec.name.clone();
    tokio::spawn(async move {
        match child.wait().await {
            Ok(status) => tracing::debug!(vm = %name, pid, %status, "VMM process exited"),
            Err(e) => warn!(vm = %name, pid, error = %e, "waiting for the VMM process failed"),
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
        spawn_qemu(&self.binary, spec, self.accel, false).await
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
        tap: None,
        netns: None,
        run_dir: dir.clone(),
    };
    let started = std::time::Instant::now();
    let result = async {
        let vm = spawn_qemu(binary, &spec, ResolvedAccel::Kvm, true)
            .await
            .map_err(|e| format!("could not start QEMU: {e}"))?;
        let deadline = started + PROBE_TIMEOUT;
        let outcome = loop {
            let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
            if console.contains(PROBE_MARKER) {
                break Ok(started.elapsed().as_millis());
            }
            if !vm.is_alive() {
                let log =
                    std::fs::read_to_string(spec.run_dir.join("qemu.log")).unwrap_or_default();
                break Err(format!(
                    "QEMU exited without {PROBE_MARKER}: {}",
                    tail(&log, 300)
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
            tap: Some("tap0".into()),
            netns: Some("hearth-sb-abcdefghijklmnop".into()),
            run_dir: "/run/sb".into(),
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> &'a str {
        let i = args.iter().position(|a| a == flag).expect(flag);
        &args[i + 1]
    }

    #[test]
    fn tcg_command_line() {
        let a = qemu_args(&spec(), ResolvedAccel::Tcg, false);
        assert_eq!(after(&a, "-M"), "microvm");
        assert_eq!(after(&a, "-accel"), "tcg");
        assert_eq!(after(&a, "-cpu"), "max");
        assert_eq!(after(&a, "-m"), "256");
        assert_eq!(after(&a, "-smp"), "2");
        assert_eq!(after(&a, "-name"), "sb-abcdefghijklmnop");
        assert_eq!(after(&a, "-serial"), "file:/run/sb/console.log");
        assert_eq!(
            after(&a, "-drive"),
            "id=root,file=/run/sb/disk.qcow2,format=qcow2,if=none"
        );
        assert_eq!(
            after(&a, "-netdev"),
            "tap,id=n0,ifname=tap0,script=no,downscript=no"
        );
        assert_eq!(
            after(&a, "-qmp"),
            "unix:/run/sb/qmp.sock,server=on,wait=off"
        );
        assert!(after(&a, "-append").contains("tsc_early_khz=2000000 tsc=reliable"));
        for f in ["-nodefaults", "-no-user-config", "-nographic"] {
            assert!(a.iter().any(|x| x == f), "{f}");
        }
    }

    #[test]
    fn kvm_probe_command_line() {
        let mut s = spec();
        s.tap = None;
        let a = qemu_args(&s, ResolvedAccel::Kvm, true);
        assert_eq!(after(&a, "-accel"), "kvm");
        assert_eq!(after(&a, "-cpu"), "host");
        assert!(after(&a, "-drive").ends_with(",snapshot=on"));
        assert!(!a.iter().any(|x| x == "-netdev"));
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("héllo", 4), "llo");
    }
}

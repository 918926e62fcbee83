//! PID 1 duties: mount the pseudo filesystems, load the virtio modules, set the
//! hostname, and power the VM off cleanly. Only used when the agent runs as PID 1.
//!
//! Zombie reaping lives in [`crate::reaper`]; network setup in [`crate::net`].

use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Directory holding the guest kernel modules and their `load-order` file.
pub const MODULES_DIR: &str = "/lib/modules/hearth";

/// PID 1 setup failures that stop the boot.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot mount {target}")]
    Mount {
        target: &'static str,
        #[source]
        source: nix::Error,
    },
}

/// Prints a line on the console (PID 1's stdout is /dev/console).
pub fn console(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn mount_one(
    source: &str,
    target: &'static str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    let _ = std::fs::create_dir_all(target);
    match mount(Some(source), target, Some(fstype), flags, data) {
        // Already mounted (the kernel mounts devtmpfs itself with DEVTMPFS_MOUNT).
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount { target, source }),
    }
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp and /run.
pub fn mount_filesystems() -> Result<(), InitError> {
    let nosuid_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_one("proc", "/proc", "proc", nosuid_noexec, None)?;
    mount_one("sysfs", "/sys", "sysfs", nosuid_noexec, None)?;
    mount_one(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_one(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("ptmxmode=0666,mode=0620"),
    )?;
    mount_one(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_one(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_one(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    Ok(())
}

/// Loads the modules listed in `load-order`; already loaded or built-in ones are fine.
/// Returns how many were loaded.
pub fn load_modules(dir: &Path) -> usize {
    let Ok(order) = std::fs::read_to_string(dir.join("load-order")) else {
        return 0;
    };
    let params = CString::default();
    let mut loaded = 0;
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(module = name, error = %e, "cannot open module");
                continue;
            }
        };
        // SAFETY: finit_module reads the fd and a NUL-terminated string valid for the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc == 0 {
            loaded += 1;
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                tracing::warn!(module = name, error = %e, "cannot load module");
            }
        }
    }
    loaded
}

/// Sets the hostname and keeps /etc/hostname in step.
pub fn set_hostname(name: &str) {
    if let Err(e) = nix::unistd::sethostname(name) {
        tracing::warn!(error = %e, "cannot set hostname");
    }
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
}

/// Stops everything and powers the VM off. Never returns.
pub fn power_off() -> ! {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    // Give processes a moment to exit on SIGTERM before the SIGKILL.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    for target in ["/run", "/tmp", "/dev/shm", "/dev/pts"] {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    }
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Never ask for a restart (a VM started without -no-reboot would come back as a fresh
    // agent): if powering off failed, halt.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_HALT_SYSTEM);
    loop {
        std::thread::park();
    }
}

/// Root disk parameters of the kernel command line (`root=`, `rootfstype=`, `ro`, `init=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootParams {
    pub device: String,
    pub fstype: String,
    pub read_only: bool,
    pub init: String,
}

/// Parses the root disk parameters, with hearth's defaults.
pub fn root_params(cmdline: &str) -> RootParams {
    let mut p = RootParams {
        device: "/dev/vda".into(),
        fstype: "ext4".into(),
        read_only: false,
        init: "/usr/bin/hearth-guest".into(),
    };
    for word in cmdline.split_whitespace() {
        match word.split_once('=') {
            Some(("root", v)) => p.device = v.to_owned(),
            Some(("rootfstype", v)) => p.fstype = v.to_owned(),
            Some(("init", v)) => p.init = v.to_owned(),
            None if word == "ro" => p.read_only = true,
            None if word == "rw" => p.read_only = false,
            _ => {}
        }
    }
    p
}

/// Stage 1, run as `/init` from the initramfs: the Debian kernel has virtio-blk as a
/// module, so the root disk only appears after the modules are loaded. Loads them, mounts
/// the root disk, switches root and execs the real init (this binary again, as PID 1).
/// `hearth.probe=1` answers here already. Never returns.
pub fn stage1() -> ! {
    if let Err(e) = stage1_inner() {
        console(&format!("hearth-guest stage1: {e}"));
    }
    power_off();
}

/// Errors of stage 1.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    #[error(transparent)]
    Mount(#[from] InitError),
    #[error("root device {device} did not appear")]
    NoRootDevice { device: String },
    #[error("cannot {step}: {source}")]
    Step {
        step: &'static str,
        source: nix::Error,
    },
}

fn stage1_inner() -> Result<(), Stage1Error> {
    use std::time::{Duration, Instant};
    let step = |step: &'static str| move |source: nix::Error| Stage1Error::Step { step, source };
    mount_one("proc", "/proc", "proc", MsFlags::empty(), None)?;
    mount_one(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if crate::cmdline::parse(&cmdline).probe {
        console(crate::PROBE_MARKER);
        power_off();
    }
    load_modules(Path::new(MODULES_DIR));
    let root = root_params(&cmdline);
    let started = Instant::now();
    while !Path::new(&root.device).exists() {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(Stage1Error::NoRootDevice {
                device: root.device,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::fs::create_dir_all("/newroot");
    let flags = if root.read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    mount(
        Some(root.device.as_str()),
        "/newroot",
        Some(root.fstype.as_str()),
        flags,
        None::<&str>,
    )
    .map_err(step("mount the root disk"))?;
    let _ = std::fs::create_dir_all("/newroot/dev");
    mount(
        Some("/dev"),
        "/newroot/dev",
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(step("move /dev"))?;
    let _ = umount2("/proc", MntFlags::MNT_DETACH);
    // Free the initramfs copies; the rootfs itself cannot be unmounted.
    let _ = std::fs::remove_dir_all("/lib");
    let _ = std::fs::remove_file("/init");
    nix::unistd::chdir("/newroot").map_err(step("chdir /newroot"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(step("move the root"))?;
    nix::unistd::chroot(".").map_err(step("chroot"))?;
    nix::unistd::chdir("/").map_err(step("chdir /"))?;
    let init = CString::new(root.init.clone()).map_err(|_| Stage1Error::Step {
        step: "use init=",
        source: nix::Error::EINVAL,
    })?;
    let err = nix::unistd::execv(&init, &[&init]).err();
    Err(Stage1Error::Step {
        step: "exec the real init",
        source: err.unwrap_or(nix::Error::EINVAL),
    })
}

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
    // With `reboot=t` a restart request ends a VM started with -no-reboot too.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::park();
    }
}

//! The VMM boundary: how the agent starts, stops and watches one VM process.
//!
//! Owns the [`Vmm`] trait, the [`VmSpec`] a driver boots from and the [`VmHandle`]
//! that identifies a running VM. Drivers own the process and its control socket;
//! they do not own disks, networks or the run directory (the sandbox actor does).
//! `qemu` (microvm machine type, QMP control) is the only driver today; Firecracker
//! comes later behind the same trait. Drivers confine their VMM process (own uid,
//! seccomp, one cgroup per VM: [`cgroup`]) and expose the serial console as a
//! socket that [`console`] turns into a capped log. Guest text is hostile: pass it
//! through [`escape_guest_text`] before it goes into a log line or an error.

pub mod cgroup;
pub mod console;
pub mod qemu;
pub mod qmp;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Which accelerator QEMU should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Probe KVM with a real boot; fall back to TCG when the probe fails.
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator {other:?} (auto, kvm, tcg)")),
        }
    }
}

/// The accelerator actually in use (never `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl ResolvedAccel {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        }
    }
}

/// On-disk format of a root disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Everything a driver needs to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Identifies the VM; drivers put it on the process command line so that
    /// recovery can tell our process from a reused PID.
    pub name: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    /// Initramfs (stage 1 loads the virtio modules, then mounts the root disk).
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disk: PathBuf,
    pub disk_format: DiskFormat,
    /// The guest's network card; `None` boots without one (probe).
    pub nic: Option<Nic>,
    /// Network namespace (name under /run/netns) to start the VMM in.
    pub netns: Option<String>,
    /// Directory for the console, control socket and pid file.
    pub run_dir: PathBuf,
    /// Unprivileged uid (and gid) the VMM drops to once set up; `None` keeps the
    /// agent's (only for the KVM probe and tests without root).
    pub runas: Option<u32>,
    /// Where guest memory lives (see [`Memory`]).
    pub memory: Memory,
    /// Start frozen, waiting for [`Vmm::restore`] instead of booting the kernel.
    pub incoming: bool,
}

/// Where a VM's guest memory lives. Guest memory is always a file, so that a
/// pause writes only what the file does not already hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Memory {
    /// Anonymous memory (the KVM probe and raw benchmarks only).
    Anonymous,
    /// The VM's own file (`memory_mb` long, sparse), mapped shared: the file *is*
    /// the memory, so [`Vmm::save`] writes device state only.
    Shared(PathBuf),
    /// A read-only base (a warm template or a fork point) mapped private,
    /// copy-on-write: VMs from one base share its unchanged pages through the
    /// page cache, and the base never changes. [`Vmm::save`] writes the memory
    /// into the saved state.
    Private(PathBuf),
}

/// What [`Vmm::save`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Whether guest memory is inside the state (it was not in a shared file);
    /// otherwise the memory is the VM's [`Memory::Shared`] file as of the save.
    pub memory_included: bool,
    /// Bytes of state written.
    pub bytes: u64,
    /// The driver's compatibility key ([`Vmm::snapshot_compat`]) at save time:
    /// a state only restores into a VMM with the same key.
    pub compat: String,
}

/// Where the guest's network card is plugged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Nic {
    /// A tap device inside the VM's network namespace.
    Tap(String),
    /// A hub with no other port: the guest sees a NIC, no packet leaves the VMM
    /// (raw boot benchmarks).
    Isolated,
}

impl VmSpec {
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join(console::CONSOLE_LOG)
    }
    pub fn console_socket(&self) -> PathBuf {
        self.run_dir.join(console::CONSOLE_SOCKET)
    }
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join(PID_FILE)
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
}

/// Errors of the VMM boundary.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("failed to start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to open network namespace {netns}")]
    Netns {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to prepare the run directory {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket of VM {name}")]
    Control {
        name: String,
        #[source]
        source: qmp::QmpError,
    },
    #[error("VM {name} (pid {pid}) did not exit after SIGKILL")]
    Unkillable { name: String, pid: u32 },
    #[error("cgroup of VM {name}")]
    Cgroup {
        name: String,
        #[source]
        source: cgroup::CgroupError,
    },
    #[error("{operation} of VM {name} is not supported by the {driver} driver")]
    Unsupported {
        operation: &'static str,
        name: String,
        driver: &'static str,
    },
    #[error("{operation} of VM {name} failed: {reason}")]
    Lifecycle {
        operation: &'static str,
        name: String,
        reason: String,
    },
    #[error("guest memory file {path} of VM {name}")]
    Memory {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path} for VM {name}")]
    Disk {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How VMs are confined and bounded on this host (part of the agent's config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHostConfig {
    /// The VMM of the sandbox in network slot `n` runs as uid and gid
    /// `uid_base + n` (slots are host-wide, so no two VMs share a uid). Pick a
    /// range no real user or container has. `None`: the VMM keeps the agent's uid.
    pub uid_base: Option<u32>,
    /// cgroup mount point (`/sys/fs/cgroup`; v2 unified or v1 per controller).
    pub cgroup_mount: PathBuf,
    /// Parent of the per-VM cgroups inside each hierarchy; the agent adds its host
    /// ID below it. `None` disables cgroups.
    pub cgroup_parent: Option<String>,
    /// Memory a VM's cgroup allows on top of guest memory (MiB).
    pub memory_overhead_mb: u32,
    /// Tasks (threads) a VM's cgroup allows.
    pub pids_max: u32,
    /// Cap of `console.log` and of its one rotation `console.log.1` (bytes).
    pub console_cap_bytes: u64,
}

/// Default `uid_base`: far above login users (< 60000) and the usual subuid
/// ranges of containers (100000 + 65536 per user).
pub const DEFAULT_UID_BASE: u32 = 2_000_000;

impl Default for VmHostConfig {
    fn default() -> Self {
        Self {
            uid_base: Some(DEFAULT_UID_BASE),
            cgroup_mount: "/sys/fs/cgroup".into(),
            cgroup_parent: Some("hearth".into()),
            memory_overhead_mb: qemu::DEFAULT_MEMORY_OVERHEAD_MB,
            pids_max: qemu::DEFAULT_PIDS_MAX,
            console_cap_bytes: console::DEFAULT_CONSOLE_CAP,
        }
    }
}

impl VmHostConfig {
    /// The QEMU confinement for the agent with `host_id`: per-VM cgroups under
    /// `<cgroup_parent>/<host_id>`, so agents sharing a host never touch each
    /// other's groups.
    pub fn confinement(&self, host_id: &str) -> Result<qemu::Confinement, cgroup::CgroupError> {
        let cgroups = match &self.cgroup_parent {
            Some(parent) => Some(cgroup::Cgroups::new(
                cgroup::Layout::detect(&self.cgroup_mount)?,
                PathBuf::from(parent).join(host_id),
            )),
            None => None,
        };
        Ok(qemu::Confinement {
            cgroups,
            memory_overhead_mb: self.memory_overhead_mb,
            pids_max: self.pids_max,
        })
    }

    /// The uid of the VM in `slot`.
    pub fn uid_for_slot(&self, slot: u32) -> Option<u32> {
        self.uid_base.and_then(|b| b.checked_add(slot))
    }
}

/// The pid file a VMM writes into its run directory.
pub const PID_FILE: &str = "qemu.pid";

/// The pid recorded in `path` (a VMM's pid file), if any.
pub fn read_pid_file(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Make guest-controlled text safe for a log line or an error message: control
/// characters (C0, C1, DEL, so also newlines and ANSI escapes) become `\n`, `\t`,
/// `\r` or `\xNN`/`\u{NNNN}`, Unicode bidirectional overrides become `\u{NNNN}`,
/// invalid UTF-8 becomes `\xNN` per byte, and a backslash becomes `\\`.
pub fn escape_guest_text(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    loop {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, &[][..]),
            Err(e) => {
                let (ok, bad) = rest.split_at(e.valid_up_to());
                // `ok` is valid UTF-8 by construction (valid_up_to).
                (std::str::from_utf8(ok).unwrap_or_default(), bad)
            }
        };
        for c in valid.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if (c as u32) < 0x80 && c.is_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control()
                    || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
                {
                    let _ = write!(out, "\\u{{{:04x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        if bad.is_empty() {
            return out;
        }
        // One invalid byte at a time, then carry on with what follows.
        let _ = write!(out, "\\x{:02x}", bad[0]);
        rest = &bad[1..];
    }
}

/// A running (or recently running) VM process.
#[derive(Debug, Clone)]
pub struct VmHandle {
    pub name: String,
    pub pid: u32,
    pub control_socket: PathBuf,
    /// Set when we spawned the process ourselves: flips to `true` once it was
    /// reaped and the driver removed what it kept for it (its cgroup), so a VM
    /// of the same name may start as soon as this one is seen exited.
    exited: Option<watch::Receiver<bool>>,
}

impl VmHandle {
    /// A handle for a process we spawned; `exited` flips once the child is reaped.
    pub(crate) fn owned(
        name: String,
        pid: u32,
        control_socket: PathBuf,
        exited: watch::Receiver<bool>,
    ) -> Self {
        Self {
            name,
            pid,
            control_socket,
            exited: Some(exited),
        }
    }

    /// A handle for a process found at recovery (not our child).
    pub fn adopted(name: String, pid: u32, control_socket: PathBuf) -> Self {
        Self {
            name,
            pid,
            control_socket,
            exited: None,
        }
    }

    /// Whether the VM process still runs.
    pub fn is_alive(&self) -> bool {
        match &self.exited {
            Some(rx) => !*rx.borrow(),
            None => pid_alive(self.pid),
        }
    }

    /// Resolve once the process has exited.
    pub async fn exited(&self) {
        if let Some(rx) = &self.exited {
            let mut rx = rx.clone();
            let _ = rx.wait_for(|e| *e).await;
            return;
        }
        while pid_alive(self.pid) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Wait until the process exits, at most `timeout`. Returns whether it exited.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(rx) = &self.exited {
            let mut rx = rx.clone();
            return tokio::time::timeout_at(deadline, rx.wait_for(|e| *e))
                .await
                .is_ok();
        }
        loop {
            if !pid_alive(self.pid) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Whether `pid` names a live (not zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Field 3 (state) follows the parenthesised command name, which may hold spaces.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// Whether the live process `pid` was started with `-name <name>` (or `-name
/// <name>,...`): the PID-reuse guard for VMMs found by pid file.
pub fn pid_cmdline_has_name(pid: u32, name: &str) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    args.windows(2).any(|w| {
        w[0] == b"-name"
            && (w[1] == name.as_bytes() || w[1].starts_with(format!("{name},").as_bytes()))
    })
}

/// Whether the live process `pid` has `needle` in its command line (PID-reuse guard).
pub fn pid_cmdline_contains(pid: u32, needle: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => raw
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(needle)),
        Err(_) => false,
    }
}

/// Send `signal` to `pid`; a process that is already gone is not an error.
pub fn signal_pid(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A virtual machine monitor driver.
#[async_trait::async_trait]
pub trait Vmm: Send + Sync + 'static {
    /// "qemu" or "firecracker".
    fn kind(&self) -> &'static str;
    /// Accelerator in use.
    fn accel(&self) -> ResolvedAccel;
    /// Start a VM; returns as soon as the process runs (not when the guest is up).
    async fn spawn(&self, spec: &VmSpec) -> Result<VmHandle, VmmError>;
    /// Ask the VMM to exit (graceful for the VMM, abrupt for the guest).
    async fn stop(&self, vm: &VmHandle) -> Result<(), VmmError>;
    /// SIGKILL the process and wait for it to go away.
    async fn kill(&self, vm: &VmHandle) -> Result<(), VmmError> {
        signal_pid(vm.pid, libc::SIGKILL);
        if vm.wait_exit(Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(VmmError::Unkillable {
                name: vm.name.clone(),
                pid: vm.pid,
            })
        }
    }
    fn is_alive(&self, vm: &VmHandle) -> bool {
        vm.is_alive()
    }
    fn pid(&self, vm: &VmHandle) -> u32 {
        vm.pid
    }
    /// Remove what the driver keeps on the host for VM `name` besides its process
    /// (its cgroup), killing anything left in it. Idempotent.
    async fn forget(&self, _name: &str) -> Result<(), VmmError> {
        Ok(())
    }
    /// Names of VMs whose host leftovers ([`Vmm::forget`]) exist, for recovery.
    fn leftovers(&self) -> Vec<String> {
        Vec::new()
    }

    // Lifecycle: a VM is frozen ([`Vmm::pause`]), its state written
    // ([`Vmm::save`]) and later loaded into a new process spawned with
    // `VmSpec::incoming` ([`Vmm::restore`]), then unfrozen ([`Vmm::resume`]).
    // The driver keeps its transport (QMP, migration URIs, fd passing) to itself.

    /// What a saved state depends on (VMM version, machine, accelerator, CPU
    /// model): a state restores only into a driver with the same key.
    fn snapshot_compat(&self) -> String {
        format!("{}-{}", self.kind(), self.accel().as_str())
    }
    /// Freeze the vCPUs (idempotent).
    async fn pause(&self, vm: &VmHandle) -> Result<(), VmmError> {
        Err(VmmError::Unsupported {
            operation: "pause",
            name: vm.name.clone(),
            driver: self.kind(),
        })
    }
    /// Unfreeze the vCPUs: after [`Vmm::pause`], a failed or finished
    /// [`Vmm::save`], or [`Vmm::restore`].
    async fn resume(&self, vm: &VmHandle) -> Result<(), VmmError> {
        Err(VmmError::Unsupported {
            operation: "resume",
            name: vm.name.clone(),
            driver: self.kind(),
        })
    }
    /// Write the frozen VM's device state, and its memory unless `memory` is
    /// [`Memory::Shared`], into `dest` (a new file the agent opened for writing).
    /// The VM stays frozen and may be resumed or stopped afterwards.
    async fn save(
        &self,
        vm: &VmHandle,
        memory: &Memory,
        dest: std::fs::File,
    ) -> Result<SavedState, VmmError> {
        let _ = (memory, dest);
        Err(VmmError::Unsupported {
            operation: "save",
            name: vm.name.clone(),
            driver: self.kind(),
        })
    }
    /// Load `src` (written by [`Vmm::save`] as `saved`) into `vm`, which was
    /// spawned with `incoming: true` and the memory the save expects (the same
    /// shared file or private base when the memory was not included, a fresh
    /// shared file when it was). The VM stays frozen until [`Vmm::resume`].
    async fn restore(
        &self,
        vm: &VmHandle,
        saved: &SavedState,
        src: std::fs::File,
    ) -> Result<(), VmmError> {
        let _ = (saved, src);
        Err(VmmError::Unsupported {
            operation: "restore",
            name: vm.name.clone(),
            driver: self.kind(),
        })
    }
}

/// Base kernel command line from docs/contracts.md.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 root=/dev/vda rw rootfstype=ext4 \
init=/usr/bin/hearth-guest tsc_early_khz=2000000 tsc=reliable quiet";

/// Kernel command line for a sandbox guest: the base line plus its network
/// (`hearth.ip`, `hearth.gw`) and, when given, `hearth.hostname`.
pub fn guest_cmdline(hostname: Option<&str>) -> String {
    let mut c = format!(
        "{BASE_CMDLINE} hearth.ip={}/30 hearth.gw={}",
        crate::net::GUEST_IP,
        crate::net::TAP_IP
    );
    if let Some(h) = hostname {
        c.push_str(" hearth.hostname=");
        c.push_str(h);
    }
    c
}

/// Kernel command line for the KVM boot probe.
pub fn probe_cmdline() -> String {
    format!("{BASE_CMDLINE} hearth.probe=1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_cmdline_carries_the_contract() {
        assert!(!guest_cmdline(None).contains("hostname"));
        let c = guest_cmdline(Some("sb-abcdefghijklmnop"));
        for part in [
            "console=ttyS0",
            "root=/dev/vda",
            "init=/usr/bin/hearth-guest",
            "tsc_early_khz=2000000",
            "tsc=reliable",
            "hearth.ip=169.254.0.21/30",
            "hearth.gw=169.254.0.22",
            "hearth.hostname=sb-abcdefghijklmnop",
        ] {
            assert!(c.split(' ').any(|w| w == part), "{part} missing in {c}");
        }
        assert!(!c.contains("hearth.probe"));
        assert!(probe_cmdline().ends_with("hearth.probe=1"));
    }

    #[test]
    fn guest_text_is_escaped() {
        assert_eq!(escape_guest_text(b"plain text"), "plain text");
        assert_eq!(
            escape_guest_text(b"a\nb\r\tc\x1b[2J\x07\\"),
            "a\\nb\\r\\tc\\x1b[2J\\x07\\\\"
        );
        assert_eq!(escape_guest_text(b"ok\xff\xfeok"), "ok\\xff\\xfeok");
        assert_eq!(
            escape_guest_text("h\u{e9}\u{202e}x\u{9b}".as_bytes()),
            "h\u{e9}\\u{202e}x\\u{009b}"
        );
        // Truncated multi-byte sequence at the end.
        assert_eq!(escape_guest_text(&[b'a', 0xc3]), "a\\xc3");
    }

    #[test]
    fn own_process_is_alive_and_bogus_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
        assert!(pid_cmdline_contains(std::process::id(), "hearth_agent"));
    }
}

//! The QEMU driver's lifecycle on real VMs (TCG), driving `QemuVmm` directly:
//! pause, save, restore into a new process started with `incoming`, resume;
//! guest memory in a shared file (saves carry device state only) or mapped
//! private from a base (clones; saves carry the memory); failure paths.
//!
//! Every VM is confined as a sandbox is (its own uid, seccomp, a cgroup, disk
//! by descriptors) and lives in a 0700 root directory, so the runas uid reaches
//! no path there: memory file, disk and migration streams are opened by us. The
//! guest's network card is a tap in a network namespace the test makes; the
//! guest agent's `/health` answering (from inside that namespace) is what says
//! the guest runs. Needs root and `$HEARTH_IMAGES_DIR`; without images it
//! SKIPS loudly. Run one test at a time with `--nocapture` to see the numbers.

use std::hash::Hasher;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_agent::vmm::qemu::{Confinement, QemuVmm};
use hearth_agent::vmm::qmp::QmpClient;
use hearth_agent::vmm::{
    console, Memory, Nic, ResolvedAccel, SavedState, VmHandle, VmHostConfig, VmSpec, Vmm, VmmError,
};

mod common;
use common::{eventually, init_tracing, real_images};

/// uids far from the agent's default range and from other test files.
const UID: u32 = 2_900_000;

/// One test's world: a 0700 directory, a network namespace with a tap, the
/// driver with cgroups under a test parent.
struct World {
    images: PathBuf,
    dir: tempfile::TempDir,
    netns: String,
    vmm: QemuVmm,
    cgroups: Option<hearth_agent::vmm::cgroup::Cgroups>,
    uid: u32,
}

impl World {
    async fn new(tag: &str, uid_offset: u32) -> Option<Self> {
        init_tracing();
        let images = real_images(tag)?;
        let dir = tempfile::Builder::new()
            .prefix("hearth-vmm-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let netns = format!("hvt-{}-{tag}", std::process::id());
        let sh = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(std::process::Stdio::null())
            .status();
        sh(&["netns", "add", &netns]);
        let tap_ip = format!("{}/30", hearth_agent::net::TAP_IP);
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec!["tuntap", "add", "tap0", "mode", "tap"],
            vec!["addr", "add", tap_ip.as_str(), "dev", "tap0"],
            vec!["link", "set", "tap0", "up"],
        ] {
            let mut a = vec!["-n", netns.as_str()];
            a.extend(cmd);
            sh(&a);
        }
        let host = VmHostConfig {
            cgroup_parent: Some("hearth-vmmtest".into()),
            ..VmHostConfig::default()
        };
        let confinement = host
            .confinement(&format!("t{}-{tag}", std::process::id()))
            .unwrap_or_else(|_| Confinement::none());
        let cgroups = confinement.cgroups.clone();
        let vmm = QemuVmm::new("qemu-system-x86_64".into(), ResolvedAccel::Tcg, confinement);
        Some(Self {
            images,
            dir,
            netns,
            vmm,
            cgroups,
            uid: UID + uid_offset,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A spec for VM `name` (run dir `<dir>/<name>`, its own qcow2 overlay made
    /// once per name).
    async fn spec(&self, name: &str, memory_mb: u32, memory: Memory, incoming: bool) -> VmSpec {
        let disk_dir = self.path("disks");
        std::fs::create_dir_all(&disk_dir).unwrap();
        let disk_base = disk_dir.join(name);
        let disk = hearth_agent::disk::provisioner(hearth_agent::DiskKind::Qcow2)
            .create(
                &self.images.join("templates/minimal/rootfs.ext4"),
                &disk_base,
                0,
            )
            .await
            .unwrap();
        VmSpec {
            name: format!("hvt-{}-{name}", std::process::id()),
            vcpus: 1,
            memory_mb,
            kernel: self.images.join("kernel/vmlinux"),
            initrd: Some(self.images.join("kernel/initrd.cpio")),
            cmdline: hearth_agent::guest_cmdline(None),
            disk: disk.path,
            disk_format: disk.format,
            nic: Some(Nic::Tap("tap0".into())),
            netns: Some(self.netns.clone()),
            run_dir: self.path(name),
            runas: Some(self.uid),
            memory,
            incoming,
        }
    }

    /// Spawn and follow the console into the run dir's `console.log`.
    async fn spawn(&self, spec: &VmSpec) -> VmHandle {
        let vm = self.vmm.spawn(spec).await.expect("spawn");
        tokio::spawn(console::follow(
            spec.console_socket(),
            spec.console_log(),
            console::DEFAULT_CONSOLE_CAP,
            vm.clone(),
        ));
        vm
    }

    async fn boot(&self, spec: &VmSpec) -> VmHandle {
        let vm = self.spawn(spec).await;
        let ready = eventually(Duration::from_secs(120), || {
            console::tail_contains(&spec.run_dir, "HEARTH_GUEST_READY", 64 * 1024) || !vm.is_alive()
        })
        .await;
        assert!(
            ready && vm.is_alive(),
            "guest not ready: {}",
            console::read_tail(&spec.run_dir, 2000)
        );
        assert!(self.healthy(Duration::from_secs(20)).await, "no /health");
        vm
    }

    /// Whether the guest agent answers `GET /health` with 204 within `limit`.
    async fn healthy(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if health_once(&self.netns).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    async fn stop(&self, vm: &VmHandle) {
        self.vmm.stop(vm).await.expect("stop");
        assert!(
            vm.wait_exit(Duration::from_secs(10)).await,
            "QEMU did not quit"
        );
    }

    /// A new file for a migration stream.
    fn create(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(self.path(name))
            .unwrap()
    }

    fn open(&self, name: &str) -> std::fs::File {
        std::fs::File::open(self.path(name)).unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        if let Some(cg) = &self.cgroups {
            cg.remove_parent();
        }
    }
}

/// One `GET /health` from inside `netns` (a thread of its own enters it).
async fn health_once(netns: &str) -> bool {
    let ns = format!("/run/netns/{netns}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let ok = (|| -> std::io::Result<bool> {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(&ns)?;
            // SAFETY: setns on a descriptor we own, affecting only this thread,
            // which ends right after the request.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let addr = std::net::SocketAddr::from((hearth_agent::net::GUEST_IP, 49983));
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /health HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n")?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head)?;
            Ok(&head[9..12] == b"204")
        })()
        .unwrap_or(false);
        let _ = tx.send(ok);
    });
    rx.await.unwrap_or(false)
}

/// QMP `query-status` of a VM.
async fn status(vm: &VmHandle) -> String {
    let mut q = QmpClient::connect(&vm.control_socket, Duration::from_secs(5))
        .await
        .expect("qmp");
    q.query_status().await.expect("query-status").status
}

/// Guest oops or panic on the console?
fn console_clean(spec: &VmSpec) -> bool {
    let t = console::read_tail(&spec.run_dir, 64 * 1024);
    !["Kernel panic", "Oops", "BUG:", "general protection"]
        .iter()
        .any(|bad| t.contains(bad))
}

fn hash_file(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

/// Resident set of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Spawn an incoming VM and time spawn -> QMP answering.
async fn spawn_incoming(w: &World, spec: &VmSpec) -> (VmHandle, f64) {
    let t = Instant::now();
    let vm = w.spawn(spec).await;
    let ready = eventually(Duration::from_secs(30), || spec.control_socket().exists()).await;
    assert!(ready, "no QMP socket");
    let mut q = loop {
        match QmpClient::connect(&spec.control_socket(), Duration::from_secs(5)).await {
            Ok(q) => break q,
            Err(e) => {
                assert!(vm.is_alive(), "incoming QEMU died: {e}");
                assert!(t.elapsed() < Duration::from_secs(30), "QMP never answered");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let took = ms(t);
    assert_eq!(q.query_status().await.unwrap().status, "inmigrate");
    (vm, took)
}

/// Restore `state` into `vm` and resume; returns (restore ms, resume ms).
async fn restore_resume(w: &World, vm: &VmHandle, saved: &SavedState, state: &str) -> (f64, f64) {
    let t = Instant::now();
    w.vmm
        .restore(vm, saved, w.open(state))
        .await
        .expect("restore");
    let restore = ms(t);
    assert_eq!(status(vm).await, "paused", "frozen until resume");
    let t = Instant::now();
    w.vmm.resume(vm).await.expect("resume");
    (restore, ms(t))
}

/// Pause and save; returns the state and (pause ms, save ms).
async fn pause_save(
    w: &World,
    vm: &VmHandle,
    memory: &Memory,
    state: &str,
) -> (SavedState, f64, f64) {
    let t = Instant::now();
    w.vmm.pause(vm).await.expect("pause");
    let pause = ms(t);
    let t = Instant::now();
    let saved = w.vmm.save(vm, memory, w.create(state)).await.expect("save");
    (saved, pause, ms(t))
}

/// The whole road at 256 MiB: boot with a shared memory file, pause + save
/// (device state only), restore into a new process, then a clone from the
/// memory file as a private base (base never written), whose save carries the
/// memory, restored into a fresh shared file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_save_restore_then_clone_from_a_base() {
    let Some(w) = World::new("road", 0).await else {
        return;
    };
    let mem = w.path("memory");
    let shared = Memory::Shared(mem.clone());

    // 1. Boot with the memory in a shared file, in a 0700 dir, as an unprivileged uid.
    let a = w.spec("a", 256, shared.clone(), false).await;
    let t = Instant::now();
    let vm = w.boot(&a).await;
    println!("boot to /health: {:.0} ms", ms(t));
    let meta = std::fs::metadata(&mem).unwrap();
    assert_eq!(meta.len(), 256 << 20);

    // 2. Pause + save: device state only.
    let (s1, pause, save) = pause_save(&w, &vm, &shared, "state1").await;
    println!(
        "256 MiB shared: pause {pause:.1} ms, save {save:.1} ms, state {} bytes",
        s1.bytes
    );
    assert!(!s1.memory_included);
    // What making that pause durable costs (the agent's choice, not the driver's).
    let t = Instant::now();
    std::fs::File::open(&mem).unwrap().sync_all().unwrap();
    println!("256 MiB shared: fsync of the memory file {:.0} ms", ms(t));
    assert!(s1.bytes > 0 && s1.bytes < 1 << 20, "{} bytes", s1.bytes);
    assert_eq!(s1.bytes, std::fs::metadata(w.path("state1")).unwrap().len());
    assert_eq!(s1.compat, w.vmm.snapshot_compat());
    assert!(s1.compat.starts_with("qemu-7.") || s1.compat.starts_with("qemu-"));
    assert!(!s1.compat.contains("unknown"), "{}", s1.compat);
    w.stop(&vm).await;

    // 3. A new process, started incoming on the same file; restore; resume.
    let mut b = a.clone();
    b.incoming = true;
    let (vm, qmp_ready) = spawn_incoming(&w, &b).await;
    let (restore, resume) = restore_resume(&w, &vm, &s1, "state1").await;
    let t = Instant::now();
    assert!(
        w.healthy(Duration::from_secs(20)).await,
        "restored guest silent"
    );
    println!(
        "256 MiB shared restore: spawn->QMP {qmp_ready:.0} ms, restore {restore:.1} ms, resume {resume:.1} ms, resume->/health {:.0} ms",
        ms(t)
    );
    assert_eq!(status(&vm).await, "running");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(vm.is_alive());
    assert!(w.healthy(Duration::from_secs(5)).await);
    assert!(
        console_clean(&b),
        "{}",
        console::read_tail(&b.run_dir, 4000)
    );

    // 4. Save again (the memory file now is the fork point) and stop.
    let (s2, _, _) = pause_save(&w, &vm, &shared, "state2").await;
    assert!(!s2.memory_included);
    w.stop(&vm).await;
    let base = mem;
    let base_hash = hash_file(&base);
    let base_mtime = std::fs::metadata(&base).unwrap().modified().unwrap();

    // 5. A clone: the file as a private base, incoming, restore, resume. It needs
    // the disk as of the save: a copy of b's overlay.
    let c = w.spec("c", 256, Memory::Private(base.clone()), true).await;
    std::fs::copy(&a.disk, &c.disk).unwrap();
    let (vm, _) = spawn_incoming(&w, &c).await;
    let (restore, resume) = restore_resume(&w, &vm, &s2, "state2").await;
    assert!(w.healthy(Duration::from_secs(20)).await, "clone silent");
    println!("256 MiB private clone: restore {restore:.1} ms, resume {resume:.1} ms");
    println!(
        "256 MiB private clone: QEMU RSS {} MiB once the guest answers",
        rss_kib(vm.pid) >> 10
    );
    assert_eq!(status(&vm).await, "running");
    assert!(console_clean(&c));

    // 6. Its save carries the memory; the base is untouched.
    let (s3, pause, save) = pause_save(&w, &vm, &c.memory, "state3").await;
    println!(
        "256 MiB private: pause {pause:.1} ms, full save {save:.1} ms, state {} bytes",
        s3.bytes
    );
    assert!(s3.memory_included);
    assert!(s3.bytes > 1 << 20, "{} bytes", s3.bytes);
    w.stop(&vm).await;
    assert_eq!(hash_file(&base), base_hash, "the base changed");
    assert_eq!(
        std::fs::metadata(&base).unwrap().modified().unwrap(),
        base_mtime
    );

    // 7. That state into a fresh shared file.
    let d = w
        .spec("d", 256, Memory::Shared(w.path("memory-d")), true)
        .await;
    std::fs::copy(&c.disk, &d.disk).unwrap();
    let (vm, _) = spawn_incoming(&w, &d).await;
    let (restore, resume) = restore_resume(&w, &vm, &s3, "state3").await;
    assert!(
        w.healthy(Duration::from_secs(20)).await,
        "full restore silent"
    );
    println!(
        "256 MiB full restore into a shared file: restore {restore:.1} ms, resume {resume:.1} ms"
    );
    assert_eq!(status(&vm).await, "running");
    assert!(console_clean(&d));
    w.stop(&vm).await;
}

/// Saves that fail leave a VM that resumes; restores that fail leave a process
/// that can be killed; a state from another QEMU is refused before QEMU sees it;
/// a snapshot of a running sandbox keeps it running with a writable disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_leave_vms_usable_or_gone() {
    let Some(w) = World::new("fail", 10).await else {
        return;
    };
    let shared = Memory::Shared(w.path("memory"));
    let a = w.spec("a", 256, shared.clone(), false).await;
    let vm = w.boot(&a).await;

    // A running VM is not saved.
    let err = w
        .vmm
        .save(&vm, &shared, w.create("never"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pause it first"), "{err}");

    // Save into a read-only descriptor: an error naming QEMU's reason, then resume.
    w.vmm.pause(&vm).await.unwrap();
    std::fs::write(w.path("ro"), b"").unwrap();
    let err = w.vmm.save(&vm, &shared, w.open("ro")).await.unwrap_err();
    println!("save into a read-only file: {err}");
    assert!(matches!(err, VmmError::Lifecycle { .. }), "{err:?}");
    w.vmm.resume(&vm).await.expect("resume after a failed save");
    assert_eq!(status(&vm).await, "running");
    assert!(w.healthy(Duration::from_secs(10)).await);

    // Snapshot then keep running: cont after a completed migration takes the
    // disk back (QEMU inactivated it); a write through the block layer works.
    let (saved, _, _) = pause_save(&w, &vm, &shared, "state").await;
    let err = w
        .vmm
        .save(&vm, &shared, w.create("twice"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already saved"), "{err}");
    w.vmm.resume(&vm).await.expect("resume after a save");
    assert_eq!(status(&vm).await, "running");
    let mut q = QmpClient::connect(&vm.control_socket, Duration::from_secs(5))
        .await
        .unwrap();
    for cmd in ["qemu-io root \"write -P 0x5a 0 512\"", "qemu-io root flush"] {
        let out = q
            .execute(
                "human-monitor-command",
                Some(serde_json::json!({ "command-line": cmd })),
            )
            .await
            .expect("qemu-io");
        // Errors come back as the command's text; success prints nothing here.
        assert_eq!(out.as_str(), Some(""), "{cmd}: {out}");
    }
    // QEMU serves one QMP client at a time.
    drop(q);
    // The write reached the overlay (read from the host, sharing the image).
    let check = std::process::Command::new("qemu-io")
        .args(["-U", "-r", "-c", "read -P 0x5a 0 512"])
        .arg(&a.disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("read 512/512") && !text.contains("failed"),
        "{text}"
    );
    assert!(vm.is_alive());
    assert!(w.healthy(Duration::from_secs(10)).await);

    // A VM that dies mid-save (a full save: hundreds of ms) gives an error, not a hang.
    w.vmm.pause(&vm).await.unwrap();
    let full = Memory::Private(w.path("memory"));
    let saving = {
        let (vmm, vm, dest) = (w.vmm.clone(), vm.clone(), w.create("dying"));
        tokio::spawn(async move { vmm.save(&vm, &full, dest).await })
    };
    let grown = eventually(Duration::from_secs(10), || {
        std::fs::metadata(w.path("dying")).map_or(0, |m| m.len()) > 1 << 20
    })
    .await;
    assert!(grown, "the full save never started writing");
    hearth_agent::vmm::signal_pid(vm.pid, libc::SIGKILL);
    let t = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(15), saving)
        .await
        .expect("save hung after the VM died")
        .unwrap();
    let err = res.expect_err("save of a killed VM succeeded");
    println!("save of a VM killed mid-way: {err} (after {:.0} ms)", ms(t));
    assert!(matches!(err, VmmError::Lifecycle { .. }), "{err:?}");
    assert!(vm.wait_exit(Duration::from_secs(5)).await);

    // A state from another QEMU or accelerator is refused before QEMU sees it.
    let mut b = a.clone();
    b.incoming = true;
    let (vm, _) = spawn_incoming(&w, &b).await;
    let foreign = SavedState {
        compat: "qemu-6.2.0/microvm/kvm/host:Other CPU".into(),
        ..saved.clone()
    };
    let err = w
        .vmm
        .restore(&vm, &foreign, w.open("state"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("qemu-6.2.0"), "{err}");
    assert_eq!(status(&vm).await, "inmigrate");
    w.vmm.kill(&vm).await.unwrap();

    // Garbage and a truncated state: an error, and the process goes away.
    let real = std::fs::read(w.path("state")).unwrap();
    std::fs::write(w.path("state-garbage"), vec![0x5a_u8; 64 * 1024]).unwrap();
    std::fs::write(w.path("state-truncated"), &real[..real.len() / 2]).unwrap();
    for bad in ["garbage", "truncated"] {
        let s = w
            .spec(
                bad,
                256,
                Memory::Shared(w.path(&format!("memory-{bad}"))),
                true,
            )
            .await;
        let (vm, _) = spawn_incoming(&w, &s).await;
        let err = w
            .vmm
            .restore(&vm, &saved, w.open(&format!("state-{bad}")))
            .await
            .unwrap_err();
        println!("restore of a {bad} state: {err}");
        assert!(matches!(err, VmmError::Lifecycle { .. }), "{err:?}");
        w.vmm.kill(&vm).await.expect("kill");
        assert!(!hearth_agent::vmm::pid_alive(vm.pid));
        w.vmm.forget(&s.name).await.unwrap();
        assert!(!w.vmm.leftovers().contains(&s.name));
    }
}

/// The numbers at 1 GiB: pause + save with the memory in a shared file, a full
/// save of a private clone, and both restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_numbers() {
    let Some(w) = World::new("gib", 20).await else {
        return;
    };
    let mem = w.path("memory");
    let shared = Memory::Shared(mem.clone());
    let a = w.spec("a", 1024, shared.clone(), false).await;
    let vm = w.boot(&a).await;
    let (s1, pause, save) = pause_save(&w, &vm, &shared, "state1").await;
    println!(
        "1 GiB shared: pause {pause:.1} ms, save {save:.1} ms, state {} bytes",
        s1.bytes
    );
    assert!(s1.bytes < 1 << 20);
    w.stop(&vm).await;

    let mut b = a.clone();
    b.incoming = true;
    let (vm, qmp_ready) = spawn_incoming(&w, &b).await;
    let (restore, resume) = restore_resume(&w, &vm, &s1, "state1").await;
    let t = Instant::now();
    assert!(w.healthy(Duration::from_secs(20)).await);
    println!(
        "1 GiB shared restore: spawn->QMP {qmp_ready:.0} ms, restore {restore:.1} ms, resume {resume:.1} ms, resume->/health {:.0} ms",
        ms(t)
    );
    let (s2, _, _) = pause_save(&w, &vm, &shared, "state2").await;
    w.stop(&vm).await;

    let c = w.spec("c", 1024, Memory::Private(mem.clone()), true).await;
    std::fs::copy(&a.disk, &c.disk).unwrap();
    let (vm, _) = spawn_incoming(&w, &c).await;
    restore_resume(&w, &vm, &s2, "state2").await;
    assert!(w.healthy(Duration::from_secs(20)).await);
    let (s3, pause, save) = pause_save(&w, &vm, &c.memory, "state3").await;
    println!(
        "1 GiB private: pause {pause:.1} ms, full save {save:.1} ms, state {} bytes",
        s3.bytes
    );
    assert!(s3.memory_included && s3.bytes > 1 << 20);
    w.stop(&vm).await;

    let d = w
        .spec("d", 1024, Memory::Shared(w.path("memory-d")), true)
        .await;
    std::fs::copy(&c.disk, &d.disk).unwrap();
    let (vm, _) = spawn_incoming(&w, &d).await;
    let (restore, resume) = restore_resume(&w, &vm, &s3, "state3").await;
    assert!(w.healthy(Duration::from_secs(20)).await);
    println!("1 GiB full restore: restore {restore:.1} ms, resume {resume:.1} ms");
    w.stop(&vm).await;
}

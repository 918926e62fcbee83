//! Unit tests of the sandbox actor's lifecycle logic with hand-written fakes of
//! the VMM, disk and network boundaries (no root, no QEMU). The fake network
//! points the "guest" at a loopback HTTP server so the health wait is real.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_types::{HostId, SandboxId};
use tokio::sync::watch;

use crate::disk::{Disk, DiskError, DiskKind, DiskProvisioner};
use crate::net::{NetError, NetworkProvider, SandboxNet};
use crate::sandbox::{start_create, SandboxError};
use crate::state::{SandboxSpec, SandboxState};
use crate::vmm::{DiskFormat, ResolvedAccel, VmHandle, VmSpec, Vmm, VmmError};
use crate::{AgentConfig, Ctx};

#[derive(Default)]
pub(crate) struct Log(Mutex<Vec<String>>);
impl Log {
    pub fn push(&self, s: impl Into<String>) {
        self.0.lock().unwrap().push(s.into());
    }
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

struct FakeNet {
    log: Arc<Log>,
    guest: SocketAddr,
    fail: bool,
}

#[async_trait::async_trait]
impl NetworkProvider for FakeNet {
    async fn setup(&self, slot: u32, id: &SandboxId) -> Result<SandboxNet, NetError> {
        if self.fail {
            self.log.push("net.setup failed");
            return Err(NetError::Command {
                command: "ip netns add".into(),
                stderr: "injected".into(),
            });
        }
        self.log.push("net.setup");
        let mut net = SandboxNet::planned(slot, id).unwrap();
        net.guest_address = self.guest;
        Ok(net)
    }
    async fn teardown(&self, _net: &SandboxNet) -> Result<(), NetError> {
        self.log.push("net.teardown");
        Ok(())
    }
}

struct FakeDisk {
    log: Arc<Log>,
    fail: bool,
}

#[async_trait::async_trait]
impl DiskProvisioner for FakeDisk {
    fn kind(&self) -> DiskKind {
        DiskKind::Copy
    }
    async fn create(&self, _base: &Path, dest: &Path, _size_mb: u32) -> Result<Disk, DiskError> {
        if self.fail {
            self.log.push("disk.create failed");
            return Err(DiskError::Tool {
                program: "cp",
                dest: dest.to_owned(),
                stderr: "injected".into(),
            });
        }
        self.log.push("disk.create");
        let path = dest.with_extension("raw");
        std::fs::write(&path, b"disk").unwrap();
        Ok(Disk {
            path,
            format: DiskFormat::Raw,
        })
    }
}

struct FakeVmm {
    log: Arc<Log>,
    fail: bool,
    /// Exit right after start (a guest that crashes during boot).
    die: bool,
    /// One "exited" switch per running VM, by name.
    running: Mutex<std::collections::HashMap<String, watch::Sender<bool>>>,
}

#[async_trait::async_trait]
impl Vmm for FakeVmm {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn accel(&self) -> ResolvedAccel {
        ResolvedAccel::Tcg
    }
    async fn spawn(&self, spec: &VmSpec) -> Result<VmHandle, VmmError> {
        if self.fail {
            self.log.push("vmm.spawn failed");
            return Err(VmmError::Spawn {
                binary: "fake".into(),
                source: std::io::Error::other("injected"),
            });
        }
        self.log.push("vmm.spawn");
        // Like QEMU's driver: a VM's own memory file exists once it runs.
        if let crate::vmm::Memory::Shared(p) = &spec.memory {
            if !p.exists() {
                std::fs::write(p, b"").unwrap();
            }
        }
        let (tx, rx) = watch::channel(self.die);
        self.running.lock().unwrap().insert(spec.name.clone(), tx);
        Ok(VmHandle::owned(
            spec.name.clone(),
            0,
            spec.control_socket(),
            rx,
        ))
    }
    async fn stop(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.log.push("vmm.stop");
        if let Some(tx) = self.running.lock().unwrap().remove(&vm.name) {
            let _ = tx.send(true);
        }
        Ok(())
    }
    async fn kill(&self, vm: &VmHandle) -> Result<(), VmmError> {
        self.log.push("vmm.kill");
        if let Some(tx) = self.running.lock().unwrap().remove(&vm.name) {
            let _ = tx.send(true);
        }
        Ok(())
    }
    async fn pause(&self, _vm: &VmHandle) -> Result<(), VmmError> {
        self.log.push("vmm.pause");
        Ok(())
    }
    async fn resume(&self, _vm: &VmHandle) -> Result<(), VmmError> {
        self.log.push("vmm.resume");
        Ok(())
    }
    /// Writes a recognisable state; "memory" is included for private bases.
    async fn save(
        &self,
        vm: &VmHandle,
        memory: &crate::vmm::Memory,
        mut dest: std::fs::File,
    ) -> Result<crate::vmm::SavedState, VmmError> {
        use std::io::Write;
        self.log.push("vmm.save");
        let included = matches!(memory, crate::vmm::Memory::Private(_));
        let body = format!("state of {}", vm.name);
        dest.write_all(body.as_bytes()).unwrap();
        Ok(crate::vmm::SavedState {
            memory_included: included,
            bytes: body.len() as u64,
            compat: self.snapshot_compat(),
        })
    }
    /// Checks it is handed a state `save` wrote (this VM's, or a template's).
    async fn restore(
        &self,
        vm: &VmHandle,
        _saved: &crate::vmm::SavedState,
        mut src: std::fs::File,
    ) -> Result<(), VmmError> {
        use std::io::Read;
        self.log.push("vmm.restore");
        let mut body = String::new();
        src.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("state of sb-"), "{body} for {}", vm.name);
        Ok(())
    }
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Faults {
    pub net: bool,
    pub disk: bool,
    pub spawn: bool,
    pub die: bool,
    /// The guest answers 503 instead of 204.
    pub unhealthy: bool,
    /// The guest answers /health but refuses /init.
    pub refuse_init: bool,
}

pub(crate) struct Setup {
    pub ctx: Arc<Ctx>,
    vmm: Arc<FakeVmm>,
    pub log: Arc<Log>,
    _dir: tempfile::TempDir,
}

async fn guest_server(unhealthy: bool, refuse_init: bool) -> SocketAddr {
    let init_status = if refuse_init {
        http::StatusCode::BAD_REQUEST
    } else {
        http::StatusCode::NO_CONTENT
    };
    let status = if unhealthy {
        http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        http::StatusCode::NO_CONTENT
    };
    // Stands in for the guest agent's /health and /init (envd's contract).
    let app = axum::Router::new()
        .route("/health", axum::routing::get(move || async move { status }))
        .route(
            "/init",
            axum::routing::post(move || async move { init_status }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    addr
}

async fn setup(f: Faults) -> Setup {
    setup_with(f, None, |_| ()).await
}

/// [`setup`] with the "guest" at `guest` (default: a well-behaved fake) and the
/// config adjusted by `adjust`.
pub(crate) async fn setup_with(
    f: Faults,
    guest: Option<SocketAddr>,
    adjust: impl FnOnce(&mut AgentConfig),
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(images.join("kernel")).unwrap();
    std::fs::create_dir_all(images.join("templates/minimal")).unwrap();
    std::fs::write(images.join("kernel/vmlinux"), b"k").unwrap();
    std::fs::write(images.join("templates/minimal/rootfs.ext4"), b"r").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("sandboxes")).unwrap();
    let mut config = AgentConfig::new("127.0.0.1:0".parse().unwrap(), images, run);
    config.slots_dir = dir.path().join("slots");
    config.boot_timeout = Duration::from_millis(800);
    adjust(&mut config);
    let log = Arc::new(Log::default());
    let guest = match guest {
        Some(g) => g,
        None => guest_server(f.unhealthy, f.refuse_init).await,
    };
    let vmm = Arc::new(FakeVmm {
        log: log.clone(),
        fail: f.spawn,
        die: f.die,
        running: Mutex::default(),
    });
    let ctx = Arc::new(Ctx::new(
        config,
        HostId::generate(),
        vmm.clone(),
        "fake".into(),
        Arc::new(FakeDisk {
            log: log.clone(),
            fail: f.disk,
        }),
        Arc::new(FakeNet {
            log: log.clone(),
            guest,
            fail: f.net,
        }),
    ));
    Setup {
        ctx,
        vmm,
        log,
        _dir: dir,
    }
}

pub(crate) fn spec(id: &SandboxId) -> SandboxSpec {
    SandboxSpec {
        sandbox_id: id.clone(),
        template: "minimal".parse().unwrap(),
        vcpus: 1,
        memory_mb: 256,
        disk_size_mb: 64,
        expires_at_unix_ms: 0,
        env: Default::default(),
        team_id: String::new(),
    }
}

pub(crate) fn slot_files(ctx: &Ctx) -> Vec<PathBuf> {
    std::fs::read_dir(ctx.slots.dir())
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn create_then_destroy_releases_in_reverse_order() {
    let s = setup(Faults::default()).await;
    let id = SandboxId::generate();
    let rec = start_create(&s.ctx, spec(&id))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    assert_eq!(rec.slot, Some(1));
    let on_disk = crate::state::load(&rec.run_dir).unwrap();
    assert_eq!(on_disk.state, SandboxState::Running);
    assert_eq!(slot_files(&s.ctx).len(), 1);
    // A second create of the same ID is refused while it runs.
    assert!(start_create(&s.ctx, spec(&id)).is_err());

    s.ctx.registry.get(&id).unwrap().destroy("test").await;
    assert!(s.ctx.registry.get(&id).is_none());
    assert_eq!(
        s.log.all(),
        [
            "net.setup",
            "disk.create",
            "vmm.spawn",
            "vmm.stop",
            "net.teardown"
        ]
    );
    assert!(!rec.run_dir.exists());
    assert!(slot_files(&s.ctx).is_empty());
}

/// A fault, the calls expected, and a check of the error.
type Case = (Faults, &'static [&'static str], fn(&SandboxError) -> bool);

/// Every failing step leaves no slot, no run directory and no registry entry,
/// and undoes exactly what was done before it.
#[tokio::test]
async fn each_failure_undoes_what_was_done() {
    let cases: [Case; 6] = [
        (
            Faults {
                net: true,
                ..Default::default()
            },
            &["net.setup failed", "net.teardown"],
            |e| matches!(e, SandboxError::Net(_)),
        ),
        (
            Faults {
                disk: true,
                ..Default::default()
            },
            &["net.setup", "disk.create failed", "net.teardown"],
            |e| matches!(e, SandboxError::Disk(_)),
        ),
        (
            Faults {
                spawn: true,
                ..Default::default()
            },
            &[
                "net.setup",
                "disk.create",
                "vmm.spawn failed",
                "net.teardown",
            ],
            |e| matches!(e, SandboxError::Vmm(_)),
        ),
        (
            Faults {
                die: true,
                ..Default::default()
            },
            &["net.setup", "disk.create", "vmm.spawn", "net.teardown"],
            |e| matches!(e, SandboxError::VmExited { .. }),
        ),
        (
            Faults {
                unhealthy: true,
                ..Default::default()
            },
            &[
                "net.setup",
                "disk.create",
                "vmm.spawn",
                "vmm.stop",
                "net.teardown",
            ],
            |e| matches!(e, SandboxError::BootTimeout { .. }),
        ),
        (
            Faults {
                refuse_init: true,
                ..Default::default()
            },
            &[
                "net.setup",
                "disk.create",
                "vmm.spawn",
                "vmm.stop",
                "net.teardown",
            ],
            |e| matches!(e, SandboxError::GuestInit { .. }),
        ),
    ];
    for (faults, expected, is_expected) in cases {
        let s = setup(faults).await;
        let id = SandboxId::generate();
        let err = start_create(&s.ctx, spec(&id))
            .unwrap()
            .await
            .unwrap()
            .unwrap_err();
        assert!(is_expected(&err), "unexpected error {err:?}");
        assert_eq!(s.log.all(), expected, "for {err}");
        assert!(s.ctx.registry.get(&id).is_none());
        assert!(slot_files(&s.ctx).is_empty(), "slot left after {err}");
        assert!(!s.ctx.sandbox_dir(&id).exists(), "run dir left after {err}");
    }
}

#[tokio::test]
async fn reaper_destroys_only_expired_sandboxes() {
    let s = setup(Faults::default()).await;
    let keep = SandboxId::generate();
    let expire = SandboxId::generate();
    let mut sp = spec(&expire);
    sp.expires_at_unix_ms = crate::state::now_unix_ms() + 300;
    start_create(&s.ctx, spec(&keep))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    start_create(&s.ctx, sp).unwrap().await.unwrap().unwrap();
    assert_eq!(crate::reaper::reap_once(&s.ctx), 0);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(crate::reaper::reap_once(&s.ctx), 1);
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.ctx.registry.get(&expire).is_some() {
        assert!(tokio::time::Instant::now() < end, "not reaped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(s.ctx.registry.get(&keep).is_some());
}

#[tokio::test]
async fn a_vm_gone_while_running_is_an_error_and_delete_frees_it_twice_safely() {
    let s = setup(Faults::default()).await;
    let id = SandboxId::generate();
    let rec = start_create(&s.ctx, spec(&id))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    // The guest powers itself off.
    let tx = s.vmm.running.lock().unwrap().remove(id.as_str()).unwrap();
    tx.send(true).unwrap();
    let h = s.ctx.registry.get(&id).unwrap();
    let mut rx = h.record.clone();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|r| r.state == SandboxState::Error),
    )
    .await
    .expect("error state within 5s")
    .unwrap()
    .clone();
    // The API sees what happened, not the guest's console.
    assert_eq!(r.error.as_deref(), Some(crate::sandbox::VM_GONE));
    // It keeps its slot and disk until deleted; delete frees them.
    assert_eq!(slot_files(&s.ctx).len(), 1);
    h.destroy("test").await;
    assert!(s.ctx.registry.get(&id).is_none());
    assert!(slot_files(&s.ctx).is_empty());
    assert!(!rec.run_dir.exists());
    // A second delete finds nothing and does nothing.
    h.destroy("again").await;
    assert!(s.ctx.registry.get(&id).is_none());
}

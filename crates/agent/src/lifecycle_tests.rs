//! Pause and resume through the sandbox actor with the fakes of
//! [`crate::fake_tests`] (no root, no QEMU): the order of the steps, and a
//! failure injected at every step leaves a usable sandbox and nothing held.
//! The same paths on real VMs are in tests/lifecycle.rs.

use hearth_types::SandboxId;

use crate::fake_tests::{setup_with, slot_files, spec, Faults as FakeFaults, Setup};
use crate::faults::Fault;
use crate::lifecycle::LifecycleError;
use crate::sandbox::start_create;
use crate::state::{self, SandboxRecord, SandboxState, VMSTATE_FILE};

async fn running(s: &Setup) -> (SandboxId, SandboxRecord) {
    let id = SandboxId::generate();
    let rec = start_create(&s.ctx, spec(&id))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    s.log.clear();
    (id, rec)
}

async fn setup() -> Setup {
    setup_with(FakeFaults::default(), None, |_| ()).await
}

fn assert_running(s: &Setup, rec: &SandboxRecord) {
    assert_eq!(rec.state, SandboxState::Running, "{rec:?}");
    assert!(rec.slot.is_some() && rec.net.is_some() && rec.guest_address.is_some());
    assert!(rec.paused.is_none());
    assert_eq!(slot_files(&s.ctx).len(), 1, "one slot held");
    assert_eq!(
        state::load(&rec.run_dir).unwrap().state,
        SandboxState::Running
    );
    assert!(!rec.run_dir.join(".vmstate.new").exists());
}

fn assert_paused(s: &Setup, rec: &SandboxRecord) {
    assert_eq!(rec.state, SandboxState::Paused, "{rec:?}");
    assert!(rec.slot.is_none() && rec.net.is_none() && rec.pid.is_none());
    assert!(rec.guest_address.is_none());
    assert!(rec.paused.is_some());
    assert!(
        slot_files(&s.ctx).is_empty(),
        "a paused sandbox holds no slot"
    );
    assert!(rec.run_dir.join(VMSTATE_FILE).is_file());
    assert_eq!(state::load(&rec.run_dir).unwrap(), *rec);
}

#[tokio::test]
async fn pause_then_resume_walks_the_steps_and_rotates_the_token() {
    let s = setup().await;
    let (id, before) = running(&s).await;
    let h = s.ctx.registry.get(&id).unwrap();
    let paused = h.pause().await.unwrap();
    assert_paused(&s, &paused);
    assert_eq!(
        s.log.all(),
        ["vmm.pause", "vmm.save", "vmm.stop", "net.teardown"]
    );
    // Pausing again changes nothing; a paused sandbox holds no host memory.
    assert_eq!(h.pause().await.unwrap(), paused);
    assert_eq!(s.ctx.registry.usage().memory_mb, 0);
    s.log.clear();

    let resumed = h.resume(1234).await.unwrap();
    assert_running(&s, &resumed);
    assert_eq!(
        s.log.all(),
        ["net.setup", "vmm.spawn", "vmm.restore", "vmm.resume"]
    );
    assert_ne!(resumed.access_token, before.access_token, "new token");
    assert!(resumed.next_access_token.is_none());
    assert_eq!(resumed.spec.expires_at_unix_ms, 1234);
    assert!(!resumed.run_dir.join(VMSTATE_FILE).exists());
    assert_eq!(h.resume(0).await.unwrap().state, SandboxState::Running);

    // A paused sandbox is destroyed like any other: nothing stays.
    h.pause().await.unwrap();
    h.destroy("test").await;
    assert!(!resumed.run_dir.exists());
    assert!(slot_files(&s.ctx).is_empty());
}

#[tokio::test]
async fn a_failure_at_any_pause_step_leaves_it_running() {
    for step in [
        "pause:start",
        "pause:frozen",
        "pause:saved",
        "pause:renamed",
    ] {
        let s = setup().await;
        let (id, _) = running(&s).await;
        let h = s.ctx.registry.get(&id).unwrap();
        s.ctx.config.faults.arm(step, Fault::Fail);
        let err = h.pause().await.unwrap_err();
        assert!(matches!(err, LifecycleError::Fault { .. }), "{step}: {err}");
        let rec = h.snapshot();
        assert_running(&s, &rec);
        assert!(!rec.run_dir.join(VMSTATE_FILE).exists(), "{step}");
        let log = s.log.all();
        assert!(!log.contains(&"vmm.stop".to_owned()), "{step}: {log:?}");
        if log.contains(&"vmm.pause".to_owned()) {
            assert_eq!(log.last().unwrap(), "vmm.resume", "{step}: unfrozen");
        }
        // And it can still be paused once the fault is gone.
        s.ctx.config.faults.clear();
        assert_paused(&s, &h.pause().await.unwrap());
    }
}

#[tokio::test]
async fn a_failure_at_any_resume_step_leaves_it_paused_and_resumable() {
    for step in [
        "resume:start",
        "resume:network",
        "resume:spawned",
        "resume:restored",
    ] {
        let s = setup().await;
        let (id, _) = running(&s).await;
        let h = s.ctx.registry.get(&id).unwrap();
        let paused = h.pause().await.unwrap();
        let state_before = std::fs::read(paused.run_dir.join(VMSTATE_FILE)).unwrap();
        s.log.clear();
        s.ctx.config.faults.arm(step, Fault::Fail);
        let err = h.resume(0).await.unwrap_err();
        assert!(matches!(err, LifecycleError::Fault { .. }), "{step}: {err}");
        let rec = h.snapshot();
        assert_paused(&s, &rec);
        let log = s.log.all();
        assert!(!log.contains(&"vmm.resume".to_owned()), "{step}: {log:?}");
        if log.contains(&"vmm.spawn".to_owned()) {
            assert!(log.contains(&"vmm.kill".to_owned()), "{step}: {log:?}");
        }
        if log.contains(&"net.setup".to_owned()) {
            assert!(log.contains(&"net.teardown".to_owned()), "{step}: {log:?}");
        }
        assert_eq!(
            std::fs::read(rec.run_dir.join(VMSTATE_FILE)).unwrap(),
            state_before,
            "{step}: snapshot intact"
        );
        s.ctx.config.faults.clear();
        assert_running(&s, &h.resume(0).await.unwrap());
    }
}

#[tokio::test]
async fn a_failure_after_the_guest_ran_pauses_it_again() {
    let s = setup().await;
    let (id, _) = running(&s).await;
    let h = s.ctx.registry.get(&id).unwrap();
    h.pause().await.unwrap();
    s.log.clear();
    s.ctx.config.faults.arm("resume:running", Fault::Fail);
    h.resume(0).await.unwrap_err();
    let rec = h.snapshot();
    assert_paused(&s, &rec);
    // Unfrozen, then frozen and saved again: memory and state still match.
    let log = s.log.all();
    let tail: Vec<&str> = log.iter().map(String::as_str).skip(4).collect();
    assert_eq!(
        tail,
        ["vmm.pause", "vmm.save", "vmm.stop", "net.teardown"],
        "{log:?}"
    );
    s.ctx.config.faults.clear();
    assert_running(&s, &h.resume(0).await.unwrap());
}

#[tokio::test]
async fn resume_of_a_running_and_pause_of_a_gone_sandbox() {
    let s = setup().await;
    let (id, _) = running(&s).await;
    let h = s.ctx.registry.get(&id).unwrap();
    // Resuming a running sandbox is a no-op that touches nothing.
    assert_eq!(h.resume(0).await.unwrap().state, SandboxState::Running);
    assert!(s.log.all().is_empty());
    h.destroy("test").await;
    let e = h.pause().await.unwrap_err();
    assert!(matches!(e, LifecycleError::Gone), "{e}");
    let e = h.resume(0).await.unwrap_err();
    assert!(matches!(e, LifecycleError::Gone), "{e}");
}

fn tname(s: &str) -> hearth_types::TemplateName {
    s.parse().unwrap()
}

fn snap(name: &str, memory: bool) -> crate::snapshot::SnapshotRequest {
    crate::snapshot::SnapshotRequest {
        template: tname(name),
        memory,
        hidden: false,
        warm_of: None,
    }
}

/// Names of everything in the template store (also build leftovers).
fn store_entries(s: &Setup) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(s.ctx.config.images_dir.join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn warm_snapshot_then_a_sandbox_restored_from_it() {
    let s = setup().await;
    let (id, src) = running(&s).await;
    let h = s.ctx.registry.get(&id).unwrap();
    let made = h.snapshot_to_template(snap("snap-a", true)).await.unwrap();
    // Frozen for the copy, running again after.
    assert_eq!(
        s.log.all(),
        ["vmm.pause", "vmm.save", "vmm.resume"],
        "{:?}",
        s.log.all()
    );
    assert_running(&s, &h.snapshot());
    let warm = made.entry.warm.clone().expect("warm");
    assert_eq!(warm.access_token, src.access_token.clone().unwrap());
    assert_eq!(
        made.entry.meta.source_sandbox_id.as_deref(),
        Some(id.as_str())
    );
    assert!(store_entries(&s).contains(&"snap-a".to_owned()));

    // A sandbox of the same shape from it is restored, not booted.
    s.log.clear();
    let cid = SandboxId::generate();
    let mut cspec = spec(&cid);
    cspec.template = tname("snap-a");
    let clone = start_create(&s.ctx, cspec).unwrap().await.unwrap().unwrap();
    assert!(clone.restored);
    assert_eq!(
        clone.memory,
        crate::vmm::Memory::Private(s.ctx.templates.dir(&tname("snap-a")).join("memory"))
    );
    let log = s.log.all();
    assert!(log.contains(&"vmm.restore".to_owned()), "{log:?}");
    assert_ne!(clone.access_token, src.access_token);
    // In use: not deletable; once its sandbox is gone, it is.
    assert!(s.ctx.registry.uses_template(&tname("snap-a")));
    s.ctx.registry.get(&cid).unwrap().destroy("t").await;
    assert!(!s.ctx.registry.uses_template(&tname("snap-a")));
    s.ctx.templates.delete(&tname("snap-a")).unwrap();
    // A name that exists is refused and changes nothing.
    h.snapshot_to_template(snap("snap-b", true)).await.unwrap();
    let e = h
        .snapshot_to_template(snap("snap-b", true))
        .await
        .unwrap_err();
    assert!(e.public_message().contains("already exists"), "{e}");
}

#[tokio::test]
async fn a_failure_at_any_snapshot_step_leaves_no_template_and_a_running_sandbox() {
    for step in [
        "snapshot:start",
        "snapshot:frozen",
        "snapshot:copied",
        "snapshot:built",
    ] {
        let s = setup().await;
        let (id, _) = running(&s).await;
        let h = s.ctx.registry.get(&id).unwrap();
        let before = store_entries(&s);
        s.ctx.config.faults.arm(step, Fault::Fail);
        h.snapshot_to_template(snap("snap-x", true))
            .await
            .unwrap_err();
        assert_eq!(store_entries(&s), before, "{step}: nothing left");
        assert_running(&s, &h.snapshot());
        let log = s.log.all();
        if log.contains(&"vmm.pause".to_owned()) {
            assert_eq!(log.last().unwrap(), "vmm.resume", "{step}: {log:?}");
        }
        // Paused sandboxes snapshot from their files, never unfrozen.
        s.ctx.config.faults.clear();
        h.pause().await.unwrap();
        s.log.clear();
        h.snapshot_to_template(snap("snap-y", true)).await.unwrap();
        assert!(s.log.all().is_empty(), "{:?}", s.log.all());
        assert_paused(&s, &h.snapshot());
    }
}

#[tokio::test]
async fn fork_makes_restored_copies_and_its_point_goes_with_them() {
    let s = setup().await;
    let (id, src) = running(&s).await;
    let h = s.ctx.registry.get(&id).unwrap();
    let copies: Vec<_> = (0..3).map(|_| spec(&SandboxId::generate())).collect();
    let made = crate::service::fork(s.ctx.clone(), h.clone(), copies.clone())
        .await
        .unwrap();
    assert_eq!(made.len(), 3);
    let point = made[0].base.clone().expect("copies depend on a fork point");
    for (rec, want) in made.iter().zip(&copies) {
        assert_eq!(rec.spec.sandbox_id, want.sandbox_id);
        assert_eq!(rec.state, SandboxState::Running);
        assert!(rec.restored);
        assert_eq!(rec.base.as_ref(), Some(&point));
        assert_ne!(rec.access_token, src.access_token);
    }
    assert_eq!(h.snapshot().state, SandboxState::Running);
    assert_eq!(slot_files(&s.ctx).len(), 4);
    // Hidden from listings, kept while a copy uses it.
    assert!(s.ctx.templates.list(false).iter().all(|t| t.name != point));
    assert!(s.ctx.templates.exists(&point));
    for rec in &made[..2] {
        s.ctx
            .registry
            .get(&rec.spec.sandbox_id)
            .unwrap()
            .destroy("t")
            .await;
    }
    assert!(s.ctx.templates.exists(&point));
    s.ctx
        .registry
        .get(&made[2].spec.sandbox_id)
        .unwrap()
        .destroy("t")
        .await;
    assert!(!s.ctx.templates.exists(&point), "unused fork point removed");

    // A failed fork leaves no copy and no fork point; the source runs on.
    let before = store_entries(&s);
    s.ctx.config.faults.arm("snapshot:copied", Fault::Fail);
    let copies: Vec<_> = (0..2).map(|_| spec(&SandboxId::generate())).collect();
    crate::service::fork(s.ctx.clone(), h.clone(), copies.clone())
        .await
        .unwrap_err();
    assert_eq!(store_entries(&s), before);
    for c in &copies {
        assert!(s.ctx.registry.get(&c.sandbox_id).is_none());
    }
    assert_running(&s, &h.snapshot());
}

#[tokio::test]
async fn pooled_vms_are_taken_once_and_evicted_under_the_registry_lock() {
    let s = setup().await;
    let (pool_id, _) = running(&s).await;
    let h = s.ctx.registry.get(&pool_id).unwrap();
    h.freeze_for_pool().await.unwrap();
    assert!(h.snapshot().pooled);
    assert_eq!(s.log.all(), ["vmm.pause"]);
    // A create of another shape does not take it; one of the same shape does,
    // and only once (the entry is re-keyed at once).
    let mut other = spec(&SandboxId::generate());
    other.memory_mb = 512;
    assert!(s.ctx.registry.take_pooled(&other).is_none());
    let want = spec(&SandboxId::generate());
    let taken = s.ctx.registry.take_pooled(&want).expect("pooled VM taken");
    assert!(s.ctx.registry.get(&pool_id).is_none());
    assert!(s.ctx.registry.get(&want.sandbox_id).is_some());
    let again = spec(&SandboxId::generate());
    assert!(s.ctx.registry.take_pooled(&again).is_none(), "taken twice");
    // Nor is a pooled VM being claimed evicted.
    assert!(s.ctx.registry.evict_pooled(9, |_| true).is_empty());
    let token_before = taken.snapshot().access_token;
    let rec = taken.claim(want.clone()).await.unwrap();
    assert_eq!(rec.spec.sandbox_id, want.sandbox_id);
    assert_eq!(
        rec.vm_id.as_ref(),
        Some(&pool_id),
        "host resources keep their name"
    );
    assert!(!rec.pooled && rec.state == SandboxState::Running);
    assert_ne!(rec.access_token, token_before, "a new token at the claim");

    // A second pooled VM is evicted (and then destroyed by the caller).
    let (p2, _) = running(&s).await;
    s.ctx
        .registry
        .get(&p2)
        .unwrap()
        .freeze_for_pool()
        .await
        .unwrap();
    let evicted = s.ctx.registry.evict_pooled(9, |_| true);
    assert_eq!(evicted.len(), 1);
    assert!(s.ctx.registry.get(&p2).is_none());
    evicted[0].destroy("test").await;
    // The claimed sandbox is destroyed under its own ID, releasing the pooled names.
    s.ctx
        .registry
        .get(&want.sandbox_id)
        .unwrap()
        .destroy("test")
        .await;
    assert!(slot_files(&s.ctx).is_empty());
}

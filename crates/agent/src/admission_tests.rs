//! Host admission against the fake VMM/disk/network: every limit refuses with a
//! message naming it, before anything is taken, and concurrent creates never
//! overshoot a limit.

use std::sync::Arc;

use connectrpc::ErrorCode;
use hearth_types::SandboxId;

use crate::admission::Refusal;
use crate::fake_tests::{setup_with, slot_files, spec, Faults, Setup};
use crate::registry::InsertError;
use crate::sandbox::{start_create, StartError};
use crate::AgentConfig;

async fn host(adjust: impl FnOnce(&mut AgentConfig)) -> Setup {
    setup_with(Faults::default(), None, |c| {
        c.capacity.host_memory_mb = Some(1 << 20);
        c.capacity.vcpu_limit = Some(1000);
        c.capacity.disk_reserve_mb = 0;
        adjust(c);
    })
    .await
}

fn refusal(e: StartError) -> Refusal {
    let connect = crate::service::start_error(&e);
    assert_eq!(connect.code, ErrorCode::ResourceExhausted, "{e}");
    match e {
        StartError::Registry(InsertError::Refused(r)) => {
            assert_eq!(connect.message.as_deref(), Some(r.to_string().as_str()));
            r
        }
        other => panic!("not a refusal: {other}"),
    }
}

/// Nothing was taken for a refused create.
fn nothing_taken(s: &Setup, id: &SandboxId) {
    assert!(s.ctx.registry.get(id).is_none());
    assert!(!s.ctx.sandbox_dir(id).exists());
}

#[tokio::test]
async fn memory_limit_names_the_numbers() {
    let s = host(|c| {
        c.capacity.host_memory_mb = Some(1024 + 600);
        c.capacity.memory_reserve_mb = 1024;
    })
    .await;
    let first = SandboxId::generate();
    let mut sp = spec(&first);
    sp.memory_mb = 400;
    start_create(&s.ctx, sp).unwrap().await.unwrap().unwrap();
    let id = SandboxId::generate();
    let mut sp = spec(&id);
    sp.memory_mb = 256;
    let r = refusal(start_create(&s.ctx, sp).unwrap_err());
    assert_eq!(
        r.to_string(),
        "host memory: this sandbox needs 256 MiB, 200 MiB of 600 MiB left (overcommit 1.0)"
    );
    nothing_taken(&s, &id);
    assert_eq!(slot_files(&s.ctx).len(), 1);
    // Destroying the first frees its memory.
    s.ctx.registry.get(&first).unwrap().destroy("test").await;
    let mut sp = spec(&id);
    sp.memory_mb = 256;
    start_create(&s.ctx, sp).unwrap().await.unwrap().unwrap();
}

#[tokio::test]
async fn vcpu_limit_and_disk_reserve_refuse() {
    let s = host(|c| c.capacity.vcpu_limit = Some(2)).await;
    let id = SandboxId::generate();
    let mut sp = spec(&id);
    sp.vcpus = 3;
    let r = refusal(start_create(&s.ctx, sp).unwrap_err());
    assert_eq!(
        r.to_string(),
        "host vCPUs: this sandbox needs 3, 2 of 2 left"
    );
    nothing_taken(&s, &id);

    // A reserve larger than any disk: every create is refused.
    let s = host(|c| c.capacity.disk_reserve_mb = u64::MAX / 4).await;
    let r = refusal(start_create(&s.ctx, spec(&id)).unwrap_err());
    assert!(
        r.to_string()
            .starts_with("host disk: this sandbox needs 64 MiB, 0 MiB free"),
        "{r}"
    );
    nothing_taken(&s, &id);
    assert!(slot_files(&s.ctx).is_empty());
}

#[tokio::test]
async fn failed_creates_give_their_place_back() {
    let s = setup_with(
        Faults {
            disk: true,
            ..Default::default()
        },
        None,
        |c| c.max_sandboxes = 1,
    )
    .await;
    for _ in 0..3 {
        let id = SandboxId::generate();
        let err = start_create(&s.ctx, spec(&id)).unwrap().await.unwrap();
        assert!(err.is_err(), "the disk fault must fail the create");
    }
    assert_eq!(s.ctx.registry.usage().sandboxes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_creates_against_five_places_give_five() {
    let s = host(|c| c.max_sandboxes = 5).await;
    let ctx = Arc::clone(&s.ctx);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let id = SandboxId::generate();
                match start_create(&ctx, spec(&id)) {
                    Ok(reply) => Ok(reply.await.unwrap().unwrap()),
                    Err(e) => Err(refusal(e)),
                }
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(rec) => created.push(rec),
            Err(r) => {
                assert_eq!(r, Refusal::Sandboxes { max: 5 });
                assert_eq!(
                    r.to_string(),
                    "host sandboxes: this host runs its maximum of 5 sandboxes"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((created.len(), refused), (5, 15));
    assert_eq!(s.ctx.registry.len(), 5);
    assert_eq!(slot_files(&s.ctx).len(), 5);
    let dirs = std::fs::read_dir(s.ctx.sandboxes_dir()).unwrap().count();
    assert_eq!(dirs, 5, "a refused create left a run directory");
    for rec in &created {
        let h = s.ctx.registry.get(&rec.spec.sandbox_id).unwrap();
        h.destroy("test").await;
    }
    assert_eq!(s.ctx.registry.usage(), Default::default());
    assert!(slot_files(&s.ctx).is_empty());
}

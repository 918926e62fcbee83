//! End-to-end tests of the host agent through its Connect client and proxy, with
//! real QEMU (TCG), network namespaces, nftables and disks.
//!
//! Tests that boot a guest need `$HEARTH_IMAGES_DIR` (default
//! /var/lib/hearth/images) with `kernel/vmlinux` and `templates/minimal`; without
//! them they SKIP loudly (build them with `scripts/build-images.sh`). Each test
//! uses its own temporary run directory; slots are host-wide as in production.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use connectrpc::ErrorCode;
use hearth_agent::{Accel, Agent};
use hearth_proto::hearth::agent::v1 as pb;
use hearth_types::SandboxId;
use http_body_util::BodyExt;

mod common;
use common::{client, config, eventually, images_dir, init_tracing, real_images, try_exec, Client};

fn spec(id: &SandboxId, template: &str, expires_at_unix_ms: i64) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        spec: pb::SandboxSpec {
            sandbox_id: id.to_string(),
            template: template.to_owned(),
            vcpus: 1,
            memory_mb: 256,
            disk_size_mb: 256,
            expires_at_unix_ms,
            team_id: "test".into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    }
}

/// Run a command in the guest through the agent's proxy; stdout and exit code.
async fn exec(agent: SocketAddr, id: &SandboxId, cmd: &str, args: &[&str]) -> (String, i32) {
    let (out, code) = try_exec(agent, id, cmd, args)
        .await
        .expect("process.Start through the proxy");
    (out, code.expect("end event"))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// GET through the agent's proxy; returns the status code.
async fn proxy_get(agent: SocketAddr, path: &str) -> u16 {
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let uri: http::Uri = format!("http://{agent}{path}").parse().unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .expect("proxy request timed out")
        .expect("proxy request failed");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// Upload `len` bytes in 64 KiB chunks through the proxy (`POST /files`, raw
/// body) and read them back (`GET /files`): bodies must stream both ways intact.
async fn file_roundtrip(agent: SocketAddr, id: &SandboxId, len: usize) {
    use http_body_util::{BodyStream, StreamBody};
    let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
    let chunks: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>> = data
        .chunks(64 * 1024)
        .map(|c| Ok(hyper::body::Frame::data(bytes::Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let url = format!("http://{agent}/sandboxes/{id}/envd/files?path=/tmp/blob&username=root");
    let req = http::Request::post(&url)
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let resp = client.request(req).await.expect("upload through proxy");
    let status = resp.status();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 200, "upload: {}", String::from_utf8_lossy(&text));

    let get: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let resp = get
        .get(url.parse().unwrap())
        .await
        .expect("download through proxy");
    assert_eq!(resp.status(), 200);
    let mut got = Vec::with_capacity(len);
    let mut frames = 0;
    let mut stream = BodyStream::new(resp.into_body());
    while let Some(frame) = futures::StreamExt::next(&mut stream).await {
        if let Ok(d) = frame.unwrap().into_data() {
            frames += 1;
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(got.len(), len);
    assert!(got == data, "downloaded bytes differ");
    assert!(frames > 1, "download arrived in one frame: not streamed");
}

/// Host resources a sandbox held, read from its state file while it runs.
#[derive(Debug, Clone)]
struct Footprint {
    id: SandboxId,
    run_dir: PathBuf,
    pid: u32,
    slot: u32,
    disk: PathBuf,
}

fn footprint(run: &Path, id: &SandboxId) -> Footprint {
    let run_dir = run.join("sandboxes").join(id.as_str());
    let rec = hearth_agent::state::load(&run_dir).expect("state.json of a running sandbox");
    Footprint {
        id: id.clone(),
        run_dir,
        pid: rec.pid.expect("pid recorded"),
        slot: rec.slot.expect("slot recorded"),
        disk: rec.disk.expect("disk recorded").path,
    }
}

fn netns_exists(id: &SandboxId) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(&format!("hearth-{id}")))
}

fn slot_owned_by(slot: u32, id: &SandboxId) -> bool {
    std::fs::read_to_string(format!("/run/hearth/slots/{slot}"))
        .map(|s| s.lines().next() == Some(id.as_str()))
        .unwrap_or(false)
}

/// PIDs of live processes whose command line names `id`.
fn pids_naming(id: &SandboxId) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            hearth_agent::vmm::pid_alive(pid)
                && hearth_agent::vmm::pid_cmdline_contains(pid, id.as_str())
        })
        .collect()
}

/// Assert nothing named after the sandbox is left: process, netns, slot, run dir.
fn assert_gone_by_id(run: &Path, id: &SandboxId) {
    assert_eq!(pids_naming(id), Vec::<u32>::new(), "process of {id} left");
    assert!(!netns_exists(id), "netns hearth-{id} left");
    let slots: Vec<_> = std::fs::read_dir("/run/hearth/slots")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_to_string(e.path())
                        .map(|s| s.lines().next() == Some(id.as_str()))
                        .unwrap_or(false)
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(slots.is_empty(), "slot left: {slots:?}");
    assert!(
        !run.join("sandboxes").join(id.as_str()).exists(),
        "run dir left"
    );
}

/// Assert nothing of the sandbox is left on the host.
fn assert_gone(f: &Footprint) {
    assert_gone_by_id(f.run_dir.parent().and_then(Path::parent).unwrap(), &f.id);
    assert!(
        !hearth_agent::vmm::pid_alive(f.pid)
            || !hearth_agent::vmm::pid_cmdline_contains(f.pid, f.id.as_str()),
        "QEMU pid {} still alive",
        f.pid
    );
    assert!(!netns_exists(&f.id), "netns hearth-{} left", f.id);
    assert!(
        !Path::new(&format!("/sys/class/net/hv{}", f.slot)).exists()
            || !slot_owned_by(f.slot, &f.id),
        "veth hv{} left",
        f.slot
    );
    assert!(
        !slot_owned_by(f.slot, &f.id),
        "slot {} still claimed",
        f.slot
    );
    assert!(!f.run_dir.exists(), "run dir {} left", f.run_dir.display());
    assert!(!f.disk.exists(), "disk {} left", f.disk.display());
}

/// A fake images dir: a template whose "rootfs" exists, and a kernel that is not
/// one. Enough for validation and for a boot that fails fast.
fn fake_images(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("templates/broken")).unwrap();
    std::fs::create_dir_all(images.join("kernel")).unwrap();
    let f = std::fs::File::create(images.join("templates/broken/rootfs.ext4")).unwrap();
    f.set_len(16 << 20).unwrap();
    std::fs::write(images.join("kernel/vmlinux"), b"this is not a kernel").unwrap();
    images
}

fn sandbox_dirs(run: &Path) -> usize {
    std::fs::read_dir(run.join("sandboxes"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_create_nothing() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let images = fake_images(tmp.path());
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    // A second agent on the same run directory is refused.
    let second = Agent::start(config(&images, &run)).await;
    assert!(
        matches!(second, Err(hearth_agent::AgentError::RunDirBusy { .. })),
        "second agent started on the same run dir"
    );

    let id = SandboxId::generate();
    let err = c
        .create_sandbox(spec(&id, "nosuchtemplate", 0))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound, "{err:?}");

    let err = c.create_sandbox(spec(&id, "../etc", 0)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");

    let mut bad = spec(&id, "broken", 0);
    bad.spec.as_option_mut().unwrap().sandbox_id = "sb-../../x".into();
    let err = c.create_sandbox(bad).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");

    let mut big = spec(&id, "broken", 0);
    big.spec.as_option_mut().unwrap().vcpus = 1000;
    let err = c.create_sandbox(big).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");
    assert!(err.message.unwrap_or_default().contains("vcpus"));

    let err = c
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    let gone = c
        .destroy_sandbox(pb::DestroySandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert!(!gone.existed);
    assert_eq!(
        proxy_get(agent.local_addr(), &format!("/sandboxes/{id}/envd/health")).await,
        404
    );

    let info = c
        .info(pb::InfoRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert_eq!(info.vmm, "qemu");
    assert_eq!(info.accel, "tcg");
    assert_eq!(info.templates, ["broken"]);
    assert!(info.host_id.starts_with("host-"));
    assert_eq!(sandbox_dirs(&run), 0);
    assert!(!netns_exists(&id));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_smaller_than_the_template_is_refused() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let images = fake_images(tmp.path());
    // A template image of 100 MiB and one byte: the smallest disk is 101 MiB.
    let big = images.join("templates/big");
    std::fs::create_dir_all(&big).unwrap();
    let f = std::fs::File::create(big.join("rootfs.ext4")).unwrap();
    f.set_len((100 << 20) + 1).unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    let id = SandboxId::generate();

    let mut small = spec(&id, "big", 0);
    small.spec.as_option_mut().unwrap().disk_size_mb = 100;
    let err = c.create_sandbox(small).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err:?}");
    let msg = err.message.unwrap_or_default();
    assert!(msg.contains("minimum is 101"), "{msg}");
    assert_eq!(sandbox_dirs(&run), 0);
    assert!(!netns_exists(&id));
    let err = c
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);

    // The minimum itself passes validation (and then fails to boot the fake kernel).
    let mut exact = spec(&id, "big", 0);
    exact.spec.as_option_mut().unwrap().disk_size_mb = 101;
    let err = c.create_sandbox(exact).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Internal, "{err:?}");
    assert!(
        err.message
            .unwrap_or_default()
            .contains("VM exited during boot"),
        "the minimum disk size was refused"
    );
    assert_eq!(sandbox_dirs(&run), 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_boot_leaks_nothing() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let images = fake_images(tmp.path());
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    let id = SandboxId::generate();
    let err = c.create_sandbox(spec(&id, "broken", 0)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Internal, "{err:?}");
    let msg = err.message.unwrap_or_default();
    assert!(msg.contains("VM exited during boot"), "{msg}");
    assert_eq!(sandbox_dirs(&run), 0, "run dir left");
    assert_gone_by_id(&run, &id);
    let list = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert!(list.sandboxes.is_empty());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_reach_through_proxy_destroy() {
    init_tracing();
    let Some(images) = real_images("create_reach_through_proxy_destroy") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    let id = SandboxId::generate();

    let t = Instant::now();
    let created = c
        .create_sandbox(spec(&id, "minimal", 0))
        .await
        .expect("create")
        .into_owned();
    let create_ms = t.elapsed().as_millis();
    let st = created.sandbox.as_option().unwrap();
    assert_eq!(
        st.state.as_known(),
        Some(pb::SandboxState::SANDBOX_STATE_RUNNING)
    );
    assert!(
        st.guest_address.starts_with("10.11."),
        "{}",
        st.guest_address
    );
    let fp = footprint(&run, &id);
    assert!(hearth_agent::vmm::pid_alive(fp.pid));
    assert!(netns_exists(&id));

    let t = Instant::now();
    assert_eq!(
        proxy_get(agent.local_addr(), &format!("/sandboxes/{id}/envd/health")).await,
        204
    );
    let proxy_ms = t.elapsed().as_millis();

    // Exec streams through the proxy (the control plane's path).
    let t = Instant::now();
    let (out, code) = exec(
        agent.local_addr(),
        &id,
        "sh",
        &["-c", "echo hello-$((6*7))"],
    )
    .await;
    let exec_ms = t.elapsed().as_millis();
    assert_eq!((out.trim(), code), ("hello-42", 0));
    // Egress is denied: the guest cannot even reach the host end of its own veth.
    let host_veth = hearth_agent::net::slot_addrs(fp.slot)
        .unwrap()
        .host_veth
        .to_string();
    let (out, code) = exec(
        agent.local_addr(),
        &id,
        "ping",
        &["-c", "1", "-W", "2", &host_veth],
    )
    .await;
    assert_ne!(code, 0, "guest reached {host_veth}: {out}");

    let got = c
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert_eq!(
        got.sandbox
            .as_option()
            .unwrap()
            .spec
            .as_option()
            .unwrap()
            .sandbox_id,
        id.as_str()
    );

    // Creating the same ID again is a conflict.
    let err = c.create_sandbox(spec(&id, "minimal", 0)).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);

    let t = Instant::now();
    let d = c
        .destroy_sandbox(pb::DestroySandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    let destroy_ms = t.elapsed().as_millis();
    assert!(d.existed);
    assert_gone(&fp);
    assert_eq!(
        proxy_get(agent.local_addr(), &format!("/sandboxes/{id}/envd/health")).await,
        404
    );
    println!(
        "MEASURED create_to_health_ms={create_ms} boot_ms={} proxy_health_ms={proxy_ms} exec_ms={exec_ms} destroy_ms={destroy_ms}",
        st.boot_ms
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_destroys_expired_sandboxes() {
    init_tracing();
    let Some(images) = real_images("reaper_destroys_expired_sandboxes") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    let id = SandboxId::generate();
    let expires = now_ms() + 8000;
    // Long enough for a TCG boot (~3-5 s) so the reaper usually meets a running
    // sandbox. A slower boot is cancelled by the reaper (Aborted): either way the
    // sandbox must be gone soon after its deadline and not before.
    match c.create_sandbox(spec(&id, "minimal", expires)).await {
        Ok(_) => {
            if now_ms() < expires - 300 {
                assert!(
                    agent.sandbox_ids().contains(&id),
                    "reaped before its deadline"
                );
            }
        }
        Err(e) => assert_eq!(e.code, ErrorCode::Aborted, "{e:?}"),
    }
    let wait = Duration::from_millis((expires - now_ms()).max(0) as u64 + 6000);
    assert!(
        eventually(wait, || !agent.sandbox_ids().contains(&id)).await,
        "reaper did not destroy the expired sandbox"
    );
    assert!(now_ms() >= expires, "destroyed before its deadline");
    assert_gone_by_id(&run, &id);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_readopts_or_cleans() {
    init_tracing();
    let Some(images) = real_images("crash_and_restart_readopts_or_cleans") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let host_id = agent.host_id().clone();
    let c = client(&agent);
    let keep = SandboxId::generate();
    let dies = SandboxId::generate();
    for id in [&keep, &dies] {
        c.create_sandbox(spec(id, "minimal", 0))
            .await
            .expect("create");
    }
    let fp_keep = footprint(&run, &keep);
    let fp_dies = footprint(&run, &dies);

    // Crash: every task dropped, no cleanup. Then one VM dies while we are down.
    agent.abort();
    // SAFETY: kill(2) on a QEMU process this test started.
    unsafe { libc::kill(fp_dies.pid as i32, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(5), || !hearth_agent::vmm::pid_alive(
            fp_dies.pid
        ))
        .await
    );
    assert!(netns_exists(&dies), "crash must not have cleaned up");

    let agent = Agent::start(config(&images, &run)).await.unwrap();
    assert_eq!(agent.host_id(), &host_id, "host ID survives a restart");
    assert_eq!(agent.recovery().adopted, vec![keep.clone()]);
    assert!(agent.recovery().cleaned.contains(&dies.to_string()));
    assert_gone(&fp_dies);
    let c = client(&agent);
    let list = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert_eq!(list.sandboxes.len(), 1);
    assert_eq!(
        proxy_get(
            agent.local_addr(),
            &format!("/sandboxes/{keep}/envd/health")
        )
        .await,
        204
    );

    // Graceful shutdown keeps VMs; the next start adopts again.
    agent.shutdown().await;
    assert!(hearth_agent::vmm::pid_alive(fp_keep.pid));
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    assert_eq!(agent.recovery().adopted, vec![keep.clone()]);
    agent.destroy_all().await;
    assert_gone(&fp_keep);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_accel_probe_decides_quickly() {
    init_tracing();
    let Some(images) = real_images("auto_accel_probe_decides_quickly") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(&images, &tmp.path().join("run"));
    cfg.accel = Accel::Auto;
    let t = Instant::now();
    let agent = Agent::start(cfg).await.unwrap();
    let took = t.elapsed();
    let (accel, reason) = agent.accel();
    println!(
        "MEASURED auto_accel={accel} reason={reason:?} start_ms={}",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(10), "probe took {took:?}");
    assert!(!reason.is_empty());
    if accel == "tcg" {
        assert!(
            reason.contains("probe") || reason.contains("/dev/kvm"),
            "{reason}"
        );
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_create_and_destroy_while_starting_leak_nothing() {
    init_tracing();
    let Some(images) = real_images("cancelled_create_and_destroy_while_starting_leak_nothing")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);

    // The caller gives up after 300 ms: the create carries on in its actor.
    let id = SandboxId::generate();
    let err = c
        .create_sandbox_with_options(
            spec(&id, "minimal", 0),
            connectrpc::client::CallOptions::default().with_timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::DeadlineExceeded, "{err:?}");
    let get = |c: Client, id: SandboxId| async move {
        c.get_sandbox(pb::GetSandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(|r| {
            r.into_owned()
                .sandbox
                .into_option()
                .unwrap()
                .state
                .as_known()
        })
    };
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st = get(c.clone(), id.clone()).await.unwrap();
        if st == Some(pb::SandboxState::SANDBOX_STATE_RUNNING) {
            break;
        }
        assert!(Instant::now() < end, "never reached running: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        proxy_get(agent.local_addr(), &format!("/sandboxes/{id}/envd/health")).await,
        204
    );

    // A destroy that arrives while the VM boots cancels the boot.
    let early = SandboxId::generate();
    let c2 = c.clone();
    let early2 = early.clone();
    let create = tokio::spawn(async move { c2.create_sandbox(spec(&early2, "minimal", 0)).await });
    assert!(
        eventually(Duration::from_secs(10), || run
            .join("sandboxes")
            .join(early.as_str())
            .join("qemu.log")
            .exists())
        .await
    );
    let d = c
        .destroy_sandbox(pb::DestroySandboxRequest {
            sandbox_id: early.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert!(d.existed);
    let err = create.await.unwrap().unwrap_err();
    assert_eq!(err.code, ErrorCode::Aborted, "{err:?}");
    assert_gone_by_id(&run, &early);

    agent.destroy_all().await;
    assert_gone_by_id(&run, &id);
    assert_eq!(sandbox_dirs(&run), 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_creates_with_copy_disks() {
    init_tracing();
    let Some(images) = real_images("parallel_creates_with_copy_disks") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut cfg = config(&images, &run);
    cfg.disk = hearth_agent::DiskKind::Copy;
    let agent = Agent::start(cfg).await.unwrap();
    let c = client(&agent);
    let ids = [SandboxId::generate(), SandboxId::generate()];
    let creates = ids.iter().map(|id| {
        let c = c.clone();
        let id = id.clone();
        async move { c.create_sandbox(spec(&id, "minimal", 0)).await }
    });
    for r in futures::future::join_all(creates).await {
        r.expect("parallel create");
    }
    let fps: Vec<_> = ids.iter().map(|id| footprint(&run, id)).collect();
    assert_ne!(fps[0].slot, fps[1].slot);
    for fp in &fps {
        assert_eq!(fp.disk.extension().and_then(|e| e.to_str()), Some("raw"));
        assert_eq!(
            proxy_get(
                agent.local_addr(),
                &format!("/sandboxes/{}/envd/health", fp.id)
            )
            .await,
            204
        );
    }
    file_roundtrip(agent.local_addr(), &ids[0], 4 << 20).await;
    let info = c
        .info(pb::InfoRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert_eq!(info.running, 2);
    agent.destroy_all().await;
    for fp in &fps {
        assert_gone(fp);
    }
    agent.shutdown().await;
}

/// Environment variable that turns `child_agent_process` into a real agent.
const CHILD_ENV: &str = "HEARTH_AGENT_TEST_CHILD_RUN_DIR";

/// Not a test on its own: when `crash_of_the_agent_process_is_survived` re-runs
/// this test binary with [`CHILD_ENV`] set, this starts an agent, creates one
/// sandbox, prints its ID and waits to be SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_agent_process() {
    let Some(run) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    init_tracing();
    let agent = Agent::start(config(&images_dir(), Path::new(&run)))
        .await
        .unwrap();
    let id = SandboxId::generate();
    client(&agent)
        .create_sandbox(spec(&id, "minimal", 0))
        .await
        .expect("create in child agent");
    println!("CHILD_SANDBOX={id}");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_of_the_agent_process_is_survived() {
    use std::io::BufRead;
    init_tracing();
    let Some(images) = real_images("crash_of_the_agent_process_is_survived") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_agent_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &run)
        .env("HEARTH_IMAGES_DIR", &images)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let id = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("CHILD_SANDBOX=").map(str::to_owned))
    })
    .await
    .unwrap();
    // SIGKILL the agent process we started: no cleanup of any kind runs.
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    let id: SandboxId = id.expect("child agent created a sandbox").parse().unwrap();
    let fp = footprint(&run, &id);
    assert!(
        hearth_agent::vmm::pid_alive(fp.pid),
        "VM died with its agent"
    );

    let agent = Agent::start(config(&images, &run)).await.unwrap();
    assert_eq!(agent.recovery().adopted, vec![id.clone()]);
    assert_eq!(
        proxy_get(agent.local_addr(), &format!("/sandboxes/{id}/envd/health")).await,
        204
    );
    let d = client(&agent)
        .destroy_sandbox(pb::DestroySandboxRequest {
            sandbox_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    assert!(d.existed);
    assert_gone(&fp);
    agent.shutdown().await;
}

/// `df -k /` in the guest: (size, available) in KiB.
fn parse_df_root(out: &str) -> Option<(u64, u64)> {
    // busybox: "Filesystem 1K-blocks Used Available Use% Mounted on" then one line.
    let line = out.lines().find(|l| l.trim_end().ends_with(" /"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let n = f.len();
    (n >= 6).then_some(())?;
    Some((f[n - 5].parse().ok()?, f[n - 3].parse().ok()?))
}

/// The guest grows its root filesystem to the requested disk before it serves.
/// `HEARTH_TEST_DISK_MB` overrides the 512 MiB disk (to measure the grow time,
/// printed from the guest's console line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_filesystem_fills_the_disk() {
    init_tracing();
    let Some(images) = real_images("root_filesystem_fills_the_disk") else {
        return;
    };
    let disk_mb: u32 = std::env::var("HEARTH_TEST_DISK_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    let id = SandboxId::generate();
    let mut req = spec(&id, "minimal", 0);
    req.spec.as_option_mut().unwrap().disk_size_mb = disk_mb;
    let created = c.create_sandbox(req).await.expect("create").into_owned();
    let boot_ms = created.sandbox.as_option().unwrap().boot_ms;
    let fp = footprint(&run, &id);

    // The guest grows / before it serves, so the first `df` already sees it.
    let (out, code) = exec(agent.local_addr(), &id, "df", &["-k", "/"]).await;
    assert_eq!(code, 0, "{out}");
    let (size_kb, avail_kb) = parse_df_root(&out).unwrap_or_else(|| panic!("df output: {out}"));
    assert!(
        size_kb > u64::from(disk_mb) * 1024 * 8 / 10,
        "/ is {size_kb} KiB on a {disk_mb} MiB disk: {out}"
    );

    let (out, code) = exec(
        agent.local_addr(),
        &id,
        "sh",
        &[
            "-c",
            "dd if=/dev/zero of=/root/big bs=1M count=100 2>&1 && sync && ls -l /root/big",
        ],
    )
    .await;
    assert_eq!(code, 0, "writing 100 MiB to /root failed: {out}");
    assert!(out.contains(&(100u64 << 20).to_string()), "{out}");

    let console = std::fs::read_to_string(fp.run_dir.join("console.log")).unwrap_or_default();
    let grew = console
        .lines()
        .find(|l| l.contains("grew /"))
        .unwrap_or("(no grow line)")
        .trim()
        .to_owned();
    c.destroy_sandbox(pb::DestroySandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_gone(&fp);
    println!(
        "MEASURED disk_mb={disk_mb} boot_ms={boot_ms} df_size_kb={size_kb} df_avail_kb={avail_kb} console: {grew}"
    );
    agent.shutdown().await;
}

/// Any local user can open TCP connections to the agent's port: one that sends nothing,
/// or half a request head, is closed after the header timeout instead of holding a
/// connection slot for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connections_to_the_agent_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(images) = real_images("silent_and_half_sent_connections_to_the_agent_are_closed")
    else {
        return;
    };
    let run = tempfile::tempdir().unwrap();
    let mut cfg = config(&images, run.path());
    cfg.listener.header_read_timeout = Duration::from_millis(500);
    cfg.listener.max_connections = 2;
    let agent = Agent::start(cfg).await.unwrap();
    let addr = agent.local_addr();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for s in [&mut silent, &mut half] {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a connection was held open for 10 s");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // Both slots are free again: the agent still answers.
    assert_eq!(proxy_get(addr, "/healthz").await, 200);
    agent.shutdown().await;
}

//! Confinement of sandbox VMs on real QEMU (TCG): each VMM under its own
//! unprivileged uid, seccomp, a cgroup with limits, `-no-reboot`, a bounded
//! console, recovery by pid file, and the start-up tool check.
//!
//! VM tests need `$HEARTH_IMAGES_DIR` (default /var/lib/hearth/images) and root;
//! without images they SKIP loudly. The host here has cgroup v1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_agent::vmm::cgroup::read_u64;
use hearth_agent::{Agent, AgentError, RunningAgent};
use hearth_proto::hearth::agent::v1 as pb;
use hearth_types::SandboxId;

mod common;
use common::{client, config, eventually, init_tracing, real_images, try_exec, Client};

async fn create(c: &Client, id: &SandboxId) {
    c.create_sandbox(pb::CreateSandboxRequest {
        spec: pb::SandboxSpec {
            sandbox_id: id.to_string(),
            template: "minimal".into(),
            vcpus: 1,
            memory_mb: 256,
            disk_size_mb: 256,
            team_id: "test".into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    })
    .await
    .expect("create");
}

async fn status(c: &Client, id: &SandboxId) -> pb::SandboxStatus {
    c.get_sandbox(pb::GetSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    })
    .await
    .expect("get_sandbox")
    .into_owned()
    .sandbox
    .into_option()
    .expect("sandbox in answer")
}

/// Run `sh -c script` in the guest through the agent's proxy (envd
/// `process.Start`). Returns stdout and the exit code, or `None` when the stream
/// broke (the VM went away mid-command).
async fn sh(agent: SocketAddr, id: &SandboxId, script: &str) -> Option<(String, i32)> {
    let (out, code) = try_exec(agent, id, "sh", &["-c", script]).await.ok()?;
    Some((out, code?))
}

fn pid_of(run: &Path, id: &SandboxId) -> u32 {
    let rec = hearth_agent::state::load(&run.join("sandboxes").join(id.as_str()))
        .expect("state.json of a running sandbox");
    rec.pid.expect("pid recorded")
}

/// A field of /proc/PID/status, e.g. "Uid" or "Seccomp".
fn proc_status(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// The v1 cgroup directory of `id` in `controller` (this host has cgroup v1).
fn cgroup_dir(agent: &RunningAgent, controller: &str, id: &SandboxId) -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
        .join(controller)
        .join("hearth")
        .join(agent.host_id().as_str())
        .join(id.as_str())
}

fn is_v1() -> bool {
    Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tools_refuse_start_and_name_each_one() {
    init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), &tmp.path().join("run"));
    cfg.qemu_binary = tmp.path().join("no-such-qemu");
    let err = match Agent::start(cfg).await {
        Err(e) => e,
        Ok(_) => panic!("the agent started without QEMU"),
    };
    assert!(matches!(err, AgentError::MissingTools { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("no-such-qemu not found"), "{msg}");
    assert!(msg.contains("bash scripts/setup.sh"), "{msg}");
    assert!(!msg.contains("qemu-img"), "qemu-img is present: {msg}");
    // Nothing was created: the check runs first.
    assert!(!tmp.path().join("run").exists());
}

/// Two sandboxes: each QEMU has its own non-zero uid, seccomp in filter mode and
/// its cgroup with the limits; a guest that allocates far past its memory
/// takes down nothing but itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_run_confined_and_a_memory_hog_hurts_only_itself() {
    init_tracing();
    let Some(images) = real_images("vms_run_confined_and_a_memory_hog_hurts_only_itself") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    let (a, b) = (SandboxId::generate(), SandboxId::generate());
    create(&c, &a).await;
    create(&c, &b).await;
    let (pa, pb_) = (pid_of(&run, &a), pid_of(&run, &b));

    let uid = |pid| -> u32 {
        proc_status(pid, "Uid")
            .split_whitespace()
            .next()
            .and_then(|u| u.parse().ok())
            .expect("uid")
    };
    let (ua, ub) = (uid(pa), uid(pb_));
    assert_ne!(ua, 0, "QEMU of {a} runs as root");
    assert_ne!(ub, 0, "QEMU of {b} runs as root");
    assert_ne!(ua, ub, "two VMs share uid {ua}");
    assert!(ua >= hearth_agent::vmm::DEFAULT_UID_BASE, "{ua}");
    for pid in [pa, pb_] {
        assert_eq!(
            proc_status(pid, "Seccomp"),
            "2",
            "QEMU {pid} without seccomp"
        );
    }
    // Files at rest: the run dirs and what is in them belong to root alone.
    assert_eq!(mode(&run), 0o700);
    assert_eq!(mode(&run.join("sandboxes")), 0o700);
    let dir_a = run.join("sandboxes").join(a.as_str());
    assert_eq!(mode(&dir_a), 0o700);
    for f in ["state.json", "console.log", "qemu.log", "qemu.pid"] {
        assert_eq!(mode(&dir_a.join(f)), 0o600, "{f}");
    }

    assert!(
        is_v1(),
        "this test checks the cgroup v1 layout of this host"
    );
    let mem = cgroup_dir(&agent, "memory", &a);
    let limit = read_u64(&mem.join("memory.limit_in_bytes")).expect("memory limit");
    let overhead = u64::from(hearth_agent::vmm::qemu::DEFAULT_MEMORY_OVERHEAD_MB);
    assert_eq!(limit, (256 + overhead) << 20);
    assert_eq!(
        read_u64(&cgroup_dir(&agent, "cpu", &a).join("cpu.cfs_quota_us")),
        Some(100_000)
    );
    assert_eq!(
        read_u64(&cgroup_dir(&agent, "pids", &a).join("pids.max")),
        Some(u64::from(hearth_agent::vmm::qemu::DEFAULT_PIDS_MAX))
    );
    for ctl in ["memory", "cpu", "pids"] {
        let procs = std::fs::read_to_string(cgroup_dir(&agent, ctl, &a).join("cgroup.procs"))
            .unwrap_or_default();
        assert!(
            procs.lines().any(|l| l.trim() == pa.to_string()),
            "QEMU {pa} not in its {ctl} cgroup: {procs:?}"
        );
    }
    let booted = read_u64(&mem.join("memory.max_usage_in_bytes")).unwrap_or(0);
    eprintln!(
        "MEASURE cgroup memory peak after boot: {} MiB (limit {} MiB)",
        booted >> 20,
        limit >> 20
    );

    // The hog: a tmpfs larger than the guest's memory, filled. The guest runs
    // out of memory; the host cgroup keeps QEMU at its limit.
    let addr = agent.local_addr();
    let hog_id = a.clone();
    let hog = tokio::spawn(async move {
        sh(
            addr,
            &hog_id,
            "mkdir -p /hog && mount -t tmpfs -o size=2g none /hog && \
             dd if=/dev/zero of=/hog/x bs=1M count=1024 2>&1; echo done",
        )
        .await
    });
    let mut peak = 0;
    let t = Instant::now();
    while !hog.is_finished() && t.elapsed() < Duration::from_secs(120) {
        if let Some(u) = read_u64(&mem.join("memory.max_usage_in_bytes")) {
            peak = peak.max(u);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let oom = std::fs::read_to_string(mem.join("memory.oom_control")).unwrap_or_default();
    // A guest that died mid-command leaves its stream open (see the reboot test).
    let hog_result = if hog.is_finished() {
        hog.await.ok().flatten()
    } else {
        hog.abort();
        None
    };
    eprintln!(
        "MEASURE hog: peak {} MiB of {} MiB, host oom_control {:?}, guest said {:?}",
        peak >> 20,
        limit >> 20,
        oom.replace('\n', " "),
        hog_result
    );
    assert!(peak <= limit, "cgroup usage {peak} above its limit {limit}");

    // The neighbour is untouched and answers.
    let (out, code) = sh(addr, &b, "echo alive").await.expect("exec in B");
    assert_eq!((out.trim(), code), ("alive", 0));
    assert!(hearth_agent::vmm::pid_alive(pb_));
    // A is either still running (the guest's OOM killer ended the hog) or its VM
    // died and the sandbox says so; never anything else.
    let st = status(&c, &a).await;
    let state = st.state.as_known();
    eprintln!("MEASURE hog sandbox after: {state:?} {}", st.error);
    assert!(
        matches!(
            state,
            Some(pb::SandboxState::SANDBOX_STATE_RUNNING | pb::SandboxState::SANDBOX_STATE_ERROR)
        ),
        "{state:?}"
    );

    agent.destroy_all().await;
    for id in [&a, &b] {
        for ctl in ["memory", "cpu", "pids"] {
            assert!(
                !cgroup_dir(&agent, ctl, id).exists(),
                "{ctl} cgroup of {id} left"
            );
        }
    }
    agent.shutdown().await;
}

/// A guest that reboots ends its QEMU (`-no-reboot`); the sandbox is `Error`
/// with a clear reason and nothing answers in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reboot_ends_the_sandbox_in_error() {
    init_tracing();
    let Some(images) = real_images("guest_reboot_ends_the_sandbox_in_error") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    let id = SandboxId::generate();
    create(&c, &id).await;
    let pid = pid_of(&run, &id);
    let addr = agent.local_addr();
    let rid = id.clone();
    // The command dies with the VM: its stream breaks, which is expected.
    let reboot = tokio::spawn(async move { sh(addr, &rid, "echo b > /proc/sysrq-trigger").await });

    assert!(
        eventually(Duration::from_secs(30), || !hearth_agent::vmm::pid_alive(
            pid
        ))
        .await,
        "QEMU survived the guest's reboot"
    );
    // A vanished guest sends no reset: the agent's proxy ends the stream itself once
    // the VM is gone, so the caller is not left waiting.
    let ended = tokio::time::timeout(Duration::from_secs(20), reboot).await;
    assert!(
        ended.is_ok(),
        "the exec stream of a VM that rebooted itself was still open 20 s later"
    );
    let mut st = status(&c, &id).await;
    let end = Instant::now() + Duration::from_secs(10);
    while st.state.as_known() != Some(pb::SandboxState::SANDBOX_STATE_ERROR) && Instant::now() < end
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        st = status(&c, &id).await;
    }
    assert_eq!(
        st.state.as_known(),
        Some(pb::SandboxState::SANDBOX_STATE_ERROR)
    );
    assert!(
        st.error.contains("the VM shut down or rebooted itself"),
        "{}",
        st.error
    );
    // Nothing answers in its place, and no new QEMU was started for it.
    assert!(
        sh(addr, &id, "echo hi").await.is_none(),
        "a guest answered after the reboot"
    );
    assert!(!hearth_agent::vmm::pid_alive(pid));

    c.destroy_sandbox(pb::DestroySandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    })
    .await
    .expect("destroy");
    assert!(
        !run.join("sandboxes").join(id.as_str()).exists(),
        "run dir left"
    );
    assert!(!cgroup_dir(&agent, "memory", &id).exists(), "cgroup left");
    agent.shutdown().await;
}

fn rss_kib() -> u64 {
    proc_status(std::process::id(), "VmRSS")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A guest flooding its serial console leaves `console.log` and its one
/// rotation at or under the cap, and the agent's memory flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_flood_stays_under_the_cap() {
    init_tracing();
    let Some(images) = real_images("console_flood_stays_under_the_cap") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let mut cfg = config(&images, &run);
    let cap: u64 = 64 * 1024;
    cfg.vm.console_cap_bytes = cap;
    let agent = Agent::start(cfg).await.unwrap();
    let c = client(&agent);
    let id = SandboxId::generate();
    create(&c, &id).await;
    let dir = run.join("sandboxes").join(id.as_str());
    let rss_before = rss_kib();

    let (_, code) = sh(
        agent.local_addr(),
        &id,
        "yes 'flood \x1b[31m red' > /dev/ttyS0 & p=$!; sleep 4; kill $p; echo stopped",
    )
    .await
    .expect("flood command");
    assert_eq!(code, 0);
    let log = dir.join("console.log");
    let old = dir.join("console.log.1");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    assert!(
        old.exists(),
        "the flood never filled the log once (rotation missing)"
    );
    assert!(size(&log) <= cap, "console.log is {} > {cap}", size(&log));
    assert!(size(&old) <= cap, "console.log.1 is {} > {cap}", size(&old));
    let rss_after = rss_kib();
    eprintln!(
        "MEASURE console flood: log {} + {} bytes (cap {cap}), test process RSS {rss_before} -> {rss_after} KiB",
        size(&log),
        size(&old)
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew {rss_before} -> {rss_after} KiB"
    );
    // The guest still works and the sandbox is untouched.
    let (out, _) = sh(agent.local_addr(), &id, "echo fine")
        .await
        .expect("exec");
    assert_eq!(out.trim(), "fine");
    agent.destroy_all().await;
    agent.shutdown().await;
}

/// An agent that died before recording QEMU's pid finds the VM by QEMU's pid
/// file (checked against `-name <sb-id>`) and re-adopts it, console included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_finds_qemu_by_its_pid_file() {
    init_tracing();
    let Some(images) = real_images("recovery_finds_qemu_by_its_pid_file") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let agent = Agent::start(config(&images, &run)).await.unwrap();
    let c = client(&agent);
    let id = SandboxId::generate();
    create(&c, &id).await;
    let dir = run.join("sandboxes").join(id.as_str());
    let pid = pid_of(&run, &id);
    agent.abort();
    // As if the agent died right after spawning QEMU: no pid in state.json.
    let mut rec = hearth_agent::state::load(&dir).unwrap();
    rec.pid = None;
    hearth_agent::state::save(&rec).unwrap();

    let agent = Agent::start(config(&images, &run)).await.unwrap();
    assert_eq!(agent.recovery().adopted, vec![id.clone()]);
    assert!(hearth_agent::vmm::pid_alive(pid));
    let c = client(&agent);
    assert_eq!(
        status(&c, &id).await.state.as_known(),
        Some(pb::SandboxState::SANDBOX_STATE_RUNNING)
    );
    // The console is followed again after the restart.
    let (_, code) = sh(
        agent.local_addr(),
        &id,
        "echo RECONNECTED-CONSOLE > /dev/ttyS0",
    )
    .await
    .expect("exec after recovery");
    assert_eq!(code, 0);
    assert!(
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(dir.join("console.log"))
                .map(|s| s.contains("RECONNECTED-CONSOLE"))
                .unwrap_or(false)
        })
        .await,
        "console not followed after recovery"
    );
    agent.destroy_all().await;
    assert!(!hearth_agent::vmm::pid_alive(pid));
    assert!(!cgroup_dir(&agent, "memory", &id).exists(), "cgroup left");
    agent.shutdown().await;
}

//! Pause, resume, snapshot to template, warm create and fork through the
//! agent's Connect API and proxy, on real VMs (QEMU under TCG) in real network
//! namespaces; crashes of the agent (`RunningAgent::abort` while a step hangs:
//! what a `kill -9` does to the agent, its VMs live on) at the steps around
//! each switch point, and injected failures with a count of what the host holds.
//!
//! Needs root and `$HEARTH_IMAGES_DIR` (kernel + `minimal`); without images the
//! tests SKIP loudly.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use connectrpc::ErrorCode;
use hearth_agent::faults::Fault;
use hearth_agent::{Agent, AgentConfig, RunningAgent};
use hearth_proto::hearth::agent::v1 as pb;
use hearth_types::SandboxId;

mod common;
use common::{client, config, init_tracing, real_images, try_exec, Client};

fn spec(id: &SandboxId, template: &str) -> pb::SandboxSpec {
    pb::SandboxSpec {
        sandbox_id: id.to_string(),
        template: template.to_owned(),
        vcpus: 1,
        memory_mb: 256,
        disk_size_mb: 256,
        env: [("HELLO".to_owned(), "world".to_owned())]
            .into_iter()
            .collect(),
        team_id: "test".into(),
        ..Default::default()
    }
}

async fn create(c: &Client, id: &SandboxId, template: &str) -> pb::SandboxStatus {
    create_spec(c, spec(id, template)).await
}

/// Create `minimal` with the API's default shape: the one its warm variant and
/// the warm pool serve.
async fn create_default(c: &Client, id: &SandboxId) -> pb::SandboxStatus {
    let mut s = spec(id, "minimal");
    (s.vcpus, s.memory_mb, s.disk_size_mb) = (
        hearth_types::SandboxShape::DEFAULT_VCPUS,
        hearth_types::SandboxShape::DEFAULT_MEMORY_MB,
        hearth_types::SandboxShape::DEFAULT_DISK_MB,
    );
    create_spec(c, s).await
}

async fn create_spec(c: &Client, s: pb::SandboxSpec) -> pb::SandboxStatus {
    let what = format!("create {} from {}", s.sandbox_id, s.template);
    c.create_sandbox(pb::CreateSandboxRequest {
        spec: s.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: {e}"))
    .into_owned()
    .sandbox
    .into_option()
    .unwrap()
}

async fn pause(
    c: &Client,
    id: &SandboxId,
) -> Result<pb::PauseSandboxResponse, connectrpc::ConnectError> {
    c.pause_sandbox(pb::PauseSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_owned())
}

async fn resume(
    c: &Client,
    id: &SandboxId,
) -> Result<pb::ResumeSandboxResponse, connectrpc::ConnectError> {
    c.resume_sandbox(pb::ResumeSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_owned())
}

async fn state(c: &Client, id: &SandboxId) -> pb::SandboxState {
    c.get_sandbox(pb::GetSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_owned()
    .sandbox
    .into_option()
    .unwrap()
    .state
    .as_known()
    .unwrap()
}

async fn destroy(c: &Client, id: &SandboxId) {
    c.destroy_sandbox(pb::DestroySandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// `sh -c script` in the guest: stdout, panics unless it exits 0.
async fn sh(agent: SocketAddr, id: &SandboxId, script: &str) -> String {
    let (out, code) = try_exec(agent, id, "/bin/sh", &["-c", script])
        .await
        .unwrap_or_else(|e| panic!("exec {script:?} in {id}: {e:?}"));
    assert_eq!(code, Some(0), "{script:?} in {id}: {out}");
    out.trim().to_owned()
}

/// Start `sh -c script` in the guest and return its pid once it started; the
/// stream is dropped (the guest keeps the process).
async fn start_bg(agent: SocketAddr, id: &SandboxId, script: &str) -> u32 {
    use hearth_proto::process as pp;
    use pp::__buffa::oneof::process_event::Event;
    let c = envd(agent, id);
    let mut stream = c
        .start(pp::StartRequest {
            process: pp::ProcessConfig {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                ..Default::default()
            }
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    while let Some(msg) = stream.message().await.unwrap() {
        if let Some(Event::Start(s)) = msg
            .to_owned_message()
            .event
            .into_option()
            .and_then(|e| e.event)
        {
            return s.pid;
        }
    }
    panic!("no start event for {script:?}");
}

/// Re-attach to process `pid` (envd's process.Connect) and wait for its end:
/// what it printed from now on, and its exit code.
async fn wait_pid(agent: SocketAddr, id: &SandboxId, pid: u32) -> (String, Option<i32>) {
    use hearth_proto::process as pp;
    use pp::__buffa::oneof::process_event::{data_event::Output, Event};
    use pp::__buffa::oneof::process_selector::Selector;
    let c = envd(agent, id);
    let mut stream = c
        .connect(pp::ConnectRequest {
            process: pp::ProcessSelector {
                selector: Some(Selector::Pid(pid)),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (mut out, mut code) = (String::new(), None);
    while let Some(msg) = stream.message().await.unwrap() {
        match msg
            .to_owned_message()
            .event
            .into_option()
            .and_then(|e| e.event)
        {
            Some(Event::Data(d)) => {
                if let Some(Output::Stdout(b)) = d.output {
                    out.push_str(&String::from_utf8_lossy(&b));
                }
            }
            Some(Event::End(e)) => code = Some(e.exit_code),
            _ => {}
        }
    }
    (out, code)
}

fn envd(
    agent: SocketAddr,
    id: &SandboxId,
) -> hearth_proto::process::ProcessClient<connectrpc::client::HttpClient> {
    let uri = format!("http://{agent}/sandboxes/{id}/envd")
        .parse()
        .unwrap();
    hearth_proto::process::ProcessClient::new(
        connectrpc::client::HttpClient::plaintext(),
        connectrpc::client::ClientConfig::new(uri),
    )
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// What the host holds: network namespaces, processes whose command line names
/// one of `ids`, nftables tables, and files under the run directory.
fn host_holdings(run: &Path, ids: &[&SandboxId]) -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if ids.iter().any(|id| n.contains(id.as_str())) {
                s.insert(format!("netns {n}"));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if ids.iter().any(|id| cmd.contains(&format!("-name {id}"))) {
                    s.insert(format!("process {}", cmd.split(' ').next().unwrap_or("")));
                }
            }
        }
    }
    let out = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    for t in String::from_utf8_lossy(&out.stdout).lines() {
        if ids.iter().any(|id| t.contains(id.as_str())) {
            s.insert(t.to_owned());
        }
    }
    fn walk(dir: &Path, s: &mut BTreeSet<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, s);
                } else {
                    s.insert(format!("file {}", p.display()));
                }
            }
        }
    }
    walk(&run.join("sandboxes"), &mut s);
    s
}

/// A template store of the test's own: the images' kernel and `minimal` by
/// symlink, so templates made here never land in the shared images directory.
fn private_store(images: &Path) -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(images.join("kernel"), store.path().join("kernel")).unwrap();
    std::fs::create_dir(store.path().join("templates")).unwrap();
    std::os::unix::fs::symlink(
        images.join("templates/minimal"),
        store.path().join("templates/minimal"),
    )
    .unwrap();
    store
}

async fn start(images: &Path, run: &Path, adjust: impl FnOnce(&mut AgentConfig)) -> RunningAgent {
    let mut c = config(images, run);
    adjust(&mut c);
    Agent::start(c).await.expect("agent starts")
}

#[tokio::test]
async fn pause_and_resume_keep_processes_files_env_and_clock() {
    init_tracing();
    let Some(images) = real_images("pause_and_resume_keep_processes_files_env_and_clock") else {
        return;
    };
    let run = tempfile::tempdir().unwrap();
    let agent = start(&images, run.path(), |_| ()).await;
    let (c, a) = (client(&agent), agent.local_addr());
    let id = SandboxId::generate();
    create(&c, &id, "minimal").await;
    sh(a, &id, "echo kept > /tmp/f").await;
    start_bg(
        a,
        &id,
        // Written aside and renamed: a reader never sees a half-written file.
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 1; done",
    )
    .await;
    let waiter = start_bg(a, &id, "sleep 8; echo waited").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: u32 = sh(a, &id, "cat /tmp/count").await.parse().unwrap();

    let held = host_holdings(run.path(), &[&id]);
    let p = pause(&c, &id).await.expect("pause");
    let st = p.sandbox.as_option().unwrap();
    assert_eq!(
        st.state.as_known(),
        Some(pb::SandboxState::SANDBOX_STATE_PAUSED)
    );
    assert!(st.paused_at_unix_ms > 0);
    // No VMM, no network: only its files.
    let paused_holdings = host_holdings(run.path(), &[&id]);
    assert!(
        paused_holdings.iter().all(|h| h.starts_with("file ")),
        "a paused sandbox holds only files: {paused_holdings:?}"
    );
    assert!(held.iter().any(|h| h.starts_with("netns")), "{held:?}");
    // Its guest cannot be reached while paused.
    let refused = try_exec(a, &id, "/bin/true", &[]).await;
    assert!(refused.is_err(), "exec on a paused sandbox: {refused:?}");
    // A second pause is a no-op.
    pause(&c, &id).await.expect("pause again");

    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = resume(&c, &id).await.expect("resume");
    println!("pause_ms={} resume_ms={}", p.pause_ms, r.resume_ms);
    assert_eq!(
        state(&c, &id).await,
        pb::SandboxState::SANDBOX_STATE_RUNNING
    );
    // The clock was corrected at once (the paused seconds are accounted for).
    let guest_now: i64 = sh(a, &id, "date +%s").await.parse().unwrap();
    assert!(
        (guest_now - now_s()).abs() <= 2,
        "guest clock {guest_now}, host {}",
        now_s()
    );
    // Files, env and processes stayed: the counter goes on from where it was.
    assert_eq!(sh(a, &id, "cat /tmp/f").await, "kept");
    assert_eq!(sh(a, &id, "echo $HELLO").await, "world");
    let after: u32 = sh(a, &id, "cat /tmp/count").await.parse().unwrap();
    assert!(after >= before, "counter went back: {before} -> {after}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later: u32 = sh(a, &id, "cat /tmp/count").await.parse().unwrap();
    assert!(later > after, "counter stopped: {after} -> {later}");
    // A process started before the pause can still be waited on.
    let (out, code) = wait_pid(a, &id, waiter).await;
    assert_eq!((out.trim(), code), ("waited", Some(0)));

    destroy(&c, &id).await;
    assert!(host_holdings(run.path(), &[&id]).is_empty());
    agent.shutdown().await;
}

#[tokio::test]
async fn failures_and_agent_crashes_mid_pause_and_resume_lose_nothing() {
    init_tracing();
    let Some(images) = real_images("failures_and_agent_crashes_mid_pause_and_resume_lose_nothing")
    else {
        return;
    };
    let store = private_store(&images);
    let images = store.path().to_owned();
    let run = tempfile::tempdir().unwrap();
    let faults = hearth_agent::faults::Faults::default();
    let mut agent = start(&images, run.path(), |c| c.faults = faults.clone()).await;
    let id = SandboxId::generate();
    create(&client(&agent), &id, "minimal").await;
    sh(agent.local_addr(), &id, "echo kept > /tmp/f").await;
    let running = host_holdings(run.path(), &[&id]);

    // Injected failures: before the switch a pause leaves it running, a resume
    // that fails before the guest runs leaves it paused; nothing more is held.
    faults.arm("pause:saved", Fault::Fail);
    let e = pause(&client(&agent), &id).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Internal);
    assert_eq!(host_holdings(run.path(), &[&id]), running);
    assert_eq!(sh(agent.local_addr(), &id, "cat /tmp/f").await, "kept");
    faults.clear();
    pause(&client(&agent), &id).await.unwrap();
    let paused = host_holdings(run.path(), &[&id]);
    faults.arm("resume:restored", Fault::Fail);
    resume(&client(&agent), &id).await.unwrap_err();
    assert_eq!(host_holdings(run.path(), &[&id]), paused);
    faults.clear();

    // Crashes: the agent dies while a step hangs; the next agent settles it.
    // (step, state after the restart)
    for (step, after) in [
        ("resume:restored", pb::SandboxState::SANDBOX_STATE_PAUSED),
        ("resume:running", pb::SandboxState::SANDBOX_STATE_RUNNING),
        ("snapshot:frozen", pb::SandboxState::SANDBOX_STATE_RUNNING),
        ("pause:saved", pb::SandboxState::SANDBOX_STATE_RUNNING),
        ("pause:switched", pb::SandboxState::SANDBOX_STATE_PAUSED),
    ] {
        faults.arm(step, Fault::Hang);
        let c = client(&agent);
        let id2 = id.clone();
        let call = tokio::spawn(async move {
            if step.starts_with("pause") {
                let _ = pause(&c, &id2).await;
            } else if step.starts_with("snapshot") {
                let _ = c
                    .snapshot_sandbox(pb::SnapshotSandboxRequest {
                        sandbox_id: id2.to_string(),
                        template: "snap-crash".into(),
                        memory: true,
                        ..Default::default()
                    })
                    .await;
            } else {
                let _ = resume(&c, &id2).await;
            }
        });
        // Let the step be reached, then kill the agent where it hangs.
        tokio::time::sleep(Duration::from_secs(3)).await;
        agent.abort();
        call.abort();
        faults.clear();
        agent = start(&images, run.path(), |c| c.faults = faults.clone()).await;
        assert!(
            agent.recovery().adopted.contains(&id),
            "{step}: {:?}",
            agent.recovery()
        );
        assert_eq!(
            state(&client(&agent), &id).await,
            after,
            "after a crash at {step}"
        );
        if after == pb::SandboxState::SANDBOX_STATE_PAUSED {
            assert_eq!(host_holdings(run.path(), &[&id]), paused, "{step}");
        } else {
            // Running and unfrozen (a snapshot cut short left the VM frozen).
            assert_eq!(
                sh(agent.local_addr(), &id, "cat /tmp/f").await,
                "kept",
                "{step}"
            );
        }
        // No half-built template is left.
        let templates: Vec<_> = std::fs::read_dir(images.join("templates"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(templates, ["minimal"], "{step}");
    }
    // Paused now: it resumes and still has its file.
    resume(&client(&agent), &id)
        .await
        .expect("resume after the crashes");
    assert_eq!(sh(agent.local_addr(), &id, "cat /tmp/f").await, "kept");
    destroy(&client(&agent), &id).await;
    assert!(host_holdings(run.path(), &[&id]).is_empty());
    agent.shutdown().await;
}

#[tokio::test]
async fn snapshot_to_template_then_warm_sandboxes_and_a_fork_of_four() {
    init_tracing();
    let Some(images) = real_images("snapshot_to_template_then_warm_sandboxes_and_a_fork_of_four")
    else {
        return;
    };
    // Templates made here go into a private copy of the store.
    let store = private_store(&images);
    let run = tempfile::tempdir().unwrap();
    let agent = start(store.path(), run.path(), |_| ()).await;
    let (c, a) = (client(&agent), agent.local_addr());
    let src = SandboxId::generate();
    create(&c, &src, "minimal").await;
    sh(a, &src, "echo before > /tmp/snap && sync").await;
    let made = c
        .snapshot_sandbox(pb::SnapshotSandboxRequest {
            sandbox_id: src.to_string(),
            template: "snap-test".into(),
            memory: true,
            ..Default::default()
        })
        .await
        .expect("snapshot")
        .into_owned();
    let t = made.template.as_option().unwrap();
    println!(
        "snapshot_ms={} frozen_ms={} allocated={} apparent={}",
        made.snapshot_ms, made.frozen_ms, t.allocated_bytes, t.apparent_bytes
    );
    assert!(t.has_memory);
    assert!(t.allocated_bytes < t.apparent_bytes, "sparse: {t:?}");
    // The source runs on.
    assert_eq!(sh(a, &src, "cat /tmp/snap").await, "before");

    // Two sandboxes from it: both see the file, not each other's writes, and
    // have their own names.
    let (x, y) = (SandboxId::generate(), SandboxId::generate());
    let sx = create(&c, &x, "snap-test").await;
    let sy = create(&c, &y, "snap-test").await;
    assert!(sx.restored && sy.restored, "warm creates restore");
    println!("warm boot_ms={} {}", sx.boot_ms, sy.boot_ms);
    for (id, other) in [(&x, &y), (&y, &x)] {
        assert_eq!(sh(a, id, "cat /tmp/snap").await, "before");
        sh(a, id, &format!("echo {id} > /tmp/mine")).await;
        let _ = other;
    }
    assert_eq!(sh(a, &x, "cat /tmp/mine").await, x.as_str());
    assert_eq!(sh(a, &y, "cat /tmp/mine").await, y.as_str());
    assert_eq!(sh(a, &x, "hostname").await, x.as_str());
    assert_eq!(sh(a, &y, "hostname").await, y.as_str());
    // In use: not deletable.
    let e = c
        .delete_template(pb::DeleteTemplateRequest {
            template: "snap-test".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);

    // Fork of four: four running copies of the source with its processes.
    start_bg(
        a,
        &src,
        // Written aside and renamed: a reader never sees a half-written file.
        "while true; do date +%s > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 1; done",
    )
    .await;
    sh(a, &src, "while [ ! -s /tmp/tick ]; do sleep 0.1; done").await;
    let copies: Vec<SandboxId> = (0..4).map(|_| SandboxId::generate()).collect();
    let forked = c
        .fork_sandbox(pb::ForkSandboxRequest {
            sandbox_id: src.to_string(),
            copies: copies.iter().map(|id| spec(id, "minimal")).collect(),
            ..Default::default()
        })
        .await
        .expect("fork")
        .into_owned();
    println!("fork_4_ms={}", forked.fork_ms);
    assert_eq!(forked.copies.len(), 4);
    for id in &copies {
        assert_eq!(sh(a, id, "cat /tmp/snap").await, "before");
        assert_eq!(sh(a, id, "hostname").await, id.as_str());
        sh(a, id, &format!("echo {id} > /tmp/mine")).await;
        // The copied loop runs on in each copy.
        let t0: i64 = sh(a, id, "cat /tmp/tick").await.parse().unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t1: i64 = sh(a, id, "cat /tmp/tick").await.parse().unwrap();
        assert!(t1 > t0, "{id}: loop stopped");
    }
    for id in &copies {
        assert_eq!(sh(a, id, "cat /tmp/mine").await, id.as_str());
    }
    assert_eq!(sh(a, &src, "cat /tmp/snap").await, "before");
    for id in copies.iter().chain([&x, &y, &src]) {
        destroy(&c, id).await;
    }
    // Unused now: deletable, and the fork point went with its copies.
    c.delete_template(pb::DeleteTemplateRequest {
        template: "snap-test".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let left: Vec<_> = std::fs::read_dir(store.path().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["minimal"]);
    agent.shutdown().await;
}

#[tokio::test]
async fn built_in_templates_are_made_warm_so_plain_creates_restore() {
    init_tracing();
    let Some(images) = real_images("built_in_templates_are_made_warm_so_plain_creates_restore")
    else {
        return;
    };
    let store = private_store(&images);
    let run = tempfile::tempdir().unwrap();
    let warm = |c: &mut AgentConfig| c.warm_templates = vec!["minimal".parse().unwrap()];
    let agent = start(store.path(), run.path(), warm).await;
    let variant = store.path().join("templates/warm-minimal/warm.json");
    assert!(
        common::eventually(Duration::from_secs(90), || variant.is_file()).await,
        "no warm variant made"
    );
    let (c, a) = (client(&agent), agent.local_addr());
    // The variant is the host's business: not listed as a template.
    let listed = c
        .list_templates(pb::ListTemplatesRequest::default())
        .await
        .unwrap()
        .into_owned();
    let names: Vec<_> = listed.templates.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["minimal"]);
    // The default shape restores; another shape boots.
    let (x, y) = (SandboxId::generate(), SandboxId::generate());
    let sx = create_default(&c, &x).await;
    assert!(sx.restored, "default shape restores");
    let sy = create(&c, &y, "minimal").await;
    assert!(!sy.restored, "another shape boots");
    println!(
        "warm create boot_ms={} cold boot_ms={}",
        sx.boot_ms, sy.boot_ms
    );
    assert_eq!(sh(a, &x, "hostname").await, x.as_str());
    assert_eq!(sh(a, &x, "echo $HELLO").await, "world");
    destroy(&c, &x).await;
    destroy(&c, &y).await;
    // A restart finds it up to date and keeps it.
    agent.shutdown().await;
    let made = std::fs::metadata(&variant).unwrap().modified().unwrap();
    let agent = start(store.path(), run.path(), warm).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        std::fs::metadata(&variant).unwrap().modified().unwrap(),
        made
    );
    agent.shutdown().await;
}

async fn registered(c: &Client) -> u32 {
    c.info(pb::InfoRequest::default())
        .await
        .unwrap()
        .into_owned()
        .running
}

#[tokio::test]
async fn a_warm_pool_turns_a_create_into_one_init() {
    init_tracing();
    let Some(images) = real_images("a_warm_pool_turns_a_create_into_one_init") else {
        return;
    };
    let store = private_store(&images);
    let run = tempfile::tempdir().unwrap();
    let faults = hearth_agent::faults::Faults::default();
    let pooled = |c: &mut AgentConfig| {
        c.warm_templates = vec!["minimal".parse().unwrap()];
        c.warm_pool = 1;
        c.faults = faults.clone();
    };
    let agent = start(store.path(), run.path(), pooled).await;
    let c = client(&agent);
    // Filled: one VM registered, none listed (the warming sandbox is listed
    // while it exists; pooled VMs never are).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let listed = c
            .list_sandboxes(pb::ListSandboxesRequest::default())
            .await
            .unwrap()
            .into_owned();
        if listed.sandboxes.is_empty() && registered(&c).await == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The pooled VM survives an agent restart and is taken by the next create.
    agent.shutdown().await;
    let agent = start(store.path(), run.path(), pooled).await;
    let (c, a) = (client(&agent), agent.local_addr());
    assert_eq!(registered(&c).await, 1);
    // Schedulers are told: the default shape restores here and one VM of it is
    // ready; what the pooled VM holds is free capacity to them.
    let info = c
        .info(pb::InfoRequest::default())
        .await
        .unwrap()
        .into_owned();
    let (vcpus, memory_mb, disk_size_mb) = (
        hearth_types::SandboxShape::DEFAULT_VCPUS,
        hearth_types::SandboxShape::DEFAULT_MEMORY_MB,
        hearth_types::SandboxShape::DEFAULT_DISK_MB,
    );
    let warm: Vec<_> = info
        .warm
        .iter()
        .map(|w| {
            (
                w.template.as_str(),
                w.vcpus,
                w.memory_mb,
                w.disk_size_mb,
                w.pooled,
            )
        })
        .collect();
    assert_eq!(warm, [("minimal", vcpus, memory_mb, disk_size_mb, 1)]);
    assert_eq!(
        (
            info.vm_sandboxes,
            info.pooled_sandboxes,
            info.pooled_memory_mb,
            info.pooled_vcpus
        ),
        (1, 1, u64::from(memory_mb), u64::from(vcpus))
    );
    assert_eq!(info.memory_used_mb, u64::from(memory_mb));
    let id = SandboxId::generate();
    let st = create_default(&c, &id).await;
    println!("pooled create boot_ms={}", st.boot_ms);
    assert!(st.restored);
    assert_eq!(st.spec.as_option().unwrap().sandbox_id, id.as_str());
    assert_eq!(sh(a, &id, "hostname").await, id.as_str());
    assert_eq!(sh(a, &id, "echo $HELLO").await, "world");
    // It pauses and resumes like any sandbox (its host resources change names).
    pause(&c, &id).await.expect("pause");
    resume(&c, &id).await.expect("resume");
    assert_eq!(sh(a, &id, "hostname").await, id.as_str());
    let listed = c
        .list_sandboxes(pb::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_owned();
    assert_eq!(listed.sandboxes.len(), 1);
    destroy(&c, &id).await;
    // (Files under the run directory now are the refilled pool's.)
    let held = host_holdings(run.path(), &[&id]);
    assert!(held.iter().all(|h| h.starts_with("file ")), "{held:?}");
    // The pool refills; destroying everything leaves nothing behind.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while registered(&c).await < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool did not refill"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A pooled VM that fails to become the sandbox is released, and the create
    // goes the usual way (a restore of the warm variant).
    faults.arm("pool:claim", Fault::Fail);
    let id2 = SandboxId::generate();
    let st = create_default(&c, &id2).await;
    faults.clear();
    assert!(st.restored);
    assert_eq!(sh(a, &id2, "hostname").await, id2.as_str());
    agent.destroy_all().await;
    let left: Vec<_> = std::fs::read_dir(run.path().join("sandboxes"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    agent.shutdown().await;
}

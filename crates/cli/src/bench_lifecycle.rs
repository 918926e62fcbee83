//! `hearth bench lifecycle`: cold vs. warm creates, raw restores, pause and resume
//! at two memory sizes, the size of a warm snapshot and a fork of four, in one run.
//!
//! No control plane: the benchmark starts a host agent in this process (loopback,
//! port 0, a temporary run directory) over a *private* template store (a temporary
//! directory with symlinks to the images' kernel and `templates/minimal`), so the
//! snapshots it makes never land in the real images directory. It talks to the
//! agent with its Connect client and runs guest commands through the agent's envd
//! proxy, as the control plane does. [`Harness`] is shared with `bench density`.
//!
//! The raw restore is the reference for warm creates: the very state the agent
//! restores from (the warm template's `vmstate` and `memory`), restored by the
//! agent's QEMU driver directly (spawn incoming, restore, resume, until the guest
//! agent answers `/health` over a tap in a network namespace of our own), with the
//! same confinement as a sandbox but no agent, no per-sandbox network and no API.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use connectrpc::client::{ClientConfig, HttpClient};
use hearth_agent::vmm::qemu::QemuVmm;
use hearth_agent::vmm::{Accel, Memory, Nic, ResolvedAccel, VmHostConfig, VmSpec, Vmm};
use hearth_agent::{Agent, AgentConfig, RunningAgent};
use hearth_proto::hearth::agent::v1 as pb;
use hearth_types::SandboxId;
use serde_json::{json, Value};

use super::{progress, round1, summary};
use crate::output::print_json;
use crate::Global;

type Client = pb::HostAgentClient<HttpClient>;

/// Options shared by the benchmarks that start their own agent.
#[derive(Args, Clone)]
pub struct AgentOpts {
    /// Images directory (kernel and `templates/minimal`); only read.
    #[arg(
        long = "images",
        env = "HEARTH_IMAGES_DIR",
        default_value = "/var/lib/hearth/images"
    )]
    pub images: PathBuf,
    /// Accelerator of the benchmark's agent (auto probes KVM, else TCG).
    #[arg(long, default_value = "auto")]
    pub accel: Accel,
    /// Where to write the results file.
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
}

#[derive(Args)]
pub struct LifecycleBench {
    /// Samples of each timed step (cold create, warm create, raw restore, pause
    /// and resume at each size).
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Pooled VMs the benchmark's agent keeps for `minimal` (its warm variant,
    /// default shape), as `hearth up` does: warm_create_* measure a create served
    /// from the pool (the default path of a plain create). 0 measures no pool.
    #[arg(long, default_value_t = 1)]
    pub warm_pool: usize,
    #[command(flatten)]
    pub agent: AgentOpts,
}

/// Memory sizes (MiB) of the guests paused and resumed.
const SMALL_MB: u32 = 256;
const LARGE_MB: u32 = 1024;
/// Disk of every sandbox here (a warm template restores into exactly its shape).
const DISK_MB: u32 = 256;

/// An agent of our own over a private template store, and what we made on it.
pub struct Harness {
    agent: Option<RunningAgent>,
    pub client: Client,
    pub addr: SocketAddr,
    /// The private store (`kernel` and `templates/minimal` are symlinks).
    pub store: tempfile::TempDir,
    _run: tempfile::TempDir,
    pub accel: ResolvedAccel,
    sandboxes: Mutex<BTreeSet<SandboxId>>,
    templates: Mutex<BTreeSet<String>>,
}

impl Harness {
    pub async fn start(o: &AgentOpts, pool: usize) -> Result<Self> {
        // The agent's own log, only when asked for (RUST_LOG=hearth_agent=debug
        // shows the steps of each create): stderr stays progress lines otherwise.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .try_init();
        }
        let images = &o.images;
        for p in ["kernel/vmlinux", "templates/minimal/rootfs.ext4"] {
            if !images.join(p).is_file() {
                bail!(
                    "{} not found: build images with scripts/build-images.sh or pass --images",
                    images.join(p).display()
                );
            }
        }
        let store = tempfile::Builder::new()
            .prefix("hearth-bench-store-")
            .tempdir()
            .context("creating the private template store")?;
        let abs = std::fs::canonicalize(images)
            .with_context(|| format!("resolving {}", images.display()))?;
        std::os::unix::fs::symlink(abs.join("kernel"), store.path().join("kernel"))?;
        std::fs::create_dir(store.path().join("templates"))?;
        std::os::unix::fs::symlink(
            abs.join("templates/minimal"),
            store.path().join("templates/minimal"),
        )?;
        let run = tempfile::Builder::new()
            .prefix("hearth-bench-run-")
            .tempdir()
            .context("creating the agent's run directory")?;
        let mut c = AgentConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            store.path().to_owned(),
            run.path().to_owned(),
        );
        c.accel = o.accel;
        // Idle guests, many at once (bench density): admission by memory only, as
        // the vCPU limit (4 x cores) would stop at 8 sandboxes on 2 cores.
        c.capacity.vcpu_limit = Some(1024);
        c.max_sandboxes = 256;
        if pool > 0 {
            c.warm_templates = vec!["minimal".parse().context("template name")?];
            c.warm_pool = pool;
        }
        let agent = Agent::start(c)
            .await
            .context("starting the benchmark's host agent (run as root)")?;
        let (name, why) = agent.accel();
        progress(&format!(
            "agent on {} with {name} ({why})",
            agent.local_addr()
        ));
        let accel = if name == "kvm" {
            ResolvedAccel::Kvm
        } else {
            ResolvedAccel::Tcg
        };
        let addr = agent.local_addr();
        let uri = format!("http://{addr}")
            .parse()
            .context("the agent's address")?;
        Ok(Self {
            agent: Some(agent),
            client: pb::HostAgentClient::new(HttpClient::plaintext(), ClientConfig::new(uri)),
            addr,
            store,
            _run: run,
            accel,
            sandboxes: Mutex::default(),
            templates: Mutex::default(),
        })
    }

    pub fn spec(id: &SandboxId, template: &str, memory_mb: u32) -> pb::SandboxSpec {
        pb::SandboxSpec {
            sandbox_id: id.to_string(),
            template: template.to_owned(),
            vcpus: 1,
            memory_mb,
            disk_size_mb: DISK_MB,
            team_id: "bench".into(),
            ..Default::default()
        }
    }

    /// Create and wait until the guest answers; returns the status and wall ms.
    pub async fn create(
        &self,
        template: &str,
        memory_mb: u32,
    ) -> Result<(SandboxId, pb::SandboxStatus, f64)> {
        let id = SandboxId::generate();
        self.track(&id);
        let t = Instant::now();
        let st = self
            .client
            .create_sandbox(pb::CreateSandboxRequest {
                spec: Self::spec(&id, template, memory_mb).into(),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("create from {template} ({memory_mb} MiB): {e}"))?
            .into_owned()
            .sandbox
            .into_option()
            .context("create returned no status")?;
        Ok((id, st, ms(t)))
    }

    /// Create `minimal` with the API's default shape (the one its warm variant and
    /// the pool serve); returns the status and wall ms.
    pub async fn create_default(&self) -> Result<(SandboxId, pb::SandboxStatus, f64)> {
        let id = SandboxId::generate();
        self.track(&id);
        let (vcpus, memory_mb, disk_size_mb) = (
            hearth_types::SandboxShape::DEFAULT_VCPUS,
            hearth_types::SandboxShape::DEFAULT_MEMORY_MB,
            hearth_types::SandboxShape::DEFAULT_DISK_MB,
        );
        let mut spec = Self::spec(&id, "minimal", memory_mb);
        (spec.vcpus, spec.disk_size_mb) = (vcpus, disk_size_mb);
        let t = Instant::now();
        let st = self
            .client
            .create_sandbox(pb::CreateSandboxRequest {
                spec: spec.into(),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("create from minimal (default shape): {e}"))?
            .into_owned()
            .sandbox
            .into_option()
            .context("create returned no status")?;
        Ok((id, st, ms(t)))
    }

    /// Wait until the agent holds `pool` VMs besides the listed sandboxes.
    pub async fn wait_pool(&self, pool: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let info = self
                .client
                .info(pb::InfoRequest::default())
                .await
                .map_err(|e| anyhow!("info: {e}"))?
                .into_owned();
            let listed = self
                .client
                .list_sandboxes(pb::ListSandboxesRequest::default())
                .await
                .map_err(|e| anyhow!("list: {e}"))?
                .into_owned()
                .sandboxes
                .len();
            if info.running as usize >= listed + pool {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the warm pool did not fill within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn track(&self, id: &SandboxId) {
        if let Ok(mut s) = self.sandboxes.lock() {
            s.insert(id.clone());
        }
    }

    pub async fn destroy(&self, id: &SandboxId) -> Result<()> {
        self.client
            .destroy_sandbox(pb::DestroySandboxRequest {
                sandbox_id: id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("destroy {id}: {e}"))?;
        if let Ok(mut s) = self.sandboxes.lock() {
            s.remove(id);
        }
        Ok(())
    }

    /// Pause: (the response's pause_ms, wall ms).
    pub async fn pause(&self, id: &SandboxId) -> Result<(f64, f64)> {
        let t = Instant::now();
        let r = self
            .client
            .pause_sandbox(pb::PauseSandboxRequest {
                sandbox_id: id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("pause {id}: {e}"))?
            .into_owned();
        Ok((f64::from(r.pause_ms), ms(t)))
    }

    /// Resume: (the response's resume_ms, wall ms).
    pub async fn resume(&self, id: &SandboxId) -> Result<(f64, f64)> {
        let t = Instant::now();
        let r = self
            .client
            .resume_sandbox(pb::ResumeSandboxRequest {
                sandbox_id: id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("resume {id}: {e}"))?
            .into_owned();
        Ok((f64::from(r.resume_ms), ms(t)))
    }

    /// A warm (memory) snapshot of `id` as template `name`.
    pub async fn snapshot(
        &self,
        id: &SandboxId,
        name: &str,
    ) -> Result<(pb::SnapshotSandboxResponse, f64)> {
        if let Ok(mut s) = self.templates.lock() {
            s.insert(name.to_owned());
        }
        let t = Instant::now();
        let r = self
            .client
            .snapshot_sandbox(pb::SnapshotSandboxRequest {
                sandbox_id: id.to_string(),
                template: name.to_owned(),
                memory: true,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("snapshot {id} to {name}: {e}"))?
            .into_owned();
        Ok((r, ms(t)))
    }

    pub async fn delete_template(&self, name: &str) -> Result<()> {
        self.client
            .delete_template(pb::DeleteTemplateRequest {
                template: name.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("delete template {name}: {e}"))?;
        if let Ok(mut s) = self.templates.lock() {
            s.remove(name);
        }
        Ok(())
    }

    /// `sh -c script` in the guest through the agent's envd proxy; stdout, an
    /// error unless it exits 0.
    pub async fn sh(&self, id: &SandboxId, script: &str) -> Result<String> {
        use hearth_proto::process as pp;
        use pp::__buffa::oneof::process_event::{data_event::Output, Event};
        let uri = format!("http://{}/sandboxes/{id}/envd", self.addr)
            .parse()
            .context("envd address")?;
        let c = pp::ProcessClient::new(HttpClient::plaintext(), ClientConfig::new(uri));
        let req = pp::StartRequest {
            process: pp::ProcessConfig {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                ..Default::default()
            }
            .into(),
            ..Default::default()
        };
        let mut stream = c
            .start(req)
            .await
            .map_err(|e| anyhow!("exec in {id}: {e}"))?;
        let (mut out, mut code) = (String::new(), None);
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|e| anyhow!("exec in {id}: {e}"))?
        {
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
        if code != Some(0) {
            bail!("{script:?} in {id} ended with {code:?}: {out}");
        }
        Ok(out.trim().to_owned())
    }

    /// PIDs of the QEMU processes of `ids` (command lines naming the ID).
    pub fn qemu_pids(ids: &[SandboxId]) -> Vec<(SandboxId, u32)> {
        let mut found = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return found;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if !cmd.contains("qemu-system") {
                continue;
            }
            if let Some(id) = ids.iter().find(|id| cmd.contains(id.as_str())) {
                found.push((id.clone(), pid));
            }
        }
        found
    }

    /// Destroy what is left, delete our templates, stop the agent. Best effort:
    /// also runs after errors and Ctrl-C.
    pub async fn teardown(mut self) {
        let left: Vec<SandboxId> = self
            .sandboxes
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in &left {
            let _ = self.destroy(id).await;
        }
        if let Some(agent) = &self.agent {
            agent.destroy_all().await;
        }
        let names: Vec<String> = self
            .templates
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for name in &names {
            if let Err(e) = self.delete_template(name).await {
                progress(&format!("teardown: {e}"));
            }
        }
        if let Some(agent) = self.agent.take() {
            agent.shutdown().await;
        }
        progress("teardown: sandboxes destroyed, templates deleted, agent stopped");
    }
}

pub fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Run `work` on a harness; tear down afterwards, also on error and Ctrl-C.
pub async fn with_harness<F, Fut>(o: &AgentOpts, work: F) -> Result<Value>
where
    F: FnOnce(std::sync::Arc<Harness>) -> Fut,
    Fut: std::future::Future<Output = Result<Value>>,
{
    with_harness_pooled(o, 0, work).await
}

/// [`with_harness`] with a warm pool of `pool` VMs for `minimal`.
pub async fn with_harness_pooled<F, Fut>(o: &AgentOpts, pool: usize, work: F) -> Result<Value>
where
    F: FnOnce(std::sync::Arc<Harness>) -> Fut,
    Fut: std::future::Future<Output = Result<Value>>,
{
    let h = std::sync::Arc::new(Harness::start(o, pool).await?);
    let result = tokio::select! {
        r = work(h.clone()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match std::sync::Arc::try_unwrap(h) {
        Ok(h) => h.teardown().await,
        Err(h) => {
            // The work future is gone by now; this is only a fallback.
            if let Some(agent) = &h.agent {
                agent.destroy_all().await;
            }
        }
    }
    result
}

/// Write `result` to `<out_dir>/<name>-<timestamp>.json` and print it.
pub fn write_and_print(
    g: &Global,
    out_dir: &Path,
    name: &str,
    result: &Value,
    text: &[String],
) -> Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let file = out_dir.join(format!(
        "{name}-{}.json",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    std::fs::write(&file, serde_json::to_vec_pretty(result)?)
        .with_context(|| format!("writing {}", file.display()))?;
    if g.json {
        println!("{result}");
    } else {
        let mut shown = result.clone();
        if let Some(o) = shown.as_object_mut() {
            o.remove("samples");
            for v in o.values_mut() {
                if let Some(inner) = v.as_object_mut() {
                    inner.remove("samples");
                }
            }
        }
        print_json(&shown);
        for l in text {
            println!("{l}");
        }
        println!("written to {}", file.display());
    }
    Ok(())
}

pub async fn run(g: &Global, b: LifecycleBench) -> Result<()> {
    if b.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let samples = b.samples;
    let pool = b.warm_pool;
    let result = with_harness_pooled(&b.agent, pool, |h| async move {
        lifecycle(&h, samples, pool).await
    })
    .await?;
    let text: Vec<String> = result["goals"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    format!(
                        "goal {k}: {}",
                        if v == &Value::Bool(true) {
                            "MET"
                        } else {
                            "MISSED"
                        }
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    write_and_print(g, &b.agent.out_dir, "lifecycle", &result, &text)
}

async fn lifecycle(h: &Harness, samples: usize, pool: usize) -> Result<Value> {
    const WARM: &str = "bench-warm-256";
    const WARM_1G: &str = "bench-warm-1024";

    // The source: an idle minimal sandbox, snapshotted with its memory.
    let (src, _, src_ms) = h.create("minimal", SMALL_MB).await?;
    progress(&format!("source {src} up in {src_ms:.0} ms"));
    h.sh(&src, "true").await?;
    let (made, _) = h.snapshot(&src, WARM).await?;
    progress(&format!(
        "warm template {WARM}: snapshot {} ms (frozen {} ms)",
        made.snapshot_ms, made.frozen_ms
    ));
    let raw = RawRestore::new(h, WARM).await?;

    // Cold create, warm create and raw restore alternate, one VM at a time.
    let (mut cold, mut cold_boot, mut warm, mut warm_boot, mut raws) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut not_restored = 0;
    for i in 0..samples {
        let (id, st, t) = h.create("minimal", SMALL_MB).await?;
        h.destroy(&id).await?;
        progress(&format!(
            "cold create {}/{samples}: {t:.0} ms (boot_ms {})",
            i + 1,
            st.boot_ms
        ));
        cold.push(t);
        cold_boot.push(f64::from(st.boot_ms));

        let (id, st, t) = h.create(WARM, SMALL_MB).await?;
        h.destroy(&id).await?;
        if !st.restored {
            not_restored += 1;
        }
        progress(&format!(
            "warm create {}/{samples}: {t:.0} ms (boot_ms {}, restored {})",
            i + 1,
            st.boot_ms,
            st.restored
        ));
        warm.push(t);
        warm_boot.push(f64::from(st.boot_ms));

        let t = raw.restore(i).await?;
        progress(&format!("raw restore {}/{samples}: {t:.0} ms", i + 1));
        raws.push(t);
    }
    raw.finish();

    // Creates served from the warm pool (the default path of a plain create of a
    // built-in template): each one waits for the pool to be full again first.
    let (mut pooled, mut pooled_boot) = (vec![], vec![]);
    let mut pooled_missed = 0;
    if pool > 0 {
        for i in 0..samples {
            h.wait_pool(pool, Duration::from_secs(180)).await?;
            let (id, st, t) = h.create_default().await?;
            h.sh(&id, "true").await?;
            h.destroy(&id).await?;
            // A pooled create reports the time of its /init (tens of ms).
            if !st.restored || st.boot_ms > 150 {
                pooled_missed += 1;
            }
            progress(&format!(
                "pooled warm create {}/{samples}: {t:.0} ms (boot_ms {}, restored {})",
                i + 1,
                st.boot_ms,
                st.restored
            ));
            pooled.push(t);
            pooled_boot.push(f64::from(st.boot_ms));
        }
    }

    // Pause and resume at 256 MiB (the source) and 1 GiB (a fresh idle guest).
    let small = pause_resume(h, &src, SMALL_MB, samples).await?;
    let (large_id, _, t) = h.create("minimal", LARGE_MB).await?;
    progress(&format!("1 GiB guest {large_id} up in {t:.0} ms"));
    h.sh(&large_id, "true").await?;
    let large = pause_resume(h, &large_id, LARGE_MB, samples).await?;
    let (snap, snap_wall) = h.snapshot(&large_id, WARM_1G).await?;
    let tpl = snap
        .template
        .as_option()
        .context("snapshot without template")?;
    let (alloc_mb, apparent_mb) = (
        tpl.allocated_bytes as f64 / 1048576.0,
        tpl.apparent_bytes as f64 / 1048576.0,
    );
    progress(&format!(
        "1 GiB snapshot: {} ms, allocated {alloc_mb:.1} MiB of {apparent_mb:.1} MiB",
        snap.snapshot_ms
    ));
    h.delete_template(WARM_1G).await?;
    h.destroy(&large_id).await?;

    // Fork of four from the 256 MiB source.
    let copies: Vec<SandboxId> = (0..4).map(|_| SandboxId::generate()).collect();
    for id in &copies {
        h.track(id);
    }
    let t = Instant::now();
    let forked = h
        .client
        .fork_sandbox(pb::ForkSandboxRequest {
            sandbox_id: src.to_string(),
            copies: copies
                .iter()
                .map(|id| Harness::spec(id, "minimal", SMALL_MB))
                .collect(),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("fork of 4: {e}"))?
        .into_owned();
    let fork_wall = ms(t);
    for id in &copies {
        h.sh(id, "true").await?;
    }
    progress(&format!(
        "fork of 4: {} ms (wall {fork_wall:.0} ms), all 4 answer",
        forked.fork_ms
    ));
    for id in copies.iter().chain([&src]) {
        h.destroy(id).await?;
    }
    h.delete_template(WARM).await?;

    let (cold_p50, cold_p95) = summary(cold.clone());
    // warm_create_* is the default warm path: the pool when there is one, else a
    // restore of the warm template (both are reported).
    let (restore_p50, restore_p95) = summary(warm.clone());
    let (warm_p50, warm_p95) = if pooled.is_empty() {
        (restore_p50, restore_p95)
    } else {
        summary(pooled.clone())
    };
    let (raw_p50, raw_p95) = summary(raws.clone());
    let speedup = cold_p50 / warm_p50;
    let vs_raw = warm_p50 / raw_p50;
    let pause_ratio = large.pause_p50 / small.pause_p50;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let mut v = json!({
        "benchmark": "lifecycle",
        "at": chrono::Utc::now().to_rfc3339(),
        "accel": h.accel.as_str(),
        "samples_per_step": samples,
        "cold_create_p50_ms": round1(cold_p50),
        "cold_create_p95_ms": round1(cold_p95),
        "warm_create_p50_ms": round1(warm_p50),
        "warm_create_p95_ms": round1(warm_p95),
        "warm_creates_not_restored": not_restored,
        "raw_restore_p50_ms": round1(raw_p50),
        "raw_restore_p95_ms": round1(raw_p95),
        "pause_256_p50_ms": round1(small.pause_p50),
        "resume_256_p50_ms": round1(small.resume_p50),
        "pause_1024_p50_ms": round1(large.pause_p50),
        "resume_1024_p50_ms": round1(large.resume_p50),
        "pause_256_wall_p50_ms": round1(small.pause_wall_p50),
        "resume_256_wall_p50_ms": round1(small.resume_wall_p50),
        "pause_1024_wall_p50_ms": round1(large.pause_wall_p50),
        "resume_1024_wall_p50_ms": round1(large.resume_wall_p50),
        "snapshot_allocated_mb": round1(alloc_mb),
        "snapshot_apparent_mb": round1(apparent_mb),
        "snapshot_1024_ms": snap.snapshot_ms,
        "snapshot_1024_wall_ms": round1(snap_wall),
        "fork_4_ms": forked.fork_ms,
        "fork_4_wall_ms": round1(fork_wall),
        "warm_vs_cold_speedup": r3(speedup),
        "warm_vs_raw_ratio": r3(vs_raw),
        "pause_1g_vs_256m_ratio": r3(pause_ratio),
        "snapshot_allocated_lt_1g": alloc_mb < 1024.0,
        "goals": {
            "warm_vs_cold_speedup_ge_20": speedup >= 20.0,
            "warm_vs_raw_ratio_le_1_5": vs_raw <= 1.5,
            "pause_1g_vs_256m_ratio_le_2": pause_ratio <= 2.0,
            "snapshot_allocated_lt_1g": alloc_mb < 1024.0,
        },
        "samples": {
            "cold_create_ms": cold, "cold_boot_ms": cold_boot,
            "restore_create_ms": warm, "restore_boot_ms": warm_boot,
            "raw_restore_ms": raws,
            "pause_256_ms": small.pause, "resume_256_ms": small.resume,
            "pause_1024_ms": large.pause, "resume_1024_ms": large.resume,
        },
    });
    // The pool and the plain restore path, beside the default warm path above.
    let extra = json!({
        "warm_pool": pool,
        "pooled_creates_missed": pooled_missed,
        "restore_create_p50_ms": round1(restore_p50),
        "restore_create_p95_ms": round1(restore_p95),
        "restore_vs_cold_speedup": r3(cold_p50 / restore_p50),
        "restore_vs_raw_ratio": r3(restore_p50 / raw_p50),
        "pooled_create_ms": pooled,
        "pooled_boot_ms": pooled_boot,
    });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    Ok(v)
}

struct PauseResume {
    pause: Vec<f64>,
    resume: Vec<f64>,
    pause_p50: f64,
    resume_p50: f64,
    pause_wall_p50: f64,
    resume_wall_p50: f64,
}

/// `samples` pause/resume cycles; after each resume the guest must run a command.
async fn pause_resume(
    h: &Harness,
    id: &SandboxId,
    memory_mb: u32,
    samples: usize,
) -> Result<PauseResume> {
    let (mut pause, mut resume, mut pw, mut rw) = (vec![], vec![], vec![], vec![]);
    for i in 0..samples {
        let (p, pwall) = h.pause(id).await?;
        let (r, rwall) = h.resume(id).await?;
        h.sh(id, "true").await?;
        progress(&format!(
            "{memory_mb} MiB pause/resume {}/{samples}: pause {p:.0} ms (wall {pwall:.0}), resume {r:.0} ms (wall {rwall:.0})",
            i + 1
        ));
        pause.push(p);
        resume.push(r);
        pw.push(pwall);
        rw.push(rwall);
    }
    Ok(PauseResume {
        pause_p50: summary(pause.clone()).0,
        resume_p50: summary(resume.clone()).0,
        pause_wall_p50: summary(pw).0,
        resume_wall_p50: summary(rw).0,
        pause,
        resume,
    })
}

/// The warm template's saved state restored by the QEMU driver directly.
struct RawRestore {
    vmm: QemuVmm,
    cgroups: Option<hearth_agent::vmm::cgroup::Cgroups>,
    uid: Option<u32>,
    tpl: PathBuf,
    kernel: PathBuf,
    warm: hearth_agent::templates::WarmMeta,
    netns: String,
    dir: tempfile::TempDir,
}

impl RawRestore {
    async fn new(h: &Harness, template: &str) -> Result<Self> {
        let store = hearth_agent::templates::Store::new(h.store.path().join("templates"));
        let name = template.parse().map_err(|e| anyhow!("{template}: {e}"))?;
        let warm = store
            .warm(&name)
            .with_context(|| format!("{template} has no saved VM"))?;
        let netns = format!("hearth-bench-{}", std::process::id());
        let _ = ip(&["netns", "del", &netns]).await;
        ip(&["netns", "add", &netns]).await?;
        let batch = format!(
            "link set lo up\ntuntap add dev tap0 mode tap\nlink set tap0 address {}\n\
             addr add {}/30 dev tap0\nlink set tap0 up\n\
             neigh replace {} lladdr {} dev tap0 nud permanent\n",
            hearth_agent::net::TAP_MAC,
            hearth_agent::net::TAP_IP,
            hearth_agent::net::GUEST_IP,
            hearth_agent::net::GUEST_MAC
        );
        ip_batch(&netns, &batch).await?;
        let host = VmHostConfig::default();
        let confinement = host
            .confinement(&format!("bench-{}", std::process::id()))
            .context("setting up cgroups for the raw restores (run as root)")?;
        let dir = tempfile::Builder::new()
            .prefix("hearth-bench-raw-")
            .tempdir()
            .context("creating the raw restores' directory")?;
        Ok(Self {
            cgroups: confinement.cgroups.clone(),
            vmm: QemuVmm::new("qemu-system-x86_64".into(), h.accel, confinement),
            uid: host.uid_for_slot(0),
            tpl: store.dir(&name),
            kernel: h.store.path().join("kernel"),
            warm,
            netns,
            dir,
        })
    }

    /// One restore: a qcow2 overlay on the template's disk (not timed), then from
    /// QEMU's start (incoming) through restore and resume until `/health` answers.
    async fn restore(&self, i: usize) -> Result<f64> {
        let run_dir = self.dir.path().join(format!("r{i}"));
        std::fs::create_dir(&run_dir)?;
        let disk = hearth_agent::disk::provisioner(hearth_agent::DiskKind::Qcow2)
            .create(
                &self.tpl.join("rootfs.ext4"),
                &run_dir.join("disk"),
                self.warm.disk_size_mb,
            )
            .await
            .context("creating the overlay disk")?;
        let memory = if self.warm.saved.memory_included {
            Memory::Shared(run_dir.join("memory"))
        } else {
            Memory::Private(self.tpl.join("memory"))
        };
        let name = format!("hearth-bench-raw-{}-{i}", std::process::id());
        let initrd = self.kernel.join("initrd.cpio");
        let spec = VmSpec {
            name: name.clone(),
            vcpus: self.warm.vcpus,
            memory_mb: self.warm.memory_mb,
            kernel: self.kernel.join("vmlinux"),
            initrd: initrd.is_file().then_some(initrd),
            cmdline: hearth_agent::guest_cmdline(Some(SandboxId::generate().as_str())),
            disk: disk.path,
            disk_format: disk.format,
            nic: Some(Nic::Tap("tap0".into())),
            netns: Some(self.netns.clone()),
            run_dir: run_dir.clone(),
            runas: self.uid,
            memory,
            incoming: true,
        };
        let t = Instant::now();
        let vm = self
            .vmm
            .spawn(&spec)
            .await
            .context("starting QEMU incoming")?;
        let result = async {
            let state = std::fs::File::open(self.tpl.join("vmstate"))?;
            self.vmm
                .restore(&vm, &self.warm.saved, state)
                .await
                .context("restore")?;
            self.vmm.resume(&vm).await.context("resume")?;
            if !health(&self.netns, Duration::from_secs(60)).await {
                bail!("the restored guest did not answer /health within 60 s");
            }
            Ok(ms(t))
        }
        .await;
        let _ = self.vmm.kill(&vm).await;
        let _ = self.vmm.forget(&name).await;
        let _ = std::fs::remove_dir_all(&run_dir);
        result
    }

    fn finish(&self) {
        let ns = self.netns.clone();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        if let Some(cg) = &self.cgroups {
            cg.remove_parent();
        }
    }
}

impl Drop for RawRestore {
    fn drop(&mut self) {
        // Idempotent: after finish() both are gone already.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(std::process::Stdio::null())
            .status();
        if let Some(cg) = &self.cgroups {
            cg.remove_parent();
        }
    }
}

async fn ip(args: &[&str]) -> Result<()> {
    let st = tokio::process::Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .context("running ip")?;
    if !st.success() {
        bail!("ip {args:?} failed");
    }
    Ok(())
}

async fn ip_batch(netns: &str, batch: &str) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running ip")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(batch.as_bytes()).await?;
    }
    if !child.wait().await?.success() {
        bail!("ip -n {netns} -batch failed: {batch}");
    }
    Ok(())
}

/// Poll the guest agent's `GET /health` from inside `netns` (a thread of its own
/// enters it) until it answers 204 or `limit` passes.
async fn health(netns: &str, limit: Duration) -> bool {
    let ns = format!("/run/netns/{netns}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let ok = (|| -> std::io::Result<bool> {
            use std::io::{Read, Write};
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(&ns)?;
            // SAFETY: setns on a descriptor we own, affecting only this thread,
            // which ends after the polling.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let addr = SocketAddr::from((hearth_agent::net::GUEST_IP, 49983));
            let end = Instant::now() + limit;
            while Instant::now() < end {
                let once = || -> std::io::Result<bool> {
                    let mut s =
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(
                        b"GET /health HTTP/1.1\r\nHost: guest\r\nConnection: close\r\n\r\n",
                    )?;
                    let mut head = [0u8; 12];
                    s.read_exact(&mut head)?;
                    Ok(&head[9..12] == b"204")
                };
                if once().unwrap_or(false) {
                    return Ok(true);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(false)
        })()
        .unwrap_or(false);
        let _ = tx.send(ok);
    });
    rx.await.unwrap_or(false)
}

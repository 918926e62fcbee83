//! `hearth bench`: benchmarks that print numbers and write them under `bench/results/`.
//!
//! `create` compares, in one run, a cold sandbox create through the whole stack
//! (REST API -> host agent -> QEMU -> guest agent answering) with the same kernel and
//! image booted by QEMU directly, and measures exec round trips of `true`.
//!
//! The raw boot goes through the host agent's own QEMU driver (`hearth_agent::vmm`):
//! the same command line and the same confinement as a sandbox (own uid, seccomp,
//! a cgroup with the same limits, disk as a qcow2 overlay passed by descriptor,
//! console on a socket), without the agent, the network namespace and the API.
//!
//! `lifecycle` ([`lifecycle_bench`]) and `density` ([`density_bench`]) start a host
//! agent of their own in this process and need no control plane; `api`
//! ([`api_bench`]) starts a control plane of its own and needs no host agent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hearth_agent::vmm::cgroup::Cgroups;
use hearth_agent::vmm::qemu::QemuVmm;
use hearth_agent::vmm::{Accel, Nic, VmHostConfig, VmSpec, Vmm};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::output::print_json;
use crate::{client, Global};

#[path = "bench_api.rs"]
mod api_bench;
#[path = "bench_density.rs"]
mod density_bench;
#[path = "bench_e2b.rs"]
mod e2b_bench;
#[path = "bench_lifecycle.rs"]
mod lifecycle_bench;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Cold create latency vs. raw QEMU boot, and exec round-trip time.
    Create(CreateBench),
    /// Cold vs. warm create, raw restore, pause/resume at 256 MiB and 1 GiB,
    /// warm snapshot size and fork of 4, with goal checks (own agent, no control plane).
    Lifecycle(lifecycle_bench::LifecycleBench),
    /// Host memory (PSS) per idle sandbox, warm-restored vs. cold-booted, beside the
    /// guest's own `used` (own agent, no control plane).
    Density(density_bench::DensityBench),
    /// E2B's Python SDK (create + commands.run("true") + kill) beside the same through
    /// hearth's own API, p50/p95 and their ratio (against the configured server).
    E2b(e2b_bench::E2bBench),
    /// Requests per second and p50/p99 latency of GET /v1/sandboxes and
    /// GET /v1/sandboxes/{id} with 1,000 sandboxes in the database (own control
    /// plane, no host agent).
    Api(api_bench::ApiBench),
}

#[derive(Args)]
pub struct CreateBench {
    /// Sandboxes to create (one after another).
    #[arg(long, default_value_t = 10)]
    pub count: usize,
    /// Direct QEMU boots for the reference (alternating with the creates).
    #[arg(long, default_value_t = 10)]
    pub raw_count: usize,
    /// Exec round trips of `true`.
    #[arg(long, default_value_t = 30)]
    pub exec_count: usize,
    #[arg(long, default_value = "minimal")]
    pub template: String,
    /// Images directory of the local host (kernel and templates) for the raw boots.
    #[arg(
        long,
        env = "HEARTH_IMAGES_DIR",
        default_value = "/var/lib/hearth/images"
    )]
    pub images_dir: PathBuf,
    /// Where to write the results file.
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
    /// Accelerator for the raw boots (use what the agent uses; auto probes KVM
    /// as the agent does).
    #[arg(long, default_value = "auto")]
    pub accel: Accel,
    /// QEMU binary for the raw boots.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
}

pub async fn run(g: &Global, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Create(b) => create(g, b).await,
        BenchCmd::Lifecycle(b) => lifecycle_bench::run(g, b).await,
        BenchCmd::Density(b) => density_bench::run(g, b).await,
        BenchCmd::E2b(b) => e2b_bench::run(g, b).await,
        BenchCmd::Api(b) => api_bench::run(g, b).await,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (percentile(&v, 50.0), percentile(&v, 95.0))
}

/// Progress goes to stderr so that stdout stays one JSON object under --json.
fn progress(msg: &str) {
    eprintln!("{msg}");
}

async fn create(g: &Global, b: CreateBench) -> Result<()> {
    if b.count == 0 || b.raw_count == 0 || b.exec_count == 0 {
        bail!("--count, --raw-count and --exec-count must be at least 1");
    }
    let c = client(g)?;
    let rb = RawBoot::new(&b).await?;
    let result = run_create(&c, &b, &rb).await;
    rb.finish();
    result.map(|r| report(g, &b, r))?
}

/// Raw boots alternate with creates, then exec round trips.
struct Samples {
    raw: Vec<f64>,
    creates: Vec<f64>,
    execs: Vec<f64>,
}

async fn run_create(c: &crate::client::Client, b: &CreateBench, rb: &RawBoot) -> Result<Samples> {
    // Raw boots and creates alternate, one VM at a time, so that both see the same
    // load on a shared, noisy host; the ratio of their medians is what counts.
    let mut raw = Vec::new();
    let mut creates = Vec::new();
    let mut exec_sandbox: Option<String> = None;
    for i in 0..b.count.max(b.raw_count) {
        if i < b.raw_count {
            let ms = rb.boot(i).await?;
            progress(&format!("raw boot {}/{}: {ms:.0} ms", i + 1, b.raw_count));
            raw.push(ms);
        }
        if i < b.count {
            let t = Instant::now();
            let sb: Value = c
                .json(
                    c.request(Method::POST, "/v1/sandboxes")
                        .json(&json!({"template": b.template, "timeout_s": 600})),
                )
                .await
                .context("creating a sandbox")?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let id = sb["id"]
                .as_str()
                .context("create returned no id")?
                .to_string();
            progress(&format!(
                "cold create {}/{}: {ms:.0} ms ({id})",
                i + 1,
                b.count
            ));
            creates.push(ms);
            if exec_sandbox.is_none() {
                exec_sandbox = Some(id);
            } else {
                c.send(c.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
                    .await?;
            }
        }
    }

    let id = exec_sandbox.context("no sandbox for exec")?;
    let mut execs = Vec::new();
    for _ in 0..b.exec_count {
        let t = Instant::now();
        let v: Value = c
            .json(
                c.request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
                    .json(&json!({"cmd": ["true"]})),
            )
            .await?;
        execs.push(t.elapsed().as_secs_f64() * 1000.0);
        if v["exit_code"] != 0 {
            bail!("`true` exited with {}", v["exit_code"]);
        }
    }
    c.send(c.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
        .await?;
    Ok(Samples {
        raw,
        creates,
        execs,
    })
}

fn report(g: &Global, b: &CreateBench, s: Samples) -> Result<()> {
    let Samples {
        raw,
        creates,
        execs,
    } = s;
    let (raw_p50, raw_p95) = summary(raw.clone());
    let (create_p50, create_p95) = summary(creates.clone());
    let (exec_p50, exec_p95) = summary(execs.clone());
    let result = json!({
        "benchmark": "create",
        "at": chrono::Utc::now().to_rfc3339(),
        "template": b.template,
        "cold_create_p50_ms": round1(create_p50),
        "cold_create_p95_ms": round1(create_p95),
        "raw_boot_p50_ms": round1(raw_p50),
        "raw_boot_p95_ms": round1(raw_p95),
        "create_over_raw_p50": (create_p50 / raw_p50 * 1000.0).round() / 1000.0,
        "exec_rtt_p50_ms": round1(exec_p50),
        "exec_rtt_p95_ms": round1(exec_p95),
        "samples": {"cold_create_ms": creates, "raw_boot_ms": raw, "exec_rtt_ms": execs},
    });
    std::fs::create_dir_all(&b.out_dir)
        .with_context(|| format!("creating {}", b.out_dir.display()))?;
    let file = b.out_dir.join(format!(
        "create-{}.json",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    std::fs::write(&file, serde_json::to_vec_pretty(&result)?)?;
    if g.json {
        println!("{result}");
    } else {
        let mut shown = result.clone();
        if let Some(o) = shown.as_object_mut() {
            o.remove("samples");
        }
        print_json(&shown);
        println!("written to {}", file.display());
    }
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Boots the template with the agent's QEMU driver and confinement, outside the agent.
struct RawBoot {
    vmm: QemuVmm,
    cgroups: Option<Cgroups>,
    uid: Option<u32>,
    kernel: PathBuf,
    initrd: PathBuf,
    base: PathBuf,
    confined: String,
}

impl RawBoot {
    async fn new(b: &CreateBench) -> Result<Self> {
        let images = &b.images_dir;
        let kernel = images.join("kernel/vmlinux");
        let initrd = images.join("kernel/initrd.cpio");
        let base = images
            .join("templates")
            .join(&b.template)
            .join("rootfs.ext4");
        for p in [&kernel, &initrd, &base] {
            if !p.exists() {
                bail!(
                    "{} not found: build images with scripts/build-images.sh or pass --images-dir",
                    p.display()
                );
            }
        }
        let (accel, why) = hearth_agent::vmm::qemu::resolve_accel(
            b.accel,
            &b.qemu,
            &kernel,
            Some(&initrd),
            Some(&base),
            &std::env::temp_dir(),
        )
        .await;
        progress(&format!("raw boots use {} ({why})", accel.as_str()));
        // The agent's defaults: a uid no sandbox has (slot 0 is never handed out),
        // cgroups under a parent of our own.
        let host = VmHostConfig::default();
        let confinement = host
            .confinement(&format!("bench-{}", std::process::id()))
            .context("setting up cgroups for the raw boots (run as root)")?;
        let confined = format!(
            "uid {}, seccomp, cgroup v{}",
            host.uid_for_slot(0).unwrap_or(0),
            confinement
                .cgroups
                .as_ref()
                .map(|c| c.layout().version())
                .unwrap_or(0)
        );
        Ok(Self {
            cgroups: confinement.cgroups.clone(),
            vmm: QemuVmm::new(b.qemu.clone(), accel, confinement),
            uid: host.uid_for_slot(0),
            kernel,
            initrd,
            base,
            confined,
        })
    }

    /// One boot: a fresh qcow2 overlay (not timed), then from QEMU's start until
    /// the guest agent prints that it serves.
    async fn boot(&self, i: usize) -> Result<f64> {
        let name = format!("hearth-bench-{}-{i}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let result = self.boot_in(&name, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    async fn boot_in(&self, name: &str, dir: &Path) -> Result<f64> {
        let disk = hearth_agent::disk::provisioner(hearth_agent::DiskKind::Qcow2)
            .create(&self.base, &dir.join("disk"), 0)
            .await
            .context("creating the overlay disk")?;
        let spec = VmSpec {
            name: name.to_owned(),
            vcpus: 1,
            memory_mb: 256,
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
            cmdline: hearth_agent::guest_cmdline(None),
            disk: disk.path,
            disk_format: disk.format,
            // The same NIC as a sandbox, on a QEMU hub with no other port: the guest
            // configures eth0 exactly as in a sandbox, and no packet leaves QEMU.
            nic: Some(Nic::Isolated),
            netns: None,
            run_dir: dir.to_owned(),
            runas: self.uid,
            memory: hearth_agent::vmm::Memory::Anonymous,
            incoming: false,
        };
        let t = Instant::now();
        let vm = self
            .vmm
            .spawn(&spec)
            .await
            .context("starting QEMU (scripts/setup.sh installs it)")?;
        let found = tokio::time::timeout(
            Duration::from_secs(120),
            wait_ready(&spec.console_socket(), &vm),
        )
        .await
        .unwrap_or(false);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let _ = self.vmm.kill(&vm).await;
        let _ = self.vmm.forget(name).await;
        if !found {
            bail!("the raw boot did not reach the guest agent within 120 s");
        }
        Ok(ms)
    }

    fn finish(&self) {
        progress(&format!("raw boots were confined: {}", self.confined));
        if let Some(cg) = &self.cgroups {
            cg.remove_parent();
        }
    }
}

/// Read the VM's console socket until the guest agent says it serves.
async fn wait_ready(socket: &Path, vm: &hearth_agent::vmm::VmHandle) -> bool {
    const READY: &[u8] = b"HEARTH_GUEST_READY";
    let mut stream = loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(s) => break s,
            Err(_) if vm.is_alive() => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(_) => return false,
        }
    };
    let mut window: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => {
                window.extend_from_slice(&buf[..n]);
                if window.windows(READY.len()).any(|w| w == READY) {
                    return true;
                }
                // Keep only what could start a match.
                let keep = window.len().min(READY.len());
                window.drain(..window.len() - keep);
            }
        }
    }
}

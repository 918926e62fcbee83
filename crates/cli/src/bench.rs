//! `hearth bench`: benchmarks that print numbers and write them under `bench/results/`.
//!
//! `create` compares, in one run, a cold sandbox create through the whole stack
//! (REST API -> host agent -> QEMU -> guest agent answering) with the same kernel and
//! image booted by QEMU directly, and measures exec round trips of `true`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::output::print_json;
use crate::{client, Global};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Cold create latency vs. raw QEMU boot, and exec round-trip time.
    Create(CreateBench),
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
}

pub async fn run(g: &Global, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Create(b) => create(g, b).await,
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

    // Raw boots and creates alternate, one VM at a time, so that both see the same
    // load on a shared, noisy host; the ratio of their medians is what counts.
    let mut raw = Vec::new();
    let mut creates = Vec::new();
    let mut exec_sandbox: Option<String> = None;
    for i in 0..b.count.max(b.raw_count) {
        if i < b.raw_count {
            let ms = raw_boot(&b.images_dir, &b.template).await?;
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

/// Boot the template's kernel and root disk with QEMU directly (no agent, no network)
/// and time it until the guest agent says it serves.
async fn raw_boot(images: &Path, template: &str) -> Result<f64> {
    let kernel = images.join("kernel/vmlinux");
    let initrd = images.join("kernel/initrd.cpio");
    let disk = images.join("templates").join(template).join("rootfs.ext4");
    for p in [&kernel, &initrd, &disk] {
        if !p.exists() {
            bail!(
                "{} not found: build images with scripts/build-images.sh or pass --images-dir",
                p.display()
            );
        }
    }
    let cmdline = hearth_agent::guest_cmdline(None);
    let t = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &cmdline])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,snapshot=on",
            disk.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        // The same NIC as a sandbox, on a QEMU hub with no other port: the guest
        // configures eth0 exactly as in a sandbox, and no packet leaves QEMU.
        .args(["-netdev", "hubport,id=n0,hubid=0", "-device"])
        .arg(format!(
            "virtio-net-device,netdev=n0,mac={}",
            hearth_agent::net::GUEST_MAC
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu-system-x86_64 (scripts/install-deps.sh installs it)")?;
    let stdout = child.stdout.take().context("no qemu stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("HEARTH_GUEST_READY") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = child.kill().await;
    if !found {
        bail!("the raw boot did not reach the guest agent within 120 s");
    }
    Ok(ms)
}

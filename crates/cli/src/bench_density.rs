//! `hearth bench density`: host memory per idle sandbox, warm (restored from a
//! warm 256 MiB template) vs. cold-booted, in one run.
//!
//! One group at a time, all N of a group alive at once. For every sandbox: the
//! PSS of its QEMU (`Pss` of `/proc/PID/smaps_rollup`: shared pages, such as the
//! warm template's memory file in the page cache, are split between the processes
//! that map them, so the sum over a group counts them once) and the guest's own
//! `used` (`/proc/meminfo` in the guest, through the agent's proxy). Per group: the
//! agent's own cost per sandbox (growth of this process's RSS, where the agent
//! runs, divided by N). Uses the same private agent as `bench lifecycle`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_types::SandboxId;
use serde_json::{json, Value};

use super::lifecycle_bench::{with_harness, write_and_print, AgentOpts, Harness};
use super::{percentile, progress, round1};
use crate::Global;

#[derive(Args)]
pub struct DensityBench {
    /// Sandboxes per group (warm, then cold), all alive at once.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// Creates in flight at once while filling a group (2 cores: keep it small).
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Seconds to let a full group settle before measuring.
    #[arg(long, default_value_t = 5)]
    pub settle_s: u64,
    #[command(flatten)]
    pub agent: AgentOpts,
}

const MEMORY_MB: u32 = 256;
const WARM: &str = "bench-density-warm";
/// The goal for a warm idle sandbox (issue 6).
const GOAL_PSS_MIB: f64 = 40.0;

pub async fn run(g: &Global, b: DensityBench) -> Result<()> {
    if b.count == 0 || b.parallel == 0 {
        bail!("--count and --parallel must be at least 1");
    }
    let (count, parallel, settle) = (b.count, b.parallel, Duration::from_secs(b.settle_s));
    let result = with_harness(&b.agent, |h| async move {
        density(&h, count, parallel, settle).await
    })
    .await?;
    let mut text = Vec::new();
    for group in ["warm", "cold"] {
        let gr = &result[group];
        text.push(format!(
            "{group}: PSS mean {} / p50 {} / max {} MiB per sandbox, agent {} MiB per sandbox, guest used p50 {} MiB",
            gr["pss_mean_mib"], gr["pss_p50_mib"], gr["pss_max_mib"],
            gr["agent_rss_per_sandbox_mib"], gr["guest_used_p50_mib"]
        ));
    }
    text.push(format!(
        "goal warm idle sandbox <= {GOAL_PSS_MIB} MiB PSS (mean): {}",
        if result["goals"]["warm_pss_le_40mib"] == Value::Bool(true) {
            "MET"
        } else {
            "MISSED"
        }
    ));
    write_and_print(g, &b.agent.out_dir, "density", &result, &text)
}

async fn density(h: &Harness, count: usize, parallel: usize, settle: Duration) -> Result<Value> {
    let (src, _, t) = h.create("minimal", MEMORY_MB).await?;
    progress(&format!("source {src} up in {t:.0} ms"));
    h.sh(&src, "true").await?;
    h.snapshot(&src, WARM).await?;
    h.destroy(&src).await?;
    progress(&format!("warm template {WARM} made"));

    let warm = group(h, "warm", WARM, count, parallel, settle).await?;
    let cold = group(h, "cold", "minimal", count, parallel, settle).await?;
    h.delete_template(WARM).await?;

    let warm_mean = warm["pss_mean_mib"].as_f64().unwrap_or(f64::NAN);
    let cold_mean = cold["pss_mean_mib"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "benchmark": "density",
        "at": chrono::Utc::now().to_rfc3339(),
        "accel": h.accel.as_str(),
        "count": count,
        "memory_mb": MEMORY_MB,
        "warm": warm,
        "cold": cold,
        "cold_over_warm_pss": (cold_mean / warm_mean * 100.0).round() / 100.0,
        "goals": {"warm_pss_le_40mib": warm_mean <= GOAL_PSS_MIB},
    }))
}

/// Fill a group of `count` sandboxes from `template`, measure, destroy them.
async fn group(
    h: &Harness,
    label: &str,
    template: &str,
    count: usize,
    parallel: usize,
    settle: Duration,
) -> Result<Value> {
    let rss0 = self_rss_kib();
    let t = Instant::now();
    let mut ids: Vec<SandboxId> = Vec::new();
    let mut restored = 0;
    while ids.len() < count {
        let n = parallel.min(count - ids.len());
        let batch = futures::future::join_all((0..n).map(|_| h.create(template, MEMORY_MB))).await;
        for r in batch {
            let (id, st, ms) = r?;
            restored += usize::from(st.restored);
            ids.push(id);
            progress(&format!(
                "{label} {}/{count}: {ms:.0} ms (restored {})",
                ids.len(),
                st.restored
            ));
        }
    }
    let fill_ms = t.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(settle).await;

    let pids = Harness::qemu_pids(&ids);
    if pids.len() != ids.len() {
        bail!(
            "found {} QEMU processes for {} {label} sandboxes",
            pids.len(),
            ids.len()
        );
    }
    let mut pss = Vec::new();
    let mut rss = Vec::new();
    for (_, pid) in &pids {
        let (p, r) = smaps_rollup(*pid).with_context(|| format!("smaps_rollup of {pid}"))?;
        pss.push(p as f64 / 1024.0);
        rss.push(r as f64 / 1024.0);
    }
    let mut used = Vec::new();
    for id in &ids {
        let m = h.sh(id, "cat /proc/meminfo").await?;
        used.push(guest_used_kib(&m).context("parsing the guest's /proc/meminfo")? as f64 / 1024.0);
    }
    let rss1 = self_rss_kib();
    let agent_per = (rss1 as f64 - rss0 as f64) / 1024.0 / count as f64;

    let total: f64 = pss.iter().sum();
    let stats = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
        (
            round1(mean),
            round1(percentile(&s, 50.0)),
            round1(s.last().copied().unwrap_or(f64::NAN)),
        )
    };
    let (pss_mean, pss_p50, pss_max) = stats(&pss);
    let (rss_mean, _, _) = stats(&rss);
    let (used_mean, used_p50, used_max) = stats(&used);
    progress(&format!(
        "{label}: {count} alive, PSS mean {pss_mean} MiB (sum {total:.0} MiB), RSS mean {rss_mean} MiB, guest used p50 {used_p50} MiB"
    ));
    for id in &ids {
        h.destroy(id).await?;
    }
    progress(&format!("{label}: destroyed"));
    Ok(json!({
        "template": template,
        "restored": restored,
        "fill_ms": round1(fill_ms),
        "pss_mean_mib": pss_mean,
        "pss_p50_mib": pss_p50,
        "pss_max_mib": pss_max,
        "pss_sum_mib": round1(total),
        "rss_mean_mib": rss_mean,
        "agent_rss_per_sandbox_mib": round1(agent_per),
        "guest_used_mean_mib": used_mean,
        "guest_used_p50_mib": used_p50,
        "guest_used_max_mib": used_max,
        "samples": {"pss_mib": pss, "rss_mib": rss, "guest_used_mib": used},
    }))
}

/// (Pss, Rss) in KiB of `pid`.
fn smaps_rollup(pid: u32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Ok((
        field("Pss:").context("no Pss line")?,
        field("Rss:").context("no Rss line")?,
    ))
}

/// This process's resident set (KiB): the agent runs in it.
fn self_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What `free` calls used: total - free - buffers - cache (incl. reclaimable slab).
fn guest_used_kib(meminfo: &str) -> Option<u64> {
    let f = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let total = f("MemTotal:")?;
    let free = f("MemFree:")?;
    let cache =
        f("Buffers:").unwrap_or(0) + f("Cached:").unwrap_or(0) + f("SReclaimable:").unwrap_or(0);
    Some(total.saturating_sub(free).saturating_sub(cache))
}

#[cfg(test)]
mod tests {
    use super::guest_used_kib;

    #[test]
    fn used_is_total_minus_free_and_caches() {
        let m = "MemTotal: 1000 kB\nMemFree: 600 kB\nBuffers: 10 kB\nCached: 90 kB\nSReclaimable: 50 kB\n";
        assert_eq!(guest_used_kib(m), Some(250));
        assert_eq!(guest_used_kib("MemFree: 1 kB\n"), None);
    }
}

//! envd's `GET /metrics`: one sample of the guest's CPU, memory and root disk use, as
//! E2B's orchestrator reads it (`ts`, `cpu_count`, `cpu_used_pct`, `mem_total`,
//! `mem_used`, `mem_cache`, `disk_used`, `disk_total`; bytes, and MiB copies of the
//! memory figures).
//!
//! CPU use is measured between two readings of `/proc/stat`: the previous call's, when
//! it is at least [`MIN_WINDOW`] old, else a fresh pair [`MIN_WINDOW`] apart. Memory is
//! `/proc/meminfo` (used = total - free - buffers - cached, as envd computes it), the
//! disk is `statvfs("/")`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use crate::files_http::HttpError;

/// Shortest window CPU use is measured over.
pub const MIN_WINDOW: Duration = Duration::from_millis(100);

/// One sample, in envd's field names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    /// Unix seconds.
    pub ts: i64,
    pub cpu_count: u32,
    /// 0 to 100 (all CPUs together), two decimals.
    pub cpu_used_pct: f64,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_cache: u64,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

/// Aggregate CPU time counters of `/proc/stat`'s `cpu` line, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// `cpu` line counters and the number of `cpuN` lines of a `/proc/stat` text.
pub fn parse_stat(text: &str) -> Option<(CpuTimes, u32)> {
    let mut times = None;
    let mut count = 0u32;
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        match fields.next() {
            Some("cpu") => {
                // user nice system idle iowait irq softirq steal (guest time is part of user).
                let v: Vec<u64> = fields.take(8).map_while(|f| f.parse().ok()).collect();
                if v.len() < 4 {
                    return None;
                }
                let total: u64 = v.iter().sum();
                let idle = v[3] + v.get(4).copied().unwrap_or(0);
                times = Some(CpuTimes {
                    busy: total.saturating_sub(idle),
                    total,
                });
            }
            Some(name) if name.starts_with("cpu") => count += 1,
            _ => {}
        }
    }
    Some((times?, count.max(1)))
}

/// Busy share of the time between two readings, 0 to 100, two decimals.
pub fn cpu_percent(before: CpuTimes, after: CpuTimes) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy).min(total);
    (busy as f64 * 10_000.0 / total as f64).round() / 100.0
}

/// (total, used, cache) in bytes from a `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
            kb.checked_mul(1024)
        })
    };
    let total = field("MemTotal")?;
    let free = field("MemFree")?;
    let buffers = field("Buffers").unwrap_or(0);
    let cache = field("Cached")
        .unwrap_or(0)
        .saturating_add(field("SReclaimable").unwrap_or(0));
    let used = total
        .saturating_sub(free)
        .saturating_sub(buffers)
        .saturating_sub(cache);
    Some((total, used, cache))
}

/// The last `/proc/stat` reading and when it was taken.
static LAST: Mutex<Option<(Instant, CpuTimes)>> = Mutex::new(None);

fn read_stat() -> std::io::Result<(CpuTimes, u32)> {
    let text = std::fs::read_to_string("/proc/stat")?;
    parse_stat(&text).ok_or_else(|| std::io::Error::other("/proc/stat has no cpu line"))
}

/// Takes one sample (blocks up to [`MIN_WINDOW`]).
pub fn sample() -> std::io::Result<Metrics> {
    let (mut now, cpu_count) = read_stat()?;
    let previous = LAST.lock().ok().and_then(|g| *g);
    let before = match previous {
        Some((at, times)) if at.elapsed() >= MIN_WINDOW => times,
        _ => {
            let before = now;
            std::thread::sleep(MIN_WINDOW);
            now = read_stat()?.0;
            before
        }
    };
    if let Ok(mut g) = LAST.lock() {
        *g = Some((Instant::now(), now));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let (mem_total, mem_used, mem_cache) = parse_meminfo(&meminfo)
        .ok_or_else(|| std::io::Error::other("/proc/meminfo lacks MemTotal or MemFree"))?;
    let fs = nix::sys::statvfs::statvfs("/").map_err(std::io::Error::from)?;
    let frsize = fs.fragment_size();
    let disk_total = fs.blocks().saturating_mul(frsize);
    let disk_used = fs
        .blocks()
        .saturating_sub(fs.blocks_free())
        .saturating_mul(frsize);
    Ok(Metrics {
        ts: chrono::Utc::now().timestamp(),
        cpu_count,
        cpu_used_pct: cpu_percent(before, now),
        mem_total,
        mem_used,
        mem_cache,
        mem_total_mib: mem_total >> 20,
        mem_used_mib: mem_used >> 20,
        disk_used,
        disk_total,
    })
}

/// `GET /metrics`.
pub async fn handler() -> Result<Json<Metrics>, HttpError> {
    match tokio::task::spawn_blocking(sample).await {
        Ok(Ok(m)) => Ok(Json(m)),
        Ok(Err(e)) => Err(HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading metrics: {e}"),
        )),
        Err(_) => Err(HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "reading metrics failed",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 50 800 50 0 0 0 0 0\n\
                        cpu0 50 0 25 400 25 0 0 0 0 0\n\
                        cpu1 50 0 25 400 25 0 0 0 0 0\n\
                        intr 1 2 3\nctxt 5\n";

    #[test]
    fn stat_counts_cpus_and_busy_time() {
        let (t, n) = parse_stat(STAT).unwrap();
        assert_eq!(n, 2);
        assert_eq!(t.total, 1000);
        assert_eq!(t.busy, 150);
        assert_eq!(parse_stat("intr 1\n"), None);
        assert_eq!(parse_stat("cpu x y\n"), None);
    }

    #[test]
    fn percent_between_readings() {
        let a = CpuTimes {
            busy: 150,
            total: 1000,
        };
        let b = CpuTimes {
            busy: 400,
            total: 2000,
        };
        assert_eq!(cpu_percent(a, b), 25.0);
        assert_eq!(cpu_percent(a, a), 0.0);
        // Counters that went backwards (never from a real kernel) give 0, not garbage.
        assert_eq!(cpu_percent(b, a), 0.0);
        let third = CpuTimes {
            busy: 151,
            total: 1003,
        };
        assert_eq!(cpu_percent(a, third), 33.33);
    }

    #[test]
    fn meminfo_used_excludes_cache_and_buffers() {
        let text = "MemTotal:         262144 kB\nMemFree:          131072 kB\n\
                    MemAvailable:     200000 kB\nBuffers:            1024 kB\n\
                    Cached:            16384 kB\nSReclaimable:       2048 kB\n";
        let (total, used, cache) = parse_meminfo(text).unwrap();
        assert_eq!(total, 256 << 20);
        assert_eq!(cache, (16384 + 2048) * 1024);
        assert_eq!(used, (262144 - 131072 - 1024 - 16384 - 2048) * 1024);
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn a_sample_of_this_machine_is_plausible() {
        let m = sample().unwrap();
        assert!(m.cpu_count >= 1);
        assert!((0.0..=100.0).contains(&m.cpu_used_pct), "{m:?}");
        assert!(m.mem_used <= m.mem_total && m.mem_total > 0, "{m:?}");
        assert!(m.disk_used <= m.disk_total && m.disk_total > 0, "{m:?}");
    }
}

//! Prometheus metrics of the host agent (`GET /metrics`, text format), kept with
//! `prometheus-client` as the control plane's are.
//!
//! Lifecycle RPCs (create, pause, resume, snapshot, fork) are timed and their
//! failures counted by Connect code as [`crate::service`] answers them; sandboxes by
//! state, the warm pool and the host's admission capacity and use are read from the
//! registry at scrape time. No label names a team, key or sandbox: the only labels
//! are the operation, the error code, the state and how a create started.

use std::time::Instant;

use connectrpc::ConnectError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::state::SandboxState;
use crate::Ctx;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A timed lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Pause,
    Resume,
    Snapshot,
    Fork,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Snapshot => "snapshot",
            Op::Fork => "fork",
        }
    }
}

/// How a create got its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A pooled VM, already restored.
    Pool,
    /// Restored from a memory snapshot.
    Restore,
    /// Booted.
    Boot,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    op: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StartLabels {
    start: String,
}

type Buckets = fn() -> Histogram;

fn latency_buckets() -> Histogram {
    // 1 ms to about 131 s, as the control plane's: a pause, a pooled create, a boot.
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// The agent's metric families.
pub struct Metrics {
    registry: Registry,
    latency: Family<OpLabels, Histogram, Buckets>,
    errors: Family<ErrorLabels, Counter>,
    starts: Family<StartLabels, Counter>,
    sandboxes: Family<StateLabels, Gauge>,
    pooled: Gauge,
    memory_capacity: Gauge,
    memory_used: Gauge,
    vcpus_capacity: Gauge,
    vcpus_used: Gauge,
    disk_free: Gauge,
    slots: Gauge,
    slots_used: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hearth_agent");
        let latency =
            Family::<OpLabels, Histogram, Buckets>::new_with_constructor(latency_buckets as _);
        registry.register(
            "operation_duration_seconds",
            "Time to complete a lifecycle RPC that succeeded, by operation",
            latency.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "operation_errors",
            "Lifecycle RPCs that failed or were refused, by operation and Connect code",
            errors.clone(),
        );
        let starts = Family::<StartLabels, Counter>::default();
        registry.register(
            "creates",
            "Sandboxes created, by how they started (pool, restore, boot)",
            starts.clone(),
        );
        let sandboxes = Family::<StateLabels, Gauge>::default();
        registry.register(
            "sandboxes",
            "Sandboxes on this host by state (pooled VMs not included)",
            sandboxes.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let pooled = gauge(
            "warm_pool_vms",
            "Pooled VMs: restored, frozen, waiting for a create",
        );
        let memory_capacity = gauge(
            "memory_capacity_bytes",
            "Guest memory this host may promise (host memory less the reserve, times the overcommit)",
        );
        let memory_used = gauge(
            "memory_used_bytes",
            "Guest memory promised to sandboxes holding a VM (pooled VMs included)",
        );
        let vcpus_capacity = gauge("vcpus_capacity", "vCPUs this host may give out");
        let vcpus_used = gauge(
            "vcpus_used",
            "vCPUs of sandboxes holding a VM (pooled VMs included)",
        );
        let disk_free = gauge(
            "disk_free_bytes",
            "Free disk beyond the reserve, less disks still being made",
        );
        let slots = gauge(
            "sandbox_slots",
            "Sandboxes holding a VM this host runs at most",
        );
        let slots_used = gauge(
            "sandbox_slots_used",
            "Sandboxes holding a VM (pooled VMs included)",
        );
        Self {
            registry,
            latency,
            errors,
            starts,
            sandboxes,
            pooled,
            memory_capacity,
            memory_used,
            vcpus_capacity,
            vcpus_used,
            disk_free,
            slots,
            slots_used,
        }
    }

    /// Record one answered lifecycle RPC that began at `started`.
    pub fn observe<T>(&self, op: Op, started: Instant, result: &Result<T, ConnectError>) {
        match result {
            Ok(_) => self
                .latency
                .get_or_create(&OpLabels {
                    op: op.as_str().to_owned(),
                })
                .observe(started.elapsed().as_secs_f64()),
            Err(e) => {
                self.errors
                    .get_or_create(&ErrorLabels {
                        op: op.as_str().to_owned(),
                        code: e.code.as_str().to_owned(),
                    })
                    .inc();
            }
        }
    }

    /// Count one created sandbox by how it started.
    pub fn started(&self, how: Start) {
        let start = match how {
            Start::Pool => "pool",
            Start::Restore => "restore",
            Start::Boot => "boot",
        };
        self.starts
            .get_or_create(&StartLabels {
                start: start.to_owned(),
            })
            .inc();
    }
}

fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const MIB: u64 = 1 << 20;

/// The metrics in Prometheus' text format, registry and capacity figures as of now.
pub(crate) fn render(ctx: &Ctx) -> Result<String, std::fmt::Error> {
    let m = &ctx.metrics;
    let mut by_state = [0i64; SandboxState::ALL.len()];
    let mut pooled = 0;
    for h in ctx.registry.all() {
        let r = h.record.borrow();
        if r.pooled {
            pooled += 1;
        } else if let Some(i) = SandboxState::ALL.iter().position(|s| *s == r.state) {
            by_state[i] += 1;
        }
    }
    for (state, n) in SandboxState::ALL.iter().zip(by_state) {
        m.sandboxes
            .get_or_create(&StateLabels {
                state: state.as_str().to_owned(),
            })
            .set(n);
    }
    m.pooled.set(pooled);
    let used = ctx.registry.usage();
    let cap = &ctx.capacity;
    m.memory_capacity
        .set(gauge_value(cap.memory_mb.saturating_mul(MIB)));
    m.memory_used
        .set(gauge_value(used.memory_mb.saturating_mul(MIB)));
    m.vcpus_capacity.set(gauge_value(cap.vcpus));
    m.vcpus_used.set(gauge_value(used.vcpus));
    let free = cap
        .disk_free_mb()
        .unwrap_or(0)
        .saturating_sub(used.disk_pending_mb);
    m.disk_free.set(gauge_value(free.saturating_mul(MIB)));
    m.slots.set(gauge_value(cap.max_sandboxes as u64));
    m.slots_used.set(gauge_value(used.sandboxes as u64));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &m.registry)?;
    Ok(out)
}

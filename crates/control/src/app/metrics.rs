//! Prometheus metrics of the control plane (`GET /metrics`, text format), kept with
//! `prometheus-client`, the Prometheus project's own Rust client.
//!
//! Request counts and latencies are labelled by route template (`/v1/sandboxes/{id}`,
//! never an ID) so that their number stays bounded; sandbox lifecycle operations
//! (create, pause, resume, fork, through either API) are timed by operation and their
//! failures counted by kind; sandbox counts by state are read from the database at
//! scrape time (every team together: no label names a team), host capacity and use
//! from the hosts' last reports and the scheduler's placements in flight (labelled by
//! host ID only).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use hearth_db::STORED_STATES;

use super::{App, AppError, AppResult};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpErrorLabels {
    op: String,
    kind: String,
}

/// A timed sandbox lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Pause,
    Resume,
    Fork,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Fork => "fork",
        }
    }
}

type Buckets = fn() -> Histogram;

/// The control plane's metric families.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, Buckets>,
    sandboxes: Family<StateLabels, Gauge>,
    host_sandboxes: Family<HostLabels, Gauge>,
    hosts: Gauge,
    ops: Family<OpLabels, Histogram, Buckets>,
    op_errors: Family<OpErrorLabels, Counter>,
    host_gauges: HostGauges,
}

/// Per-host capacity and use, from the last report (bytes for memory and disk).
#[derive(Default)]
struct HostGauges {
    memory_capacity: Family<HostLabels, Gauge>,
    memory_used: Family<HostLabels, Gauge>,
    vcpus_capacity: Family<HostLabels, Gauge>,
    vcpus_used: Family<HostLabels, Gauge>,
    disk_free: Family<HostLabels, Gauge>,
    slots: Family<HostLabels, Gauge>,
    slots_used: Family<HostLabels, Gauge>,
    in_flight: Family<HostLabels, Gauge>,
}

impl HostGauges {
    fn register(&self, registry: &mut Registry) {
        let all: [(&str, &str, &Family<HostLabels, Gauge>); 8] = [
            (
                "host_memory_capacity_bytes",
                "Guest memory each host may promise",
                &self.memory_capacity,
            ),
            (
                "host_memory_used_bytes",
                "Guest memory each host has promised (pooled VMs included)",
                &self.memory_used,
            ),
            (
                "host_vcpus_capacity",
                "vCPUs each host may give out",
                &self.vcpus_capacity,
            ),
            (
                "host_vcpus_used",
                "vCPUs each host has given out (pooled VMs included)",
                &self.vcpus_used,
            ),
            (
                "host_disk_free_bytes",
                "Free disk of each host beyond its reserve",
                &self.disk_free,
            ),
            (
                "host_sandbox_slots",
                "Sandboxes holding a VM each host runs at most",
                &self.slots,
            ),
            (
                "host_sandbox_slots_used",
                "Sandboxes holding a VM on each host (pooled VMs included)",
                &self.slots_used,
            ),
            (
                "host_placements_in_flight",
                "Sandboxes placed on each host by this control plane and not yet in its report",
                &self.in_flight,
            ),
        ];
        for (name, help, family) in all {
            registry.register(name, help, family.clone());
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_buckets() -> Histogram {
    // 1 ms to about 131 s: a warm create, a cold boot and a full pause under TCG.
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hearth");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "API requests answered, by method, route template and status",
            requests.clone(),
        );
        let latency =
            Family::<RouteLabels, Histogram, Buckets>::new_with_constructor(latency_buckets as _);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an API request (create, pause, resume, snapshot, fork are their routes)",
            latency.clone(),
        );
        let sandboxes = Family::<StateLabels, Gauge>::default();
        registry.register(
            "sandboxes",
            "Sandboxes in the database by state (all teams)",
            sandboxes.clone(),
        );
        let host_sandboxes = Family::<HostLabels, Gauge>::default();
        registry.register(
            "host_sandboxes_running",
            "Sandboxes each answering host agent reports running",
            host_sandboxes.clone(),
        );
        let hosts = Gauge::default();
        registry.register(
            "hosts_answering",
            "Host agents that answered their last Info",
            hosts.clone(),
        );
        let ops =
            Family::<OpLabels, Histogram, Buckets>::new_with_constructor(latency_buckets as _);
        registry.register(
            "sandbox_operation_duration_seconds",
            "Time to complete a sandbox create, pause, resume or fork that succeeded (REST and E2B APIs)",
            ops.clone(),
        );
        let op_errors = Family::<OpErrorLabels, Counter>::default();
        registry.register(
            "sandbox_operation_errors",
            "Sandbox creates, pauses, resumes and forks that failed or were refused, by kind",
            op_errors.clone(),
        );
        let host_gauges = HostGauges::default();
        host_gauges.register(&mut registry);
        Self {
            registry,
            requests,
            latency,
            sandboxes,
            host_sandboxes,
            hosts,
            ops,
            op_errors,
            host_gauges,
        }
    }

    /// Count one answered request of `route` (a route template).
    pub fn observe_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                method: method.to_owned(),
                route: route.to_owned(),
            })
            .observe(seconds);
    }
}

impl Metrics {
    /// Record one finished lifecycle operation that began at `started`.
    pub fn observe_op<T>(&self, op: Op, started: std::time::Instant, result: &AppResult<T>) {
        match result {
            Ok(_) => self
                .ops
                .get_or_create(&OpLabels {
                    op: op.as_str().to_owned(),
                })
                .observe(started.elapsed().as_secs_f64()),
            Err(e) => {
                self.op_errors
                    .get_or_create(&OpErrorLabels {
                        op: op.as_str().to_owned(),
                        kind: e.kind().to_owned(),
                    })
                    .inc();
            }
        }
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const MIB: u64 = 1 << 20;

impl App {
    /// The metrics in Prometheus' text format, sandbox and host figures as of now.
    pub async fn render_metrics(&self) -> AppResult<String> {
        let counts = self.db.count_sandboxes_by_state().await?;
        for state in STORED_STATES {
            let n = counts.get(&state).copied().unwrap_or(0);
            self.metrics
                .sandboxes
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut answering = 0;
        let held = self.hosts.held();
        let g = &self.metrics.host_gauges;
        for entry in self.hosts.entries() {
            if let Some(info) = &entry.info {
                answering += 1;
                let host = HostLabels {
                    host_id: info.host_id.to_string(),
                };
                self.metrics
                    .host_sandboxes
                    .get_or_create(&host)
                    .set(i64::from(info.running));
                let c = &info.capacity;
                let set = |f: &Family<HostLabels, Gauge>, v: u64| {
                    f.get_or_create(&host).set(gauge(v));
                };
                set(&g.memory_capacity, c.memory_capacity_mb.saturating_mul(MIB));
                set(&g.memory_used, c.memory_used_mb.saturating_mul(MIB));
                set(&g.vcpus_capacity, c.vcpus_capacity);
                set(&g.vcpus_used, c.vcpus_used);
                set(&g.disk_free, c.disk_free_mb.saturating_mul(MIB));
                set(&g.slots, u64::from(c.max_sandboxes));
                set(&g.slots_used, u64::from(c.vm_sandboxes));
                set(
                    &g.in_flight,
                    held.get(&info.host_id)
                        .map_or(0, |h| u64::from(h.sandboxes)),
                );
            }
        }
        self.metrics.hosts.set(answering);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry)
            .map_err(|e| AppError::Internal(format!("encoding the metrics failed: {e}")))?;
        Ok(out)
    }
}

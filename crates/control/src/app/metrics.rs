//! Prometheus metrics of the control plane (`GET /metrics`, text format), kept with
//! `prometheus-client`, the Prometheus project's own Rust client.
//!
//! Request counts and latencies are labelled by route template (`/v1/sandboxes/{id}`,
//! never an ID) so that their number stays bounded; sandbox counts by state are read
//! from the database at scrape time (every team together: no label names a team).

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

type Buckets = fn() -> Histogram;

/// The control plane's metric families.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, Buckets>,
    sandboxes: Family<StateLabels, Gauge>,
    host_sandboxes: Family<HostLabels, Gauge>,
    hosts: Gauge,
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
        Self {
            registry,
            requests,
            latency,
            sandboxes,
            host_sandboxes,
            hosts,
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
        for entry in self.hosts.entries() {
            if let Some(info) = &entry.info {
                answering += 1;
                self.metrics
                    .host_sandboxes
                    .get_or_create(&HostLabels {
                        host_id: info.host_id.to_string(),
                    })
                    .set(i64::from(info.running));
            }
        }
        self.metrics.hosts.set(answering);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry)
            .map_err(|e| AppError::Internal(format!("encoding the metrics failed: {e}")))?;
        Ok(out)
    }
}

//! `hearth bench api`: requests per second and latency of the API's read path,
//! `GET /v1/sandboxes` and `GET /v1/sandboxes/{id}`, with many sandboxes in the
//! database. Needs no host agent and boots nothing.
//!
//! It starts a real control plane in this process on a database of its own (a fresh
//! SQLite file by default; `--database-url` passes another URL to the server as is),
//! puts `--sandboxes` rows of a new team in it through `hearth_db`, then drives both
//! endpoints from a load generator on loopback: `--connections` keep-alive HTTP/1.1
//! connections, each sending its share of a fixed number of requests one after
//! another (closed loop, bounded). The generator runs on a thread and runtime of its
//! own so that it does not queue behind the server's tasks; both share the machine's
//! cores, as a load generator on the same host does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use chrono::Utc;
use clap::Args;
use hearth_control::ControlConfig;
use hearth_db::{NewApiKey, NewSandbox, OnTimeout, SandboxState};
use hearth_types::{SandboxId, TeamId};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use super::{percentile, progress};
use crate::Global;

/// The goal on SQLite on a 2-core machine: at least this many requests a second...
const GOAL_RPS: f64 = 5000.0;
/// ... with the 99th percentile under this.
const GOAL_P99_MS: f64 = 20.0;

#[derive(Args)]
pub struct ApiBench {
    /// Sandboxes put in the database (one new team's) before the load.
    #[arg(long, default_value_t = 1000)]
    pub sandboxes: usize,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Requests measured per endpoint, split over the connections.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Requests per endpoint sent first and not measured (warm caches and pools).
    #[arg(long, default_value_t = 1000)]
    pub warmup: usize,
    /// Database of the control plane the benchmark starts, as `hearth server
    /// --database-url` takes it. Default: a fresh SQLite file in a temporary
    /// directory. The rows it adds (a team `bench-…`, its key and sandboxes) stay:
    /// point it at a scratch database.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Page size of `GET /v1/sandboxes` (default: the API's, 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Where to write the results file.
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
}

/// What one endpoint's run measured.
struct Phase {
    requests: usize,
    errors: usize,
    first_error: Option<String>,
    /// Latencies in ms, sorted.
    latencies: Vec<f64>,
    /// From the first measured request sent to the last answer read.
    wall: Duration,
    bytes: u64,
}

impl Phase {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64()
    }
    fn p(&self, q: f64) -> f64 {
        percentile(&self.latencies, q)
    }
    fn met(&self) -> bool {
        self.errors == 0 && self.rps() >= GOAL_RPS && self.p(99.0) < GOAL_P99_MS
    }
}

pub async fn run(g: &Global, b: ApiBench) -> Result<()> {
    if b.sandboxes == 0 || b.connections == 0 || b.requests == 0 {
        bail!("--sandboxes, --connections and --requests must be at least 1");
    }
    if b.connections > 512 {
        bail!("--connections must be at most 512 (the server serves 1024 at once)");
    }
    // A shared machine's other work shows in the numbers: say how busy it was.
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    let scratch = tempfile::Builder::new()
        .prefix("hearth-bench-api-")
        .tempdir()?;
    let url = b.database_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            scratch.path().join("hearth.db").display()
        )
    });
    let backend = url.split(':').next().unwrap_or("").to_owned();
    let mut cfg = ControlConfig::new("127.0.0.1:0".parse()?, url);
    // No host agent: keep the reconciler out of the measurement.
    cfg.reconcile_interval = Duration::from_secs(24 * 3600);
    let control = hearth_control::start(cfg)
        .await
        .context("starting the control plane")?;
    let addr = control.local_addr();
    let result = bench(&b, &control, addr).await;
    control.shutdown().await;
    let (list, get) = result?;
    report(g, &b, &backend, &list, &get, load_at_start)
}

async fn bench(
    b: &ApiBench,
    control: &hearth_control::RunningControl,
    addr: SocketAddr,
) -> Result<(Phase, Phase)> {
    let db = &control.state().app().db;
    let suffix: String = SandboxId::generate().as_str()[3..11].to_owned();
    let team = db.create_team(&format!("bench-{suffix}")).await?;
    let (_, key) = db
        .create_api_key(&NewApiKey::new(team.id, "bench", false))
        .await?;
    let t = Instant::now();
    let ids = fill(db, team.id, b.sandboxes).await?;
    progress(&format!(
        "{} sandboxes inserted in {:.1} s; {} connections, {} requests per endpoint",
        ids.len(),
        t.elapsed().as_secs_f64(),
        b.connections,
        b.requests
    ));
    let list_path = match b.limit {
        Some(l) => format!("/v1/sandboxes?limit={l}"),
        None => "/v1/sandboxes".to_owned(),
    };
    let list = load(addr, &key, vec![list_path], b).await?;
    progress(&format!(
        "list: {:.0} req/s, p99 {:.2} ms",
        list.rps(),
        list.p(99.0)
    ));
    let paths = ids.iter().map(|id| format!("/v1/sandboxes/{id}")).collect();
    let get = load(addr, &key, paths, b).await?;
    progress(&format!(
        "get:  {:.0} req/s, p99 {:.2} ms",
        get.rps(),
        get.p(99.0)
    ));
    Ok((list, get))
}

/// `n` running sandboxes of `team`, newest first by a millisecond each.
async fn fill(db: &hearth_db::Db, team: TeamId, n: usize) -> Result<Vec<SandboxId>> {
    let now = Utc::now();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = SandboxId::generate();
        db.insert_sandbox(&NewSandbox {
            id: id.clone(),
            team_id: team,
            template: "minimal".parse()?,
            state: SandboxState::Running,
            vcpus: 1,
            memory_mb: 256,
            disk_size_mb: 1024,
            timeout_s: 3600,
            on_timeout: OnTimeout::Destroy,
            env: Default::default(),
            metadata: [("bench".to_owned(), i.to_string())].into(),
            host_id: None,
            created_at: now - chrono::Duration::milliseconds(i as i64),
            expires_at: now + chrono::Duration::days(1),
            secure: false,
            auto_resume: false,
        })
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Drive `paths` (round robin) from the generator's own thread and runtime.
async fn load(addr: SocketAddr, key: &str, paths: Vec<String>, b: &ApiBench) -> Result<Phase> {
    let key = format!("Bearer {key}");
    let (connections, requests, warmup) = (b.connections, b.requests, b.warmup);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-load".into())
        .spawn(move || {
            let r = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(drive(
                        addr,
                        key,
                        Arc::new(paths),
                        connections,
                        requests,
                        warmup,
                    ))
                });
            let _ = tx.send(r);
        })?;
    rx.await.context("the load generator thread died")?
}

/// One connection's measured part.
struct ConnResult {
    latencies: Vec<f64>,
    errors: usize,
    first_error: Option<String>,
    bytes: u64,
    started: Instant,
    ended: Instant,
}

async fn drive(
    addr: SocketAddr,
    key: String,
    paths: Arc<Vec<String>>,
    connections: usize,
    requests: usize,
    warmup: usize,
) -> Result<Phase> {
    let key = Arc::new(key);
    // Every connection is open and warm before any measured request is sent.
    let ready = Arc::new(tokio::sync::Barrier::new(connections));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let share = |total: usize| total / connections + usize::from(c < total % connections);
        let (n, w) = (share(requests), share(warmup));
        let (paths, key, ready) = (paths.clone(), key.clone(), ready.clone());
        tasks.spawn(
            async move { connection(addr, &key, &paths, c, connections, w, n, &ready).await },
        );
    }
    let mut out: Vec<ConnResult> = Vec::with_capacity(connections);
    while let Some(r) = tasks.join_next().await {
        out.push(r??);
    }
    let started = out
        .iter()
        .map(|r| r.started)
        .min()
        .context("no connection")?;
    let ended = out.iter().map(|r| r.ended).max().context("no connection")?;
    let mut latencies: Vec<f64> = out
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    latencies.sort_by(|a, b| a.total_cmp(b));
    Ok(Phase {
        requests: latencies.len(),
        errors: out.iter().map(|r| r.errors).sum(),
        first_error: out.iter().find_map(|r| r.first_error.clone()),
        latencies,
        wall: ended - started,
        bytes: out.iter().map(|r| r.bytes).sum(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    addr: SocketAddr,
    key: &str,
    paths: &[String],
    c: usize,
    stride: usize,
    warmup: usize,
    n: usize,
    ready: &tokio::sync::Barrier,
) -> Result<ConnResult> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    for i in 0..warmup {
        one(&mut sender, key, &paths[(c + i * stride) % paths.len()]).await?;
    }
    ready.wait().await;
    let mut r = ConnResult {
        latencies: Vec::with_capacity(n),
        errors: 0,
        first_error: None,
        bytes: 0,
        started: Instant::now(),
        ended: Instant::now(),
    };
    for i in warmup..warmup + n {
        let path = &paths[(c + i * stride) % paths.len()];
        let (status, body, ms) = one(&mut sender, key, path).await?;
        r.latencies.push(ms);
        r.bytes += body.len() as u64;
        if status != http::StatusCode::OK {
            r.errors += 1;
            if r.first_error.is_none() {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                r.first_error = Some(format!("{path}: {status} {text}"));
            }
        }
    }
    r.ended = Instant::now();
    Ok(r)
}

/// One request on the connection: its status, body and latency in ms (sent to body read).
async fn one(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    key: &str,
    path: &str,
) -> Result<(http::StatusCode, Bytes, f64)> {
    let req = http::Request::get(path)
        .header(http::header::HOST, "127.0.0.1")
        .header(http::header::AUTHORIZATION, key)
        .body(Empty::<Bytes>::new())?;
    sender.ready().await.context("the connection closed")?;
    let t = Instant::now();
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body, t.elapsed().as_secs_f64() * 1000.0))
}

fn phase_json(out: &mut serde_json::Map<String, Value>, name: &str, path: &str, p: &Phase) {
    out.insert(format!("{name}_path"), json!(path));
    out.insert(format!("{name}_requests"), json!(p.requests));
    out.insert(format!("{name}_errors"), json!(p.errors));
    out.insert(format!("{name}_rps"), json!(p.rps().round()));
    out.insert(format!("{name}_p50_ms"), json!(round2(p.p(50.0))));
    out.insert(format!("{name}_p99_ms"), json!(round2(p.p(99.0))));
    out.insert(format!("{name}_max_ms"), json!(round2(p.p(100.0))));
    out.insert(
        format!("{name}_bytes_per_response"),
        json!(p.bytes / p.requests.max(1) as u64),
    );
    out.insert(format!("{name}_goal_met"), json!(p.met()));
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn report(
    g: &Global,
    b: &ApiBench,
    backend: &str,
    list: &Phase,
    get: &Phase,
    load_at_start: Option<f64>,
) -> Result<()> {
    let mut out = serde_json::Map::new();
    out.insert("benchmark".into(), json!("api"));
    out.insert("at".into(), json!(Utc::now().to_rfc3339()));
    out.insert("database".into(), json!(backend));
    out.insert("sandboxes".into(), json!(b.sandboxes));
    out.insert("connections".into(), json!(b.connections));
    out.insert("requests_per_endpoint".into(), json!(b.requests));
    out.insert("warmup_per_endpoint".into(), json!(b.warmup));
    out.insert("list_page_size".into(), json!(b.limit.unwrap_or(100)));
    out.insert(
        "cpus".into(),
        json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
    );
    out.insert("loadavg_1m_at_start".into(), json!(load_at_start));
    phase_json(&mut out, "list", "/v1/sandboxes", list);
    phase_json(&mut out, "get", "/v1/sandboxes/{id}", get);
    out.insert("goal_min_rps".into(), json!(GOAL_RPS));
    out.insert("goal_max_p99_ms".into(), json!(GOAL_P99_MS));
    out.insert("goal_met".into(), json!(list.met() && get.met()));
    if let Some(e) = list.first_error.as_ref().or(get.first_error.as_ref()) {
        out.insert("first_error".into(), json!(e));
    }
    let result = Value::Object(out);
    std::fs::create_dir_all(&b.out_dir)
        .with_context(|| format!("creating {}", b.out_dir.display()))?;
    let file = b
        .out_dir
        .join(format!("api-{}.json", Utc::now().format("%Y%m%dT%H%M%SZ")));
    std::fs::write(&file, serde_json::to_vec_pretty(&result)?)?;
    if g.json {
        println!("{result}");
        return Ok(());
    }
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>9} {:>7}",
        "endpoint", "req/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    for (name, p) in [("GET /v1/sandboxes", list), ("GET /v1/sandboxes/{id}", get)] {
        println!(
            "{name:<22} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            p.rps(),
            p.p(50.0),
            p.p(99.0),
            p.p(100.0),
            p.errors
        );
    }
    let met = list.met() && get.met();
    println!(
        "goal (>= {GOAL_RPS:.0} req/s, p99 < {GOAL_P99_MS} ms, no errors, each endpoint): {}",
        if met { "met" } else { "missed" }
    );
    if let Some(e) = list.first_error.as_ref().or(get.first_error.as_ref()) {
        println!("first error: {e}");
    }
    println!("written to {}", file.display());
    Ok(())
}

//! The agent's Prometheus `/metrics` on a real VM (QEMU under TCG): a create, a
//! pause, a pause of an unknown sandbox and a resume show up as counts, histogram buckets and
//! errors by code; sandboxes by state and capacity use follow the sandbox; no line
//! names the sandbox or its team. The main port serves the metrics only with the
//! agent token; the plain metrics listener serves nothing else.
//!
//! Needs root and `$HEARTH_IMAGES_DIR` (kernel + `minimal`); without images the
//! tests SKIP loudly.

use std::net::SocketAddr;
use std::time::Duration;

use connectrpc::client::{ClientConfig, HttpClient};
use connectrpc::ErrorCode;
use hearth_agent::{Agent, RunningAgent, AGENT_TOKEN_HEADER};
use hearth_proto::hearth::agent::v1 as pb;
use hearth_types::SandboxId;
use http_body_util::{BodyExt, Empty};

mod common;
use common::{config, init_tracing, real_images, Client};

const TOKEN: &str = "metrics-test-token";

async fn start(images: &std::path::Path, run: &std::path::Path) -> RunningAgent {
    let mut c = config(images, run);
    c.token = Some(TOKEN.into());
    c.metrics_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    Agent::start(c).await.expect("agent starts")
}

fn client(agent: &RunningAgent) -> Client {
    let uri = format!("http://{}", agent.local_addr()).parse().unwrap();
    let cfg = ClientConfig::new(uri).with_default_header(AGENT_TOKEN_HEADER, TOKEN);
    pb::HostAgentClient::new(HttpClient::plaintext(), cfg)
}

/// `method path` on `addr` with an optional agent token: status, content type, body.
async fn get(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let client: hyper_util::client::legacy::Client<_, Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header(AGENT_TOKEN_HEADER, t);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(req.body(Empty::new()).unwrap()),
    )
    .await
    .expect("metrics request timed out")
    .expect("metrics request failed");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ct, String::from_utf8_lossy(&body).into_owned())
}

/// A scrape of the plain metrics listener.
async fn scrape(agent: &RunningAgent) -> String {
    let (status, ct, text) = get(agent.metrics_addr().unwrap(), "GET", "/metrics", None).await;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    text
}

/// The value of the series `name{labels}` exactly (labels as written), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The `(le, count)` buckets of the operation histogram for `op`, in order.
fn buckets(text: &str, op: &str) -> Vec<(f64, f64)> {
    let prefix = "hearth_agent_operation_duration_seconds_bucket{";
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(&format!("op=\"{op}\"")))
        .map(|l| {
            let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, l.rsplit(' ').next().unwrap().parse().unwrap())
        })
        .collect()
}

/// One observation of `op` in a plausible bucket: cumulative counts that never
/// fall, 1 in `+Inf`, 0 at 1 ms (nothing here is that fast under TCG but a pause,
/// so only "at most `+Inf`" holds for pause), and a sum that matches.
fn assert_one_observation(text: &str, op: &str, slower_than_1ms: bool) {
    let b = buckets(text, op);
    assert!(b.len() >= 10, "{op}: {b:?}\n{text}");
    assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "{op}: {b:?}");
    assert_eq!(b.last().unwrap(), &(f64::INFINITY, 1.0), "{op}: {b:?}");
    if slower_than_1ms {
        assert_eq!(b[0], (0.001, 0.0), "{op}: {b:?}");
    }
    let series = |s: &str| format!("hearth_agent_operation_duration_seconds_{s}{{op=\"{op}\"}}");
    assert_eq!(value(text, &series("count")), Some(1.0), "{op}\n{text}");
    let sum = value(text, &series("sum")).unwrap();
    assert!(sum > 0.0 && sum < 120.0, "{op}: {sum}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_real_sandboxs_create_pause_resume_and_name_no_tenant() {
    init_tracing();
    let Some(images) = real_images("metrics_count_a_real_sandboxs_create_pause_resume") else {
        return;
    };
    let run = tempfile::tempdir().unwrap();
    let agent = start(&images, run.path()).await;
    let c = client(&agent);
    let id = SandboxId::generate();
    let team = "team-of-the-metrics-test";

    let empty = scrape(&agent).await;
    assert_eq!(
        value(&empty, "hearth_agent_sandboxes{state=\"running\"}"),
        Some(0.0)
    );
    assert_eq!(value(&empty, "hearth_agent_memory_used_bytes"), Some(0.0));
    let capacity = value(&empty, "hearth_agent_memory_capacity_bytes").unwrap();
    assert!(capacity > 0.0, "{empty}");
    assert!(value(&empty, "hearth_agent_sandbox_slots").unwrap() >= 1.0);

    c.create_sandbox(pb::CreateSandboxRequest {
        spec: pb::SandboxSpec {
            sandbox_id: id.to_string(),
            template: "minimal".into(),
            vcpus: 1,
            memory_mb: 256,
            disk_size_mb: 256,
            team_id: team.into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    })
    .await
    .expect("create");
    let running = scrape(&agent).await;
    assert_eq!(
        value(&running, "hearth_agent_sandboxes{state=\"running\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&running, "hearth_agent_memory_used_bytes"),
        Some(256.0 * 1048576.0)
    );
    assert_eq!(value(&running, "hearth_agent_vcpus_used"), Some(1.0));
    assert_eq!(
        value(&running, "hearth_agent_sandbox_slots_used"),
        Some(1.0)
    );
    assert_eq!(
        value(&running, "hearth_agent_creates_total{start=\"boot\"}"),
        Some(1.0),
        "no warm variant here: a boot\n{running}"
    );
    assert_one_observation(&running, "create", true);

    let pause = pb::PauseSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    };
    c.pause_sandbox(pause).await.expect("pause");
    let e = c
        .pause_sandbox(pb::PauseSandboxRequest {
            sandbox_id: SandboxId::generate().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    let paused = scrape(&agent).await;
    assert_eq!(
        value(&paused, "hearth_agent_sandboxes{state=\"paused\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&paused, "hearth_agent_sandboxes{state=\"running\"}"),
        Some(0.0)
    );
    assert_eq!(value(&paused, "hearth_agent_memory_used_bytes"), Some(0.0));
    assert_one_observation(&paused, "pause", false);
    assert_eq!(
        value(
            &paused,
            "hearth_agent_operation_errors_total{op=\"pause\",code=\"not_found\"}"
        ),
        Some(1.0),
        "{paused}"
    );

    c.resume_sandbox(pb::ResumeSandboxRequest {
        sandbox_id: id.to_string(),
        ..Default::default()
    })
    .await
    .expect("resume");
    let resumed = scrape(&agent).await;
    assert_eq!(
        value(&resumed, "hearth_agent_sandboxes{state=\"running\"}"),
        Some(1.0)
    );
    assert_one_observation(&resumed, "resume", true);
    assert_eq!(
        value(&resumed, "hearth_agent_memory_used_bytes"),
        Some(256.0 * 1048576.0)
    );
    // Only bounded labels: no sandbox, team or key anywhere.
    for needle in [id.as_str(), team, TOKEN] {
        assert!(!resumed.contains(needle), "{needle} in\n{resumed}");
    }

    agent.destroy_all().await;
    let gone = scrape(&agent).await;
    assert_eq!(
        value(&gone, "hearth_agent_sandboxes{state=\"running\"}"),
        Some(0.0)
    );
    assert_eq!(value(&gone, "hearth_agent_sandbox_slots_used"), Some(0.0));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_port_wants_the_token_and_the_metrics_port_serves_metrics_only() {
    init_tracing();
    let Some(images) = real_images("the_main_port_wants_the_token") else {
        return;
    };
    let run = tempfile::tempdir().unwrap();
    let agent = start(&images, run.path()).await;
    let main = agent.local_addr();
    let (status, _, _) = get(main, "GET", "/metrics", None).await;
    assert_eq!(status, 401);
    let (status, _, _) = get(main, "GET", "/metrics", Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, ct, text) = get(main, "GET", "/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(
        text.contains("hearth_agent_memory_capacity_bytes"),
        "{text}"
    );

    // The tokenless listener is no way around the token: no RPC, no proxy, no console.
    let plain = agent.metrics_addr().unwrap();
    let id = SandboxId::generate();
    for (method, path) in [
        ("POST", "/hearth.agent.v1.HostAgent/Info".to_owned()),
        (
            "POST",
            "/hearth.agent.v1.HostAgent/ListSandboxes".to_owned(),
        ),
        ("GET", format!("/sandboxes/{id}/envd/health")),
        ("GET", format!("/sandboxes/{id}/console")),
        ("GET", format!("/sandboxes/{id}/port/8080/")),
    ] {
        let (status, _, body) = get(plain, method, &path, Some(TOKEN)).await;
        assert!(
            status == 404 || status == 405,
            "{method} {path}: {status} {body}"
        );
    }
    let (status, _, _) = get(plain, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    agent.shutdown().await;
}

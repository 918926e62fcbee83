//! Long operations against the reconciler and against clients that go away, on real
//! VMs: a `hearth agent` process (QEMU/TCG, its own images directory) and a control
//! plane run in this process, so that its reconciler can run every 100 ms and its
//! logs can be read.
//!
//! - `the_reconciler_never_takes_a_sandbox_in_flight_for_lost`: one sandbox through
//!   repeated pause, resume, snapshots (running and paused, with and without memory)
//!   and a fork while its state is sampled through the API; none of it may ever
//!   read `stopped` or `error`, hearth may record no change of its own, and at the
//!   end the database and the host agree.
//! - `long_operations_finish_when_the_client_disconnects`: create, pause, resume,
//!   snapshot and fork, each sent by a client that closes its side once the
//!   operation is under way (the host is slowed by injected delays); each ends in the
//!   state it implies, on the host too, the client reads no byte of a response, and
//!   the server logs no failed write.

mod common;
#[path = "common/plane.rs"]
mod plane;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hearth_control::HostClient;
use plane::{logs, Plane};
use serde_json::{json, Value};

/// Samples a sandbox's state through the API until stopped; records every
/// state it read, in order, without repeats.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Vec<String>, usize)>>,
}

impl Sampler {
    fn start(p: &Plane, id: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, key, id) = (
            format!("{}/v1/sandboxes/{id}", p.url),
            p.key.clone(),
            id.to_owned(),
        );
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let http = reqwest::blocking::Client::new();
            let (mut seen, mut samples) = (Vec::<String>::new(), 0usize);
            // Bounded: the test stops it long before this many.
            for _ in 0..200_000 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let v: Value = http
                    .get(&url)
                    .bearer_auth(&key)
                    .timeout(Duration::from_secs(30))
                    .send()
                    .and_then(|r| r.json())
                    .unwrap_or_else(|e| panic!("sampling {id}: {e}"));
                let state = v["state"].as_str().unwrap_or("?").to_owned();
                samples += 1;
                if seen.last() != Some(&state) {
                    seen.push(state);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (seen, samples)
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("sampler")
    }
}

#[test]
fn the_reconciler_never_takes_a_sandbox_in_flight_for_lost() {
    if !e2e_available() {
        return;
    }
    // Snapshots are slowed on the host, so that a pause or resume sent meanwhile
    // waits for it there while its row is already marked.
    let p = Plane::start(&[("HEARTH_AGENT_FAULTS", "snapshot:start=delay:1000")]);
    let started = Instant::now();
    let sb = p.post(
        "/v1/sandboxes",
        json!({"template": "minimal", "timeout_s": 3600}),
    );
    let id = sb["id"].as_str().unwrap().to_owned();
    assert_eq!(sb["state"], "running", "{sb}");
    let sampler = Sampler::start(&p, &id);
    let mut templates = Vec::new();
    let mut ops = 0;
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let path = |op: &str| format!("/v1/sandboxes/{id}/{op}");
        // Running: a snapshot (memory in odd rounds), then pause.
        let name = format!("race-run-{round}");
        p.post(
            &path("snapshots"),
            json!({"name": name, "memory": round % 2 == 1}),
        );
        templates.push(name);
        assert_eq!(p.post(&path("pause"), json!({}))["state"], "paused");
        // Paused: a snapshot of its saved state, then resume.
        let name = format!("race-paused-{round}");
        p.post(&path("snapshots"), json!({"name": name, "memory": true}));
        templates.push(name);
        assert_eq!(p.post(&path("resume"), json!({}))["state"], "running");
        // Pause and resume back to back, twice.
        for _ in 0..2 {
            assert_eq!(p.post(&path("pause"), json!({}))["state"], "paused");
            assert_eq!(p.post(&path("resume"), json!({}))["state"], "running");
        }
        ops += 7;
    }
    // Concurrent: a pause sent while a snapshot holds the sandbox on its host, then a
    // resume sent while a snapshot of the paused sandbox does.
    let path = |op: &str| format!("/v1/sandboxes/{id}/{op}");
    for (name, op, then) in [
        ("race-busy-run", "pause", "paused"),
        ("race-busy-paused", "resume", "running"),
    ] {
        std::thread::scope(|scope| {
            let snap = scope.spawn(|| p.post(&path("snapshots"), json!({"name": name})));
            p.wait(
                "the snapshot to start on the host",
                Duration::from_secs(60),
                || p.building(),
            );
            assert_eq!(p.post(&path(op), json!({}))["state"], then);
            snap.join().expect("snapshot");
        });
        templates.push(name.to_owned());
        ops += 2;
    }
    // A fork: its copy is made while the source is frozen.
    let fork = p.post(&format!("/v1/sandboxes/{id}/fork"), json!({"count": 1}));
    let copy = fork["sandboxes"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(fork["sandboxes"][0]["state"], "running", "{fork}");
    ops += 1;
    // Let the reconciler run over the settled sandbox a few more times.
    std::thread::sleep(Duration::from_millis(500));
    let (seen, samples) = sampler.finish();
    eprintln!(
        "race: {ops} operations in {:.1} s, {samples} samples, states seen {seen:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        seen.iter().all(|s| s == "running" || s == "paused"),
        "the sandbox read {seen:?} while it was paused, resumed and snapshotted"
    );
    assert!(seen.len() > 2, "the sampler saw no pause: {seen:?}");
    let changes = p.own_changes();
    assert!(
        changes.is_empty(),
        "hearth changed sandboxes on its own: {changes:?}"
    );
    // Database and host agree.
    assert_eq!(p.state(&id), "running");
    assert_eq!(p.host_phase(&id).as_deref(), Some("running"));
    assert_eq!(p.state(&copy), "running");
    assert_eq!(p.host_phase(&copy).as_deref(), Some("running"));
    let listed = p.template_names();
    for t in &templates {
        assert!(listed.contains(t), "template {t} missing from {listed:?}");
    }
    // Nothing of it is left once deleted.
    for sid in [&id, &copy] {
        p.ok(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{sid}"),
            None,
        );
    }
    for t in &templates {
        p.ok(reqwest::Method::DELETE, &format!("/v1/templates/{t}"), None);
    }
    for sid in [&id, &copy] {
        assert_eq!(p.host_phase(sid), None);
        let left = leftovers(sid, &p.stacks[0].run_dir());
        assert!(left.is_empty(), "{sid} left {left:?}");
    }
}

/// Send `method path body` on a connection of its own and close our side once
/// `started` says the operation is under way; returns the bytes of a response that
/// arrived after (there must be none).
fn send_and_hang_up(
    p: &Plane,
    method: &str,
    path: &str,
    body: Value,
    mut started: impl FnMut() -> bool,
) -> Vec<u8> {
    let addr = p.url.trim_start_matches("http://");
    let mut conn = TcpStream::connect(addr).expect("connect");
    let body = body.to_string();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        p.key,
        body.len()
    )
    .expect("send");
    p.wait(
        &format!("{method} {path} under way"),
        Duration::from_secs(120),
        &mut started,
    );
    // Gone: nothing more is sent, and what the server may still write is read
    // below only to prove that it writes nothing.
    conn.shutdown(Shutdown::Write).expect("shutdown");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    got
}

#[test]
fn long_operations_finish_when_the_client_disconnects() {
    if !e2e_available() {
        return;
    }
    // Slow steps on the host, so that each call is cut off while the host works.
    let p = Plane::start(&[(
        "HEARTH_AGENT_FAULTS",
        "pause:start=delay:1500,resume:start=delay:1500,snapshot:start=delay:1500",
    )]);
    let building = || p.building();
    let rows = |state: &str| -> Vec<String> {
        p.get(&format!("/v1/sandboxes?state={state}"))["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };

    // Create: cut off while it boots (its row is `starting`).
    let got = send_and_hang_up(
        &p,
        "POST",
        "/v1/sandboxes",
        json!({"template": "minimal", "timeout_s": 3600}),
        || !rows("starting").is_empty(),
    );
    assert!(
        got.is_empty(),
        "a response was written after the client left: {:?}",
        String::from_utf8_lossy(&got)
    );
    let id = rows("starting").into_iter().next().unwrap_or_else(|| {
        rows("running")
            .into_iter()
            .next()
            .expect("the created sandbox")
    });
    p.wait("the create to finish", Duration::from_secs(180), || {
        p.state(&id) == "running"
    });
    assert_eq!(p.host_phase(&id).as_deref(), Some("running"));

    // Pause: cut off once its row is marked, while the host is slowed.
    let got = send_and_hang_up(
        &p,
        "POST",
        &format!("/v1/sandboxes/{id}/pause"),
        json!({}),
        || p.state(&id) == "paused",
    );
    assert!(got.is_empty(), "pause answered a gone client");
    assert_ne!(
        p.host_phase(&id).as_deref(),
        Some("paused"),
        "the call was to be cut off before the host finished"
    );
    p.wait("the host to pause it", Duration::from_secs(60), || {
        p.host_phase(&id).as_deref() == Some("paused")
    });
    assert_eq!(p.state(&id), "paused");

    // Snapshot of the paused sandbox: cut off while the host builds the template.
    let got = send_and_hang_up(
        &p,
        "POST",
        &format!("/v1/sandboxes/{id}/snapshots"),
        json!({"name": "gone-client", "memory": true}),
        building,
    );
    assert!(got.is_empty(), "snapshot answered a gone client");
    p.wait(
        "the snapshot to be recorded",
        Duration::from_secs(120),
        || p.template_names().iter().any(|t| t == "gone-client"),
    );
    assert!(!building(), "a half-built template is left");
    let on_host =
        p.rt.block_on(p.hosts[0].list_templates())
            .expect("templates");
    assert!(
        on_host
            .iter()
            .any(|t| t.source_sandbox_id.as_ref().map(|s| s.as_str()) == Some(id.as_str())),
        "the host holds no template made from {id}"
    );

    // Resume: cut off once its row is marked running.
    let got = send_and_hang_up(
        &p,
        "POST",
        &format!("/v1/sandboxes/{id}/resume"),
        json!({}),
        || p.state(&id) == "running",
    );
    assert!(got.is_empty(), "resume answered a gone client");
    p.wait("the host to resume it", Duration::from_secs(60), || {
        p.host_phase(&id).as_deref() == Some("running")
    });
    assert_eq!(p.state(&id), "running");
    // Its deadline was set from the resume: a real one, not the provisional.
    let sb = p.get(&format!("/v1/sandboxes/{id}"));
    assert!(sb["expires_at"].is_string(), "{sb}");

    // Fork: cut off once its copy's row exists.
    let got = send_and_hang_up(
        &p,
        "POST",
        &format!("/v1/sandboxes/{id}/fork"),
        json!({"count": 1}),
        || rows("starting").iter().any(|s| s != &id),
    );
    assert!(got.is_empty(), "fork answered a gone client");
    p.wait("the fork to finish", Duration::from_secs(180), || {
        rows("starting").is_empty() && rows("running").len() == 2
    });
    let copy = rows("running").into_iter().find(|s| s != &id).unwrap();
    assert_eq!(p.host_phase(&copy).as_deref(), Some("running"));
    assert_eq!(p.host_phase(&id).as_deref(), Some("running"));

    // Everything the operations did is recorded as done, by the key that asked.
    let audit = p.get("/v1/audit?limit=100");
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor_key_id"].is_string())
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "sandbox.create",
        "sandbox.pause",
        "sandbox.snapshot",
        "sandbox.resume",
        "sandbox.fork",
    ] {
        assert!(
            actions.contains(&a),
            "{a} not in the audit log: {actions:?}"
        );
    }
    assert!(p.own_changes().is_empty(), "{:?}", p.own_changes());
    // The server never wrote to a connection that was gone.
    let log = logs().text();
    for needle in [
        "Broken pipe",
        "os error 32",
        "Connection reset",
        "error writing",
    ] {
        assert!(
            !log.contains(needle),
            "the server log has {needle:?}:\n{log}"
        );
    }

    for sid in [&id, &copy] {
        p.ok(
            reqwest::Method::DELETE,
            &format!("/v1/sandboxes/{sid}"),
            None,
        );
        assert_eq!(p.host_phase(sid), None);
        let left = leftovers(sid, &p.stacks[0].run_dir());
        assert!(left.is_empty(), "{sid} left {left:?}");
    }
    p.ok(reqwest::Method::DELETE, "/v1/templates/gone-client", None);
}

//! Templates copied between hosts, on real VMs: two `hearth agent` processes (own
//! images and run directories, loopback ports) under one control plane. A sandbox
//! on one host is snapshotted with its memory; `App::ensure_template_on` copies the
//! template to the other host (export relayed into import), the catalogue records
//! both hosts, and the other host restores a sandbox from its copy that still has
//! what the source had written. Deleting the template removes it from both.

mod common;
#[path = "common/plane.rs"]
mod plane;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use hearth_control::app::hosts::{CreateSpec, ProcEvent, ProcSpec};
use hearth_control::HostClient;
use hearth_types::{HostId, SandboxId, TeamId, TemplateName};
use plane::Plane;
use serde_json::json;

/// stdout of `sh -c script` in sandbox `id` on `host`.
fn run(p: &Plane, host: &dyn HostClient, id: &SandboxId, script: &str) -> String {
    p.rt.block_on(async {
        let mut events = host
            .start_process(
                id,
                ProcSpec {
                    cmd: "sh".into(),
                    args: vec!["-c".into(), script.into()],
                    env: Default::default(),
                    cwd: None,
                    user: "root".into(),
                    stdin: false,
                    pty: None,
                    deadline: Duration::from_secs(60),
                },
            )
            .await
            .expect("start process");
        let mut out = Vec::new();
        while let Some(ev) = events.next().await {
            match ev.expect("process event") {
                ProcEvent::Stdout(b) => out.extend_from_slice(&b),
                ProcEvent::Exited { .. } => break,
                _ => {}
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

#[test]
fn a_warm_snapshot_is_copied_to_another_host_and_boots_there() {
    if !e2e_available() {
        return;
    }
    let p = Plane::start_hosts(2, &[]);
    let infos: Vec<_> = p
        .hosts
        .iter()
        .map(|h| p.rt.block_on(h.info()).expect("info"))
        .collect();
    let sb = p.post(
        "/v1/sandboxes",
        json!({"template": "minimal", "timeout_s": 3600}),
    );
    let id = sb["id"].as_str().unwrap().to_owned();
    let team: TeamId = sb["team_id"].as_str().unwrap().parse().unwrap();
    let src_host: HostId = sb["host_id"].as_str().unwrap().parse().unwrap();
    let (src, dst) = if infos[0].host_id == src_host {
        (0, 1)
    } else {
        (1, 0)
    };
    let dst_host = infos[dst].host_id.clone();
    let r = p.post(
        &format!("/v1/sandboxes/{id}/exec"),
        json!({"cmd": ["sh", "-c", "echo from-the-source > /root/marker; sync"]}),
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    let t = p.post(
        &format!("/v1/sandboxes/{id}/snapshots"),
        json!({"name": "travels", "memory": true}),
    );
    assert_eq!(t["has_memory"], true, "{t}");
    assert_eq!(t["hosts"], json!([src_host.to_string()]));

    // The copy, as the scheduler asks for it.
    let name: TemplateName = "travels".parse().unwrap();
    let app = p.control.as_ref().unwrap().state().app().clone();
    let started = Instant::now();
    let host_name =
        p.rt.block_on(app.ensure_template_on(&dst_host, team, &name))
            .expect("copy");
    let copy_s = started.elapsed().as_secs_f64();
    assert!(host_name.as_str().starts_with("snap-"), "{host_name}");
    let on_dst = p.rt.block_on(p.hosts[dst].list_templates()).unwrap();
    let copied = on_dst
        .iter()
        .find(|t| t.name == host_name)
        .expect("the copy on the target host");
    assert!(copied.has_memory, "the copy lost its memory");
    let on_src = p.rt.block_on(p.hosts[src].list_templates()).unwrap();
    let orig = on_src.iter().find(|t| t.name == host_name).unwrap();
    assert_eq!(copied.apparent_bytes, orig.apparent_bytes);
    eprintln!(
        "copy: {} bytes apparent, {} allocated at the source, {} at the target, {copy_s:.2} s",
        orig.apparent_bytes, orig.allocated_bytes, copied.allocated_bytes
    );
    assert!(
        !std::fs::read_dir(p.stacks[dst].images.join("templates"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".tmp-")),
        "a build directory is left on the target"
    );
    // The agent's import refuses a stream cut short, one without its token, and
    // leaves nothing of either.
    let import_url = |n: &str| {
        format!(
            "http://127.0.0.1:{}/templates/{n}/import",
            p.stacks[dst].agent_port
        )
    };
    let http = reqwest::blocking::Client::new();
    let whole: Vec<u8> = p.rt.block_on(async {
        let mut s = p.hosts[src].export_template(&host_name).await.unwrap();
        let mut v = Vec::new();
        while let Some(b) = s.next().await {
            v.extend_from_slice(&b.unwrap());
        }
        v
    });
    let r = http
        .put(import_url("snap-cutshort0000000"))
        .header(hearth_proto::AGENT_TOKEN_HEADER, AGENT_TOKEN)
        .body(whole[..whole.len() - 100].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "{:?}", r.text());
    let r = http
        .put(import_url("snap-notoken00000000"))
        .body(whole[..4096].to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let names: Vec<String> = std::fs::read_dir(p.stacks[dst].images.join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("cutshort") || n.contains("notoken")),
        "{names:?}"
    );
    // The catalogue says both; asking again copies nothing.
    let mut want = vec![src_host.to_string(), dst_host.to_string()];
    want.sort();
    let t = p.get("/v1/templates/travels");
    let mut hosts: Vec<String> = t["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap().to_owned())
        .collect();
    hosts.sort();
    assert_eq!(hosts, want, "{t}");
    let again =
        p.rt.block_on(app.ensure_template_on(&dst_host, team, &name))
            .expect("again");
    assert_eq!(again, host_name);

    // The target restores a sandbox from its copy: the source's file is there.
    let copy_id = SandboxId::generate();
    p.rt.block_on(p.hosts[dst].create_sandbox(CreateSpec {
        sandbox_id: copy_id.clone(),
        team_id: team,
        template: host_name.clone(),
        vcpus: u32::try_from(t["vcpus"].as_u64().unwrap()).unwrap(),
        memory_mb: u32::try_from(t["memory_mb"].as_u64().unwrap()).unwrap(),
        disk_size_mb: u32::try_from(t["disk_size_mb"].as_u64().unwrap()).unwrap(),
        expires_at_unix_ms: 0,
        env: Default::default(),
    }))
    .expect("create from the copy");
    let seen = run(&p, &p.hosts[dst], &copy_id, "cat /root/marker");
    assert_eq!(seen.trim(), "from-the-source");
    let log = std::fs::read_to_string(p.stacks[dst].dir.path().join("agent.log")).unwrap();
    assert!(log.contains("template imported"), "{log}");
    p.rt.block_on(p.hosts[dst].destroy_sandbox(&copy_id))
        .expect("destroy");

    // Deleting the template removes it from both hosts.
    p.ok(
        reqwest::Method::DELETE,
        &format!("/v1/sandboxes/{id}"),
        None,
    );
    p.ok(reqwest::Method::DELETE, "/v1/templates/travels", None);
    for h in &p.hosts {
        let left = p.rt.block_on(h.list_templates()).unwrap();
        assert!(
            !left.iter().any(|t| t.name == host_name),
            "{host_name} left on a host"
        );
    }
    for (i, sid) in [(src, id.as_str()), (dst, copy_id.as_str())] {
        let left = leftovers(sid, &p.stacks[i].run_dir());
        assert!(left.is_empty(), "{sid} left {left:?}");
    }
}

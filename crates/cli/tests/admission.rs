//! Admission on real VMs through the whole stack: per-team quotas (checked and reserved
//! in one step by the control plane) and host capacity (checked and reserved in one
//! step by the host agent). Every refusal names the limit and its value and leaves
//! nothing behind: no row, no VM, no run directory.

mod common;

use std::sync::Arc;

use common::{e2e_available, images_dir, leftovers, Stack};
use reqwest::Method;
use serde_json::{json, Value};

fn post_create(stack: &Stack, body: &Value) -> (u16, Value) {
    let r = stack
        .req(Method::POST, "/v1/sandboxes")
        .json(body)
        .send()
        .expect("create request");
    let status = r.status().as_u16();
    (status, r.json().expect("json body"))
}

/// Every sandbox row of the team, finished ones included.
fn all_rows(stack: &Stack) -> Vec<Value> {
    let v: Value = stack
        .req(Method::GET, "/v1/sandboxes?all=true")
        .send()
        .unwrap()
        .json()
        .unwrap();
    v["sandboxes"].as_array().cloned().unwrap_or_default()
}

fn run_dirs(stack: &Stack) -> usize {
    std::fs::read_dir(stack.run_dir().join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn twenty_concurrent_creates_against_a_quota_of_five_give_exactly_five() {
    if !e2e_available() {
        return;
    }
    let stack = Arc::new(Stack::start_custom(
        images_dir(),
        &[],
        &[("HEARTH_TEAM_MAX_SANDBOXES", "5")],
    ));
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let stack = stack.clone();
            std::thread::spawn(move || {
                post_create(&stack, &json!({"template": "minimal", "timeout_s": 600}))
            })
        })
        .collect();
    let results: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let created: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, v)| v)
        .collect();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(created.len(), 5, "{results:?}");
    assert_eq!(refused.len(), 15, "{results:?}");
    for v in &refused {
        assert_eq!(v["error"]["code"], "quota_exceeded", "{v}");
        assert_eq!(
            v["error"]["message"], "team quota: at most 5 concurrent sandboxes",
            "{v}"
        );
    }
    for v in &created {
        assert_eq!(v["state"], "running", "{v}");
    }
    // Refused creates left no row and no host resources.
    assert_eq!(all_rows(&stack).len(), 5);
    assert_eq!(run_dirs(&stack), 5);
    // A freed place can be taken again.
    let first = created[0]["id"].as_str().unwrap().to_string();
    stack.delete(&first);
    assert!(leftovers(&first, &stack.run_dir()).is_empty());
    let (s, v) = post_create(&stack, &json!({"template": "minimal", "timeout_s": 600}));
    assert_eq!(s, 201, "{v}");
    let mut ids: Vec<String> = created[1..]
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    ids.push(v["id"].as_str().unwrap().to_string());
    for id in &ids {
        stack.delete(id);
        assert!(leftovers(id, &stack.run_dir()).is_empty(), "{id}");
    }
}

/// Memory of this host in MiB, as the agent reads it.
fn host_memory_mb() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal");
    kib / 1024.0
}

#[test]
fn over_capacity_creates_are_refused_with_the_limit_and_leave_nothing() {
    if !e2e_available() {
        return;
    }
    // Room for one 256 MiB guest (about 400 MiB of promisable memory) and 2 vCPUs.
    let reserve = 1024.0;
    let overcommit = format!("{:.6}", 400.0 / (host_memory_mb() - reserve));
    let stack = Stack::start_custom(
        images_dir(),
        &[
            "--memory-overcommit",
            &overcommit,
            "--memory-reserve-mb",
            "1024",
            "--max-vcpus",
            "2",
        ],
        &[],
    );
    let (s, v) = post_create(&stack, &json!({"template": "minimal", "vcpus": 3}));
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["code"], "capacity_exceeded", "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    // The scheduler refuses before the host is asked, by the host's own numbers.
    assert!(
        msg.starts_with("no host can take 3 vCPUs, 256 MiB of memory and 1024 MiB of disk: the most free is host-")
            && msg.contains(" with 2 vCPUs, ")
            && msg.ends_with("(short of vCPUs)"),
        "{msg}"
    );

    let (s, v) = post_create(&stack, &json!({"template": "minimal", "memory_mb": 256}));
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (s, v) = post_create(&stack, &json!({"template": "minimal", "memory_mb": 256}));
    assert_eq!(s, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("no host can take 1 vCPU, 256 MiB of memory")
            && msg.ends_with("(short of memory)"),
        "{msg}"
    );
    assert_eq!(all_rows(&stack).len(), 1, "refused creates left rows");
    assert_eq!(run_dirs(&stack), 1, "refused creates left run dirs");
    stack.delete(&id);
    assert!(leftovers(&id, &stack.run_dir()).is_empty());
    drop(stack);

    // A disk reserve larger than any free space: nothing fits.
    let stack = Stack::start_custom(images_dir(), &["--disk-reserve-mb", "1000000000"], &[]);
    let (s, v) = post_create(&stack, &json!({"template": "minimal"}));
    assert_eq!(s, 409, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("no host can take 1 vCPU, 256 MiB of memory and 1024 MiB of disk")
            && msg.contains(", 0 MiB of disk and ")
            && msg.ends_with("(short of disk)"),
        "{msg}"
    );
    assert!(all_rows(&stack).is_empty());
    assert_eq!(run_dirs(&stack), 0);
}

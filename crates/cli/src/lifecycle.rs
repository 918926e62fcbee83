//! Client commands for sandboxes that keep their memory: pause, resume, timeout,
//! fork, and snapshots (templates a team makes from its sandboxes).

use anyhow::Result;
use reqwest::Method;
use serde_json::{json, Value};

use crate::output::{print_json, print_object, print_table};
use crate::{client, Global};

const PLATFORM_TEAM: &str = "00000000-0000-0000-0000-000000000000";
const SNAPSHOT_COLUMNS: &[&str] = &[
    "name",
    "has_memory",
    "size_bytes",
    "allocated_bytes",
    "source_sandbox_id",
    "created_at",
];

fn show(g: &Global, v: &Value) {
    if g.json {
        print_json(v);
    } else {
        print_object(v);
    }
}

async fn post(g: &Global, path: &str, body: Option<Value>) -> Result<Value> {
    let c = client(g)?;
    let mut req = c.request(Method::POST, path);
    if let Some(b) = body {
        req = req.json(&b);
    }
    c.json(req).await
}

pub async fn pause(g: &Global, id: &str) -> Result<()> {
    let v = post(g, &format!("/v1/sandboxes/{id}/pause"), None).await?;
    if g.json {
        print_json(&v);
    } else {
        println!("{id} paused (resume it with `hearth sandbox resume {id}`)");
    }
    Ok(())
}

pub async fn resume(g: &Global, id: &str, timeout_s: Option<u32>) -> Result<()> {
    let body = timeout_s.map(|t| json!({ "timeout_s": t }));
    let v = post(g, &format!("/v1/sandboxes/{id}/resume"), body).await?;
    if g.json {
        print_json(&v);
    } else {
        println!(
            "{id} running until {}",
            v["expires_at"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

pub async fn timeout(g: &Global, id: &str, seconds: u32) -> Result<()> {
    let v = post(
        g,
        &format!("/v1/sandboxes/{id}/timeout"),
        Some(json!({ "timeout_s": seconds })),
    )
    .await?;
    if g.json {
        print_json(&v);
    } else {
        let what = if v["on_timeout"] == "pause" {
            "paused"
        } else {
            "destroyed"
        };
        println!(
            "{id} will be {what} at {}",
            v["expires_at"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

pub async fn fork(g: &Global, id: &str, count: u32) -> Result<()> {
    let v = post(
        g,
        &format!("/v1/sandboxes/{id}/fork"),
        Some(json!({ "count": count })),
    )
    .await?;
    if g.json {
        print_json(&v);
    } else {
        let rows = v["sandboxes"].as_array().cloned().unwrap_or_default();
        print_table(&rows, &["id", "template", "state", "expires_at"]);
    }
    Ok(())
}

pub async fn snapshot_create(g: &Global, id: &str, name: &str, memory: bool) -> Result<()> {
    let v = post(
        g,
        &format!("/v1/sandboxes/{id}/snapshots"),
        Some(json!({ "name": name, "memory": memory })),
    )
    .await?;
    if g.json {
        print_json(&v);
    } else {
        show(g, &v);
        println!("start sandboxes from it with `hearth sandbox create --template {name}`");
    }
    Ok(())
}

/// The team's own templates (not the platform's built-ins).
pub async fn snapshot_list(g: &Global) -> Result<()> {
    let c = client(g)?;
    let v: Value = c.json(c.request(Method::GET, "/v1/templates")).await?;
    let own: Vec<Value> = v["templates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t["team_id"] != PLATFORM_TEAM)
        .collect();
    if g.json {
        print_json(&json!({ "templates": own }));
    } else {
        print_table(&own, SNAPSHOT_COLUMNS);
    }
    Ok(())
}

pub async fn snapshot_rm(g: &Global, names: &[String]) -> Result<()> {
    let c = client(g)?;
    let mut failed = 0;
    let mut removed = Vec::new();
    for name in names {
        match c
            .send(c.request(Method::DELETE, &format!("/v1/templates/{name}")))
            .await
        {
            Ok(_) => {
                if !g.json {
                    println!("{name} deleted");
                }
                removed.push(name.clone());
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {name}: {e:#}");
            }
        }
    }
    if g.json {
        print_json(&json!({ "deleted": removed }));
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} snapshots could not be deleted (`hearth snapshot list` shows yours)",
            names.len()
        );
    }
    Ok(())
}

/// Processes running in a sandbox (those started before a pause too).
pub async fn ps(g: &Global, id: &str) -> Result<()> {
    let c = client(g)?;
    let v: Value = c
        .json(c.request(Method::GET, &format!("/v1/sandboxes/{id}/processes")))
        .await?;
    if g.json {
        print_json(&v);
    } else {
        let rows: Vec<Value> = v["processes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let args: Vec<&str> = p["args"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                json!({
                    "pid": p["pid"],
                    "command": format!("{} {}", p["cmd"].as_str().unwrap_or(""), args.join(" ")).trim_end(),
                })
            })
            .collect();
        print_table(&rows, &["pid", "command"]);
    }
    Ok(())
}

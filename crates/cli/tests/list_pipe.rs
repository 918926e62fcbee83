//! `hearth sandbox list` against a stand-in API on loopback (no VMs): it follows
//! `next_token` through every page, and ends quietly when its output pipe closes
//! (`hearth sandbox list | head -1`) instead of panicking.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// Serves `GET /v1/sandboxes` in two pages of `per_page` rows; records request lines.
fn fake_api(per_page: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            if reader.read_line(&mut first).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            s.lock().unwrap().push(first.clone());
            let second = first.contains("next_token=page2");
            let rows: Vec<serde_json::Value> = (0..per_page)
                .map(|i| {
                    serde_json::json!({
                        "id": format!("sb-{:016}", i + if second { per_page } else { 0 }),
                        "template": "minimal", "state": "running", "vcpus": 1,
                        "memory_mb": 256, "created_at": "2026-01-01T00:00:00Z",
                        "expires_at": "2026-01-01T00:05:00Z"
                    })
                })
                .collect();
            let next = if second {
                serde_json::Value::Null
            } else {
                "page2".into()
            };
            let body = serde_json::json!({"sandboxes": rows, "next_token": next}).to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, seen)
}

fn hearth(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hearth"));
    c.args(args)
        .env("HEARTH_URL", url)
        .env("HEARTH_API_KEY", "hk_test")
        .env("HOME", std::env::temp_dir());
    c
}

#[test]
fn list_reads_every_page_and_passes_all() {
    let (url, seen) = fake_api(3);
    let out = hearth(&url, &["sandbox", "list", "--all", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sandboxes"].as_array().unwrap().len(), 6);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|l| l.contains("all=true")), "{seen:?}");
}

#[test]
fn a_closed_output_pipe_ends_the_listing_without_a_panic() {
    // Far more than a pipe buffer (64 KiB) of table rows.
    let (url, _) = fake_api(3000);
    let mut child = hearth(&url, &["sandbox", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut header = String::new();
    stdout.read_line(&mut header).unwrap();
    assert!(header.starts_with("ID"), "{header:?}");
    drop(stdout); // as `head -1` does
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        status.success() || status.signal() == Some(libc_sigpipe()),
        "{status:?}: {err}"
    );
}

/// SIGPIPE's number on Linux.
fn libc_sigpipe() -> i32 {
    13
}

//! End-to-end on a real VM: the sandbox proxy in front of the API reaches a web
//! server inside the sandbox by host name (`<port>-<id>.localhost:<api port>`) and by
//! E2B's headers, splices a WebSocket-style upgrade through control plane and host
//! agent both ways, and answers for a closed port in E2B's words. The guest's own
//! servers are busybox `httpd` and an `nc` script that answers 101 and echoes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{e2e_available, Stack};

/// Poll `f` until it returns `Some` or `limit` passes.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Read from `s` until `needle` appears (or the read timeout / EOF).
fn read_until(s: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(needle.len()).any(|w| w == needle) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

const WS_SCRIPT: &str = r#"#!/bin/sh
# Read the request head, switch protocols, then echo every byte back.
while IFS= read -r line; do
  line=$(printf '%s' "$line" | tr -d '\r')
  [ -z "$line" ] && break
done
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n'
exec cat
"#;

#[test]
fn guest_web_servers_and_upgrades_through_the_proxy() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let sb = stack.create(serde_json::json!({"template": "minimal"}));
    let id = sb["id"].as_str().unwrap().to_owned();
    let r = stack.sh(
        &id,
        "mkdir -p /tmp/www && echo hello-from-the-guest > /tmp/www/index.html && httpd -p 8000 -h /tmp/www",
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    let up = stack.put_file(&id, &[("path", "/tmp/ws.sh")], WS_SCRIPT);
    assert!(up.status().is_success(), "{:?}", up.text());
    let r = stack.sh(
        &id,
        "chmod +x /tmp/ws.sh && setsid nc -ll -p 9000 -e /tmp/ws.sh </dev/null >/dev/null 2>&1 &",
    );
    assert_eq!(r["exit_code"], 0, "{r}");

    let http = stack.http();
    let host = format!("8000-{id}.localhost:{}", stack.api_port);
    // By host name, as a browser would (no API key, no token: other ports are public).
    let body = eventually(Duration::from_secs(20), || {
        let r = http
            .get(format!("{}/index.html", stack.url))
            .header("host", &host)
            .send()
            .ok()?;
        r.status().is_success().then(|| r.text().ok()).flatten()
    })
    .expect("the guest's web server answered through the proxy");
    assert_eq!(body.trim(), "hello-from-the-guest");
    // By E2B's headers.
    let r = http
        .get(format!("{}/index.html", stack.url))
        .header("e2b-sandbox-id", &id)
        .header("e2b-sandbox-port", "8000")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().unwrap().trim(), "hello-from-the-guest");

    // HTTP/2 with prior knowledge (what gRPC-style clients send to an http:// URL),
    // turned into HTTP/1.1 for the guest; the API answers it too.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}"])
        .args([
            "-H",
            &format!("e2b-sandbox-id: {id}"),
            "-H",
            "e2b-sandbox-port: 8000",
        ])
        .arg(format!("{}/index.html", stack.url))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "hello-from-the-guest\n\n2", "{out:?}");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}"])
        .arg(format!("{}/v1/health", stack.url))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.trim_end().ends_with("\n2"), "{out:?}");

    // A closed port: E2B's words, E2B's shape.
    let r = http
        .get(format!("{}/", stack.url))
        .header("host", format!("8001-{id}.localhost"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 502);
    let v: serde_json::Value = r.json().unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("port is not open"),
        "{v}"
    );

    // The guest agent's port needs the sandbox's access token.
    let r = http
        .get(format!("{}/health", stack.url))
        .header("e2b-sandbox-id", &id)
        .header("e2b-sandbox-port", "49983")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "{:?}", r.text());

    // An upgrade, spliced through both hops, both ways.
    let mut s = eventually(Duration::from_secs(20), || {
        let mut s = TcpStream::connect(("127.0.0.1", stack.api_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
        write!(
            s,
            "GET /chat HTTP/1.1\r\nHost: 9000-{id}.localhost\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .ok()?;
        let head = read_until(&mut s, b"\r\n\r\n");
        String::from_utf8_lossy(&head)
            .starts_with("HTTP/1.1 101")
            .then_some(s)
    })
    .expect("the guest switched protocols through the proxy");
    for i in 0..3 {
        let line = format!("ping-{i}\n");
        s.write_all(line.as_bytes()).unwrap();
        let echoed = read_until(&mut s, line.as_bytes());
        assert!(
            String::from_utf8_lossy(&echoed).contains(&line),
            "echo {i}: {:?}",
            String::from_utf8_lossy(&echoed)
        );
    }
    drop(s);
    stack.delete(&id);
}

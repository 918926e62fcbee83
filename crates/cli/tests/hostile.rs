//! Hostile guests, on real VMs through the whole stack (REST -> control -> agent -> VM).
//!
//! A template whose guest agent was replaced by a busybox `nc` script answers every
//! call the way an attacker would: redirects to another sandbox's guest agent and to a
//! listener on the host's loopback, an endless body, a header dripped forever, a
//! giant header, garbage where a Connect stream belongs. Each must end in a clear
//! error, no request may leave for a redirect target, no other sandbox's data may come
//! back, and the control plane's memory must stay bounded. A guest that reboots
//! itself must end as an `error` sandbox, never as a new agent that hearth trusts.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{e2e_available, images_dir, Stack};
use reqwest::Method;
use serde_json::{json, Value};

/// PID 1 of the hostile template: brings up the network the way the real agent does,
/// then serves port 49983 with `nc`, one handler process per connection.
const HOSTILE_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc 2>/dev/null
mount -t tmpfs tmpfs /tmp 2>/dev/null
ip link set lo up
ip link set eth0 up
ip addr add 169.254.0.21/30 dev eth0
ip route add default via 169.254.0.22
echo HOSTILE_GUEST_READY > /dev/ttyS0
while :; do nc -ll -p 49983 -e /usr/bin/hostile-handler; sleep 1; done
"#;

/// One HTTP exchange, answered with whatever the request's target asks for.
/// `/init` carries the sandbox env: HOSTILE_TARGET (another guest's address) and
/// HOSTILE_LOOPBACK (a host loopback port) are kept for the redirects.
const HOSTILE_HANDLER: &str = r#"#!/bin/sh
CR=$(printf '\r')
read -r method target version
len=0
while IFS= read -r h; do
  h=${h%"$CR"}
  [ -z "$h" ] && break
  case "$h" in [Cc]ontent-[Ll]ength:*) len=$(echo ${h#*:}) ;; esac
done
case "$target" in
/health*)
  printf 'HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n' ;;
/init*)
  body=$(head -c "$len")
  echo "$body" | sed -n 's/.*"HOSTILE_TARGET" *: *"\([^"]*\)".*/\1/p' > /tmp/target
  echo "$body" | sed -n 's/.*"HOSTILE_LOOPBACK" *: *"\([^"]*\)".*/\1/p' > /tmp/loopback
  printf 'HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n' ;;
*redirect-guest*)
  printf 'HTTP/1.1 302 Found\r\nLocation: http://%s/files?path=/root/secret&username=root\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$(cat /tmp/target)" ;;
*redirect-host*)
  printf 'HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:%s/stolen\r\nContent-Length: 0\r\nConnection: close\r\n\r\n' "$(cat /tmp/loopback)" ;;
*endless*)
  printf 'HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n'
  exec cat /dev/zero ;;
*drip*)
  printf 'HTTP/1.1 200 OK\r\n'
  while :; do printf 'X-Drip: 1\r\n'; sleep 1; done ;;
*bigheader*)
  printf 'HTTP/1.1 200 OK\r\nX-Big: '
  head -c 4000000 /dev/zero | tr '\0' a
  printf '\r\nContent-Length: 0\r\n\r\n' ;;
*)
  printf 'HTTP/1.1 200 OK\r\nContent-Type: application/connect+json\r\nConnection: close\r\n\r\n'
  head -c 2000000 /dev/urandom ;;
esac
"#;

/// An images directory with the real kernel and `minimal`, plus `hostile`: a copy of
/// `minimal` whose guest agent is [`HOSTILE_INIT`] (written with debugfs, no mount).
fn hostile_images(dir: &Path) -> PathBuf {
    let real = images_dir();
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("templates/hostile")).unwrap();
    std::os::unix::fs::symlink(real.join("kernel"), images.join("kernel")).unwrap();
    std::os::unix::fs::symlink(
        real.join("templates/minimal"),
        images.join("templates/minimal"),
    )
    .unwrap();
    let rootfs = images.join("templates/hostile/rootfs.ext4");
    std::fs::copy(real.join("templates/minimal/rootfs.ext4"), &rootfs).unwrap();
    std::fs::copy(
        real.join("templates/minimal/template.json"),
        images.join("templates/hostile/template.json"),
    )
    .unwrap();
    let init = dir.join("hostile-init");
    let handler = dir.join("hostile-handler");
    std::fs::write(&init, HOSTILE_INIT).unwrap();
    std::fs::write(&handler, HOSTILE_HANDLER).unwrap();
    let script = format!(
        "rm /usr/bin/hearth-guest\nwrite {} /usr/bin/hearth-guest\nsif /usr/bin/hearth-guest mode 0100755\n\
         write {} /usr/bin/hostile-handler\nsif /usr/bin/hostile-handler mode 0100755\n",
        init.display(),
        handler.display()
    );
    let cmds = dir.join("debugfs.cmds");
    std::fs::write(&cmds, script).unwrap();
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(&rootfs)
        .output()
        .expect("run debugfs (e2fsprogs)");
    assert!(out.status.success(), "debugfs: {out:?}");
    images
}

/// The guest address of `id` as its agent recorded it.
fn guest_address(stack: &Stack, id: &str) -> String {
    let state = stack
        .run_dir()
        .join("sandboxes")
        .join(id)
        .join("state.json");
    let v: Value = serde_json::from_slice(&std::fs::read(&state).expect("state.json")).unwrap();
    v["record"]["guest_address"]
        .as_str()
        .unwrap_or_else(|| panic!("no guest_address in {v}"))
        .to_string()
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A client that never follows redirects: the test itself must not cross the line.
fn no_redirect_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(150))
        .build()
        .unwrap()
}

/// A refusal must be a JSON error (not a 2xx, not a 3xx to follow, not a 500 crash).
fn assert_clear_error(what: &str, status: u16, body: &str) {
    eprintln!("{what}: {status} {body:.300}");
    assert!(
        status >= 400 && status != 500,
        "{what}: expected a clear error status, got {status}: {body}"
    );
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|_| panic!("{what}: error body is not JSON: {body:.300}"));
    assert!(
        v["error"]["code"].is_string() && v["error"]["message"].is_string(),
        "{what}: {v}"
    );
    // A message for people: no JSON of an inner hop, no host paths.
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !msg.contains("{\"") && !msg.contains("/var/lib") && !msg.contains("/tmp/"),
        "{what}: {msg}"
    );
}

#[test]
fn hostile_guest_agent_gets_nothing() {
    if !e2e_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let images = hostile_images(tmp.path());
    let stack = Stack::start_with_images(images);

    // A listener on the host's loopback that a redirect points at: nothing may reach it.
    let trap = TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    let trapped = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trap_thread = {
        let (trapped, stop) = (trapped.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if trap.accept().is_ok() {
                    trapped.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // The victim, with a root-only secret.
    let victim = stack.create(json!({"template": "minimal", "timeout_s": 900}));
    let victim_id = victim["id"].as_str().unwrap().to_string();
    let r = stack.sh(
        &victim_id,
        "echo TOPSECRET-4711 > /root/secret && chmod 600 /root/secret",
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    let target = guest_address(&stack, &victim_id);

    // The attacker's sandbox: its guest agent is the hostile script.
    let evil = stack.create(json!({
        "template": "hostile",
        "timeout_s": 900,
        "env": {"HOSTILE_TARGET": target, "HOSTILE_LOOPBACK": trap_port.to_string()},
    }));
    let evil_id = evil["id"].as_str().unwrap().to_string();
    assert_eq!(evil["state"], "running", "{evil}");

    let client = no_redirect_client();
    let server_pid = stack.server.as_ref().unwrap().id();
    let rss_before = rss_kib(server_pid);
    let download = |path: &str| {
        let t = Instant::now();
        let r = client
            .get(format!("{}/v1/sandboxes/{evil_id}/files", stack.url))
            .bearer_auth(&stack.api_key)
            .query(&[("path", path)])
            .send()
            .expect("download request");
        (r, t)
    };

    // Redirects, to another guest and to the host: refused, never followed.
    for path in ["/redirect-guest", "/redirect-host"] {
        let (r, _) = download(path);
        let status = r.status().as_u16();
        let body = r.text().unwrap_or_default();
        assert!(
            !body.contains("TOPSECRET"),
            "{path}: another sandbox's file came back: {body}"
        );
        assert_clear_error(path, status, &body);
    }
    // Redirects on the exec path too (the Connect client must not follow them either).
    let r = client
        .post(format!("{}/v1/sandboxes/{evil_id}/exec", stack.url))
        .bearer_auth(&stack.api_key)
        .json(&json!({"cmd": ["true"]}))
        .send()
        .unwrap();
    let (status, body) = (r.status().as_u16(), r.text().unwrap_or_default());
    assert_clear_error("exec against a garbage Connect stream", status, &body);

    // A giant header line: refused quickly.
    let (r, t) = download("/bigheader");
    let (status, body) = (r.status().as_u16(), r.text().unwrap_or_default());
    assert_clear_error("4 MB header", status, &body);
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());

    // Headers dripped forever: cut off by a timeout, with a clear error.
    let (r, t) = download("/drip");
    let (status, body) = (r.status().as_u16(), r.text().unwrap_or_default());
    assert_clear_error("dripped headers", status, &body);
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "dripping guest held the request for {:?}",
        t.elapsed()
    );

    // An endless body streams through without piling up in the control plane.
    let (r, _) = download("/endless");
    assert_eq!(r.status().as_u16(), 200);
    let mut reader = r.take(48 << 20);
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let rss_after = rss_kib(server_pid);
    drop(reader);
    assert!(got > 1 << 20, "endless body: only {got} bytes streamed");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "control plane grew from {rss_before} KiB to {rss_after} KiB while streaming {got} bytes"
    );

    // Nothing went to the redirect target on the host.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    trap_thread.join().unwrap();
    assert_eq!(
        trapped.load(Ordering::SeqCst),
        0,
        "a request reached the host loopback redirect target"
    );

    // The victim is untouched and still serves its owner.
    let r = stack.sh(&victim_id, "cat /root/secret");
    assert_eq!(r["stdout"], "TOPSECRET-4711\n", "{r}");
    stack.delete(&evil_id);
    stack.delete(&victim_id);
}

#[test]
fn guest_that_reboots_itself_ends_as_error() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let sb = stack.create(json!({"template": "minimal", "timeout_s": 600}));
    let id = sb["id"].as_str().unwrap().to_string();
    // Root in the guest replaces its own init, then reboots the machine: with
    // -no-reboot the VM ends instead of starting an agent that hearth would trust.
    let _ = stack
        .http()
        .post(format!("{}/v1/sandboxes/{id}/exec", stack.url))
        .bearer_auth(&stack.api_key)
        .json(&json!({"cmd": ["sh", "-c",
            "printf '#!/bin/sh\\nexec nc -ll -p 49983 -e /bin/cat\\n' > /usr/bin/hearth-guest; sync; \
             (sleep 1; echo b > /proc/sysrq-trigger) >/dev/null 2>&1 &"]}))
        .timeout(Duration::from_secs(60))
        .send();
    let deadline = Instant::now() + Duration::from_secs(90);
    let state = loop {
        let v: Value = stack
            .req(Method::GET, &format!("/v1/sandboxes/{id}"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let state = v["state"].as_str().unwrap_or_default().to_string();
        if state == "error" || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(state["state"], "error", "after the guest rebooted: {state}");
    // It no longer runs anything, and nobody answers for it.
    let status = stack.sh_status(&id, "true");
    assert_eq!(status, 409, "exec on a rebooted sandbox");
    // Deleting it frees whatever its host still held.
    stack.delete(&id);
    let left = common::leftovers(&id, &stack.run_dir());
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn guest_user_is_a_permission_boundary() {
    if !e2e_available() {
        return;
    }
    let stack = Stack::start();
    let sb = stack.create(json!({"template": "minimal", "timeout_s": 600}));
    let id = sb["id"].as_str().unwrap().to_string();
    let r = stack.sh(
        &id,
        "echo ROOTONLY > /root/secret && chmod 600 /root/secret && chmod 700 /root \
         && ln -s /root/secret /tmp/link",
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    // Through the files API, as `user`: neither the file nor a symlink to it.
    for path in ["/root/secret", "/tmp/link"] {
        let resp = stack.get_file(&id, &[("path", path), ("user", "user")]);
        let status = resp.status().as_u16();
        let body = resp.text().unwrap_or_default();
        assert!(!body.contains("ROOTONLY"), "{path} read as user: {body}");
        assert!(
            (400..500).contains(&status),
            "{path} as user: {status} {body}"
        );
    }
    // Writing where only root may write fails and leaves nothing.
    let resp = stack.put_file(&id, &[("path", "/etc/evil"), ("user", "user")], "x");
    assert!(resp.status().is_client_error(), "{:?}", resp.text());
    let r = stack.sh(&id, "test -e /etc/evil && echo present || echo absent");
    assert_eq!(r["stdout"], "absent\n", "{r}");
    // A process as `user` runs as that user and cannot read root's file either.
    let r = stack.exec(
        &id,
        json!({"cmd": ["sh", "-c", "id -u; cat /root/secret"], "user": "user"}),
    );
    assert_eq!(r["stdout"], "1000\n", "{r}");
    assert_ne!(r["exit_code"], 0, "{r}");
    // Root still reads it.
    let resp = stack.get_file(&id, &[("path", "/root/secret")]);
    assert_eq!(resp.text().unwrap(), "ROOTONLY\n");
    stack.delete(&id);
}

//! The agent against a hostile guest agent: a raw TCP fake (no HTTP library on
//! its side) that answers `/health` and `/init` properly, then garbage, an
//! oversized head, a slow drip, an endless body or a redirect. The agent must
//! answer in bounded time with a clear JSON error, stream without buffering, never
//! follow a redirect, and send the sandbox's access token (only it) to the guest.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_types::SandboxId;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fake_tests::{setup_with, spec, Faults, Setup};
use crate::sandbox::start_create;

/// What the fake guest saw: each request's head, and the `/init` body.
#[derive(Default)]
struct Seen {
    heads: Vec<String>,
    init_body: Option<String>,
}

async fn read_head(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Some((head, buf[end + 4..].to_vec()));
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() > 64 * 1024 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn serve_conn(
    mut s: TcpStream,
    seen: Arc<Mutex<Seen>>,
    redirect_to: SocketAddr,
    evil_init: bool,
) {
    let Some((head, mut rest)) = read_head(&mut s).await else {
        return;
    };
    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
    seen.lock().unwrap().heads.push(head.clone());
    let w = match path.as_str() {
        "/health" => s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await,
        "/init" => {
            let len: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while rest.len() < len {
                let mut b = [0u8; 4096];
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => rest.extend_from_slice(&b[..n]),
                }
            }
            seen.lock().unwrap().init_body = Some(String::from_utf8_lossy(&rest).into_owned());
            if evil_init {
                // Refuses with an endless body full of terminal escapes.
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = format!("1000\r\n{}\r\n", "\u{1b}[2J\n".repeat(1024));
                loop {
                    if s.write_all(chunk.as_bytes()).await.is_err() {
                        break Ok(());
                    }
                }
            } else {
                s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await
            }
        }
        "/echo" => {
            let body = format!(
                "token={:?} agent={:?}",
                header(&head, "x-access-token"),
                header(&head, crate::AGENT_TOKEN_HEADER)
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await
        }
        "/garbage" => {
            s.write_all(b"\x1b[31mSSH-2.0-evil\r\n\x00\x01\x02 not http at all\r\n\r\n")
                .await
        }
        "/huge-head" => {
            let resp = format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(200_000));
            s.write_all(resp.as_bytes()).await
        }
        "/many-headers" => {
            let mut resp = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..500 {
                resp.push_str(&format!("x-h{i}: 1\r\n"));
            }
            resp.push_str("content-length: 0\r\n\r\n");
            s.write_all(resp.as_bytes()).await
        }
        "/drip" => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
            loop {
                if s.write_all(b"x").await.is_err() {
                    break Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        "/endless" => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let chunk = format!("10000\r\n{}\r\n", "z".repeat(0x10000));
            loop {
                if s.write_all(chunk.as_bytes()).await.is_err() {
                    break Ok(());
                }
            }
        }
        "/redirect" => {
            let resp = format!(
                "HTTP/1.1 302 Found\r\nlocation: http://{redirect_to}/files?path=/root/secret\r\ncontent-length: 0\r\n\r\n"
            );
            s.write_all(resp.as_bytes()).await
        }
        _ => {
            s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await
        }
    };
    let _ = w;
}

/// A listener that counts connections (the redirect target).
async fn counting_listener() -> (SocketAddr, Arc<Mutex<u32>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(Mutex::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            *h.lock().unwrap() += 1;
        }
    });
    (addr, hits)
}

struct Hostile {
    s: Setup,
    id: SandboxId,
    seen: Arc<Mutex<Seen>>,
    agent: SocketAddr,
    redirect_hits: Arc<Mutex<u32>>,
}

const AGENT_TOKEN: &str = "agent-secret-for-tests";

/// The fake guest's address and what it sees.
async fn fake_guest(evil_init: bool) -> (SocketAddr, Arc<Mutex<Seen>>, Arc<Mutex<u32>>) {
    let (redirect_to, redirect_hits) = counting_listener().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let guest = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve_conn(s, seen2.clone(), redirect_to, evil_init));
        }
    });
    (guest, seen, redirect_hits)
}

async fn hostile() -> Hostile {
    let (guest, seen, redirect_hits) = fake_guest(false).await;
    let s = setup_with(Faults::default(), Some(guest), |c| {
        c.guest_header_timeout = Duration::from_secs(1);
        c.token = Some(AGENT_TOKEN.into());
    })
    .await;
    let id = SandboxId::generate();
    start_create(&s.ctx, spec(&id))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    let app = crate::router(s.ctx.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    Hostile {
        s,
        id,
        seen,
        agent,
        redirect_hits,
    }
}

impl Hostile {
    /// GET `path` through the proxy, as the control plane would.
    async fn get(&self, path: &str) -> http::Response<hyper::body::Incoming> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<axum::body::Body>();
        let req = http::Request::get(format!(
            "http://{}/sandboxes/{}/envd{path}",
            self.agent, self.id
        ))
        .header(crate::AGENT_TOKEN_HEADER, AGENT_TOKEN)
        .header("x-access-token", "chosen-by-the-caller")
        .body(axum::body::Body::empty())
        .unwrap();
        tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .expect("the agent must answer in bounded time")
            .unwrap()
    }

    async fn get_json_error(&self, path: &str) -> (http::StatusCode, String, Duration) {
        let t = Instant::now();
        let resp = self.get(path).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{path}: not JSON: {}", String::from_utf8_lossy(&body)));
        let msg = v["error"]["message"].as_str().unwrap().to_owned();
        (status, msg, t.elapsed())
    }

    fn token(&self) -> String {
        let h = self.s.ctx.registry.get(&self.id).unwrap();
        let t = h.snapshot().access_token.unwrap();
        t.as_str().to_owned()
    }
}

#[tokio::test]
async fn init_carries_the_token_and_the_proxy_sends_only_it() {
    let h = hostile().await;
    let token = h.token();
    let init = h.seen.lock().unwrap().init_body.clone().unwrap();
    let v: serde_json::Value = serde_json::from_str(&init).unwrap();
    assert_eq!(v["accessToken"], token.as_str());
    assert!(v["envVars"].is_object() && v["timestamp"].is_string());
    {
        let seen = h.seen.lock().unwrap();
        let health = seen.heads.iter().find(|h| h.contains("/health")).unwrap();
        assert!(
            header(health, "x-access-token").is_none(),
            "health stays open"
        );
    }
    let resp = h.get("/echo").await;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("token=Some({token:?}) agent=None")
    );
}

#[tokio::test]
async fn garbage_and_oversized_heads_are_a_short_json_502() {
    let h = hostile().await;
    for path in ["/garbage", "/huge-head", "/many-headers"] {
        let (status, msg, took) = h.get_json_error(path).await;
        assert_eq!(status, http::StatusCode::BAD_GATEWAY, "{path}: {msg}");
        assert!(msg.contains("sent no valid answer"), "{path}: {msg}");
        assert!(msg.len() < 300, "{path}: {msg}");
        assert!(
            !msg.contains('\u{1b}') && !msg.contains('\0'),
            "{path}: {msg:?}"
        );
        assert!(took < Duration::from_secs(3), "{path} took {took:?}");
    }
}

#[tokio::test]
async fn a_slow_drip_ends_at_the_head_timeout() {
    let h = hostile().await;
    let (status, msg, took) = h.get_json_error("/drip").await;
    assert_eq!(status, http::StatusCode::BAD_GATEWAY, "{msg}");
    assert!(msg.contains("did not answer within 1s"), "{msg}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test]
async fn an_endless_body_streams_and_is_not_buffered() {
    let h = hostile().await;
    let resp = h.get("/endless").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0usize;
    let t = Instant::now();
    // 32 MiB arrive piece by piece (the agent does not wait for an end that never comes).
    while got < 32 << 20 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a chunk within 5s")
            .unwrap()
            .unwrap();
        if let Some(d) = frame.data_ref() {
            got += d.len();
        }
    }
    assert!(t.elapsed() < Duration::from_secs(30));
    drop(body);
}

#[tokio::test]
async fn a_redirect_goes_back_to_the_caller_and_is_never_followed() {
    let h = hostile().await;
    let resp = h.get("/redirect").await;
    assert_eq!(resp.status(), http::StatusCode::FOUND);
    assert!(resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|l| l.contains("/root/secret")));
    let _ = resp.into_body().collect().await;
    // Give a (wrong) follow-up request every chance to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(*h.redirect_hits.lock().unwrap(), 0);
}

#[tokio::test]
async fn an_endless_init_refusal_fails_the_create_quickly_and_cleanly() {
    let (guest, _seen, _) = fake_guest(true).await;
    let s = setup_with(Faults::default(), Some(guest), |_| ()).await;
    let id = SandboxId::generate();
    let t = Instant::now();
    let err = start_create(&s.ctx, spec(&id))
        .unwrap()
        .await
        .unwrap()
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let chain = crate::error_chain(&err);
    assert!(chain.contains("HTTP 400"), "{chain}");
    assert!(chain.len() < 500, "{} bytes", chain.len());
    assert!(!chain.contains('\u{1b}'), "unescaped guest text: {chain:?}");
    assert_eq!(
        err.public_message(),
        "the guest agent did not accept its initial configuration"
    );
    assert!(s.ctx.registry.get(&id).is_none());
}

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

#[tokio::test]
async fn an_endless_body_to_a_caller_that_does_not_read_stays_bounded() {
    let h = hostile().await;
    let resp = h.get("/endless").await;
    assert_eq!(resp.status(), 200);
    let before = rss_mib();
    // The caller stalls; a buffering proxy would now fill memory at loopback speed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_mib().saturating_sub(before);
    assert!(
        grown < 200,
        "RSS grew {grown} MiB while the caller did not read"
    );
    drop(resp);
}

//! The API listener's transport limits, over real loopback sockets: slow or idle
//! clients are cut off, a slow but moving upload is not, and the connection cap holds.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::{get, put};
use axum::Router;
use hearth_control::ServerLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(limits: ServerLimits) -> Server {
        let app = Router::new()
            .route("/hi", get(|| async { "hi" }))
            .route("/up", put(|b: Bytes| async move { format!("{}", b.len()) }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(hearth_control::http::server::serve(
            listener,
            app,
            limits,
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server stops")
            .unwrap();
    }
}

fn limits(header: u64, body: u64, max_conn: usize) -> ServerLimits {
    ServerLimits {
        header_read_timeout: Duration::from_millis(header),
        body_idle_timeout: Duration::from_millis(body),
        max_connections: max_conn,
        shutdown_grace: Duration::from_secs(1),
        http2: true,
    }
}

/// Read until the peer closes (or `within` passes); returns what was read and whether
/// the connection was closed.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Read until a full response head and `body_len` body bytes are in.
async fn read_response(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some(i) = text.find("\r\n\r\n") {
            let len = text[..i]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= i + 4 + len {
                return Some(text);
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

#[tokio::test]
async fn partial_request_head_is_cut_after_the_header_timeout() {
    let srv = Server::start(limits(400, 5000, 16)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let t = Instant::now();
    s.write_all(b"GET /hi HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "a half-sent request head was held open for 10 s");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(350),
        "cut before the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "cut late: {took:?}");
    srv.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let srv = Server::start(limits(400, 5000, 1)).await;
    let mut silent = TcpStream::connect(srv.addr).await.unwrap();
    let t = Instant::now();
    let (_, closed) = read_to_close(&mut silent, Duration::from_secs(10)).await;
    assert!(closed, "a silent connection was held open for 10 s");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Its slot (the only one) is free again.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /hi HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("served after the silent one was dropped");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    srv.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let srv = Server::start(limits(400, 5000, 16)).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /hi HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("a response to a complete request");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Keep-alive: the server waits for the next request, but not forever.
    let t = Instant::now();
    let (rest, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "an idle keep-alive connection stayed open 10 s");
    assert!(rest.is_empty(), "unexpected bytes: {rest}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    srv.stop().await;
}

#[tokio::test]
async fn stalled_body_is_cut_but_a_slow_moving_one_is_not() {
    let srv = Server::start(limits(5000, 400, 16)).await;

    // 10 of 100 declared bytes, then silence.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let t = Instant::now();
    let (resp, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "a stalled upload was held open 10 s");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!resp.contains("200 OK"), "a cut body was accepted: {resp}");

    // 100 bytes in 10 pieces, 100 ms apart: 1 s in total, more than the idle limit of
    // 400 ms, but never idle that long.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"PUT /up HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"0123456789").await.unwrap();
    }
    let resp = read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("response to a moving upload");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("\r\n\r\n100"), "{resp}");
    srv.stop().await;
}

#[tokio::test]
async fn connection_cap_holds_and_frees_up() {
    let srv = Server::start(limits(30_000, 30_000, 2)).await;
    // Two connections take both slots (they are mid-request: head not finished).
    let mut a = TcpStream::connect(srv.addr).await.unwrap();
    a.write_all(b"GET /hi HTTP/1.1\r\n").await.unwrap();
    let mut b = TcpStream::connect(srv.addr).await.unwrap();
    b.write_all(b"GET /hi HTTP/1.1\r\n").await.unwrap();
    // A third connects (kernel backlog) but is not served while both are open.
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.write_all(b"GET /hi HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_response(&mut c, Duration::from_millis(800))
            .await
            .is_none(),
        "a third connection was served beyond a cap of 2"
    );
    // Finishing and closing one frees a slot: the third is served.
    a.write_all(b"host: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_response(&mut a, Duration::from_secs(5)).await;
    assert!(resp.is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    drop(a);
    let resp = read_response(&mut c, Duration::from_secs(5))
        .await
        .expect("the waiting connection is served once a slot is free");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    drop(b);
    srv.stop().await;
}

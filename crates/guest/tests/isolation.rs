//! Isolation checks of the guest agent, in process (the server runs on 127.0.0.1:0):
//! the access token, `user` as a permission boundary, and how awkward paths and bodies
//! are answered. The user tests need root (they switch to `nobody`, uid 65534) and
//! return early otherwise.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use connectrpc::ErrorCode;
use hearth_guest::state::AgentState;
use hearth_proto::filesystem::{FilesystemClient, ListDirRequest, StatRequest};
use hearth_proto::process::{
    process_event, ListRequest, ProcessClient, ProcessConfig, StartRequest,
};

const TOKEN: &str = "isolation-token-6f1c9a";
const NOBODY: u32 = 65534;

struct Agent {
    base: String,
    uri: http::Uri,
    /// Sends no token.
    anon: reqwest::Client,
}

/// Starts an agent that has not been initialised yet.
async fn bare_agent() -> Agent {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(hearth_guest::serve(listener, AgentState::default()));
    let base = format!("http://{addr}");
    Agent {
        uri: base.parse().expect("uri"),
        base,
        anon: reqwest::Client::new(),
    }
}

/// Starts an agent initialised with [`TOKEN`].
async fn agent() -> Agent {
    let a = bare_agent().await;
    let resp = a
        .anon
        .post(format!("{}/init", a.base))
        .json(&serde_json::json!({"accessToken": TOKEN, "envVars": {"VISIBLE": "1"}}))
        .send()
        .await
        .expect("init");
    assert_eq!(resp.status(), 204);
    a
}

impl Agent {
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.anon
            .get(format!("{}{path}", self.base))
            .header("x-access-token", TOKEN)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.anon
            .post(format!("{}{path}", self.base))
            .header("x-access-token", TOKEN)
    }

    fn config(&self, token: Option<&str>, user: Option<&str>) -> ClientConfig {
        let mut c = ClientConfig::new(self.uri.clone());
        if let Some(t) = token {
            c = c.with_default_header("x-access-token", t.to_owned());
        }
        if let Some(u) = user {
            let auth = base64::engine::general_purpose::STANDARD.encode(format!("{u}:"));
            c = c.with_default_header("authorization", format!("Basic {auth}"));
        }
        c
    }

    fn process(&self, token: Option<&str>, user: Option<&str>) -> ProcessClient<HttpClient> {
        ProcessClient::new(HttpClient::plaintext(), self.config(token, user))
    }

    fn fs(&self, token: Option<&str>, user: Option<&str>) -> FilesystemClient<HttpClient> {
        FilesystemClient::new(HttpClient::plaintext(), self.config(token, user))
    }

    /// Runs a command to its end; returns stdout and the exit code.
    async fn exec(&self, user: Option<&str>, cmd: &str, args: &[&str]) -> (String, i32) {
        let req = StartRequest {
            process: buffa::MessageField::some(ProcessConfig {
                cmd: cmd.into(),
                args: args.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let client = self.process(Some(TOKEN), user);
        let mut s = client
            .start_with_options(req, CallOptions::default())
            .await
            .expect("start");
        let (mut out, mut code) = (Vec::new(), None);
        while let Some(m) = s.message().await.expect("message") {
            match m
                .to_owned_message()
                .event
                .as_option()
                .and_then(|e| e.event.clone())
            {
                Some(process_event::Event::Data(d)) => {
                    if let Some(process_event::data_event::Output::Stdout(b)) = &d.output {
                        out.extend_from_slice(b);
                    }
                }
                Some(process_event::Event::End(e)) => code = Some(e.exit_code),
                _ => {}
            }
        }
        (
            String::from_utf8_lossy(&out).into_owned(),
            code.expect("end event"),
        )
    }
}

/// Status and JSON body of a response; asserts the body is envd's error shape when the
/// status is an error.
async fn status_json(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    if status >= 400 {
        assert_eq!(body["code"], status, "error body {body}");
        assert!(body["message"].is_string(), "error body {body}");
    }
    (status, body)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// ---------------------------------------------------------------- access token

#[tokio::test]
async fn before_init_only_health_and_init_are_served() {
    let a = bare_agent().await;
    let health = a.anon.get(format!("{}/health", a.base)).send().await;
    assert_eq!(health.expect("health").status(), 204);
    for path in ["/files?path=/etc/hostname", "/envs", "/metrics"] {
        // Even a token is of no use before /init set one.
        let (status, body) = status_json(a.get(path).send().await.expect("get")).await;
        assert_eq!(status, 401, "{path}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("not initialised")),
            "{body}"
        );
    }
    let err = a
        .process(Some(TOKEN), None)
        .list(ListRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code, ErrorCode::Unauthenticated);
    // The first /init must bring a token.
    let (status, _) = status_json(
        a.anon
            .post(format!("{}/init", a.base))
            .json(&serde_json::json!({"envVars": {"A": "1"}}))
            .send()
            .await
            .expect("init"),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn every_endpoint_needs_the_token() {
    let a = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("f");
    std::fs::write(&file, b"data").expect("write");
    let file = file.to_str().expect("path");
    for token in [None, Some("wrong-token"), Some("")] {
        let with = |rb: reqwest::RequestBuilder| match token {
            Some(t) => rb.header("x-access-token", t),
            None => rb,
        };
        let url = |p: &str| format!("{}{p}", a.base);
        let answers = [
            with(a.anon.get(url("/files")).query(&[("path", file)])),
            with(
                a.anon
                    .post(url("/files"))
                    .query(&[("path", file)])
                    .body("x"),
            ),
            with(a.anon.get(url("/envs"))),
            with(a.anon.post(url("/sync"))),
            with(a.anon.get(url("/metrics"))),
        ];
        for rb in answers {
            let (status, _) = status_json(rb.send().await.expect("send")).await;
            assert_eq!(status, 401, "token {token:?}");
        }
        let err = a
            .process(token, None)
            .list(ListRequest::default())
            .await
            .expect_err("process refused");
        assert_eq!(err.code, ErrorCode::Unauthenticated, "token {token:?}");
        let start = StartRequest {
            process: buffa::MessageField::some(ProcessConfig {
                cmd: "true".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let refused = match a.process(token, None).start(start).await {
            Err(e) => e.code,
            Ok(mut s) => s.message().await.expect_err("stream refused").code,
        };
        assert_eq!(refused, ErrorCode::Unauthenticated, "token {token:?}");
        let err = a
            .fs(token, None)
            .stat(StatRequest {
                path: file.into(),
                ..Default::default()
            })
            .await
            .expect_err("filesystem refused");
        assert_eq!(err.code, ErrorCode::Unauthenticated, "token {token:?}");
    }
    // The upload attempts above changed nothing.
    assert_eq!(std::fs::read(dir.path().join("f")).expect("read"), b"data");
    // Health stays open; the right token works.
    let health = a.anon.get(format!("{}/health", a.base)).send().await;
    assert_eq!(health.expect("health").status(), 204);
    let resp = a.get("/files").query(&[("path", file)]).send().await;
    assert_eq!(resp.expect("get").bytes().await.expect("body"), "data");
    a.fs(Some(TOKEN), None)
        .stat(StatRequest {
            path: file.into(),
            ..Default::default()
        })
        .await
        .expect("stat with token");
}

#[tokio::test]
async fn init_rotation_needs_the_current_token() {
    let a = agent().await;
    let init = |token: Option<&str>, body: serde_json::Value| {
        let rb = a.anon.post(format!("{}/init", a.base)).json(&body);
        match token {
            Some(t) => rb.header("x-access-token", t.to_owned()),
            None => rb,
        }
    };
    let hijack = serde_json::json!({"accessToken": "attacker", "envVars": {"EVIL": "1"}});
    for token in [None, Some("attacker"), Some("wrong")] {
        let (status, _) =
            status_json(init(token, hijack.clone()).send().await.expect("init")).await;
        assert_eq!(status, 401, "token {token:?}");
    }
    let envs: serde_json::Value = a
        .get("/envs")
        .send()
        .await
        .expect("envs")
        .json()
        .await
        .expect("json");
    assert!(envs.get("EVIL").is_none(), "{envs}");

    let rotate = serde_json::json!({"accessToken": "rotated-token"});
    let resp = init(Some(TOKEN), rotate).send().await.expect("rotate");
    assert_eq!(resp.status(), 204);
    let (status, _) = status_json(a.get("/envs").send().await.expect("envs")).await;
    assert_eq!(status, 401, "the old token is dead");
    let resp = a
        .anon
        .get(format!("{}/envs", a.base))
        .header("x-access-token", "rotated-token")
        .send()
        .await
        .expect("envs");
    assert_eq!(resp.status(), 200);
    // An /init with the current token and no new one keeps it.
    let resp = init(
        Some("rotated-token"),
        serde_json::json!({"envVars": {"B": "2"}}),
    )
    .send()
    .await
    .expect("init");
    assert_eq!(resp.status(), 204);
    let err = a
        .process(Some(TOKEN), None)
        .list(ListRequest::default())
        .await
        .expect_err("old token");
    assert_eq!(err.code, ErrorCode::Unauthenticated);
    a.process(Some("rotated-token"), None)
        .list(ListRequest::default())
        .await
        .expect("new token");
}

#[tokio::test]
async fn the_token_is_not_visible_to_guest_processes() {
    let a = agent().await;
    let (env, code) = a
        .exec(None, "sh", &["-c", "env; cat /proc/self/environ"])
        .await;
    assert_eq!(code, 0);
    assert!(env.contains("VISIBLE=1"), "{env}");
    assert!(
        !env.contains(TOKEN),
        "token in a process environment: {env}"
    );
    let envs = a
        .get("/envs")
        .send()
        .await
        .expect("envs")
        .text()
        .await
        .expect("body");
    assert!(envs.contains("VISIBLE"), "{envs}");
    assert!(!envs.contains(TOKEN), "{envs}");
}

// ---------------------------------------------------------------- user boundary

/// A world-searchable directory holding: `secret` (root, 0600), `private/` (root 0700)
/// with `inner` inside, `link` -> `private/inner`, `own` (nobody, 0600) and `rootdir/`
/// (root 0755).
fn user_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let write = |name: &str, mode: u32| {
        std::fs::write(p.join(name), format!("content of {name}")).expect("write");
        std::fs::set_permissions(p.join(name), std::fs::Permissions::from_mode(mode))
            .expect("chmod");
    };
    write("secret", 0o600);
    std::fs::create_dir(p.join("private")).expect("mkdir");
    std::fs::set_permissions(p.join("private"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    write("private/inner", 0o644);
    std::os::unix::fs::symlink(p.join("private/inner"), p.join("link")).expect("symlink");
    write("own", 0o600);
    std::os::unix::fs::chown(p.join("own"), Some(NOBODY), Some(NOBODY)).expect("chown");
    std::fs::create_dir(p.join("rootdir")).expect("mkdir");
    std::fs::set_permissions(p.join("rootdir"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

#[tokio::test]
async fn files_endpoint_acts_with_the_users_permissions() {
    if !is_root() {
        return;
    }
    let a = agent().await;
    let dir = user_fixture();
    let p = dir.path();
    let download = |path: &Path, user: &str| {
        a.get("/files")
            .query(&[("path", s(path)), ("username", user)])
            .send()
    };
    for denied in [p.join("secret"), p.join("link"), p.join("private/inner")] {
        let (status, _) = status_json(download(&denied, "nobody").await.expect("get")).await;
        assert_eq!(status, 403, "{}", denied.display());
        // Root still reads all of them.
        let resp = download(&denied, "root").await.expect("get");
        assert_eq!(resp.status(), 200, "{}", denied.display());
    }
    let own = download(&p.join("own"), "nobody").await.expect("get");
    assert_eq!(own.status(), 200);
    assert_eq!(own.text().await.expect("body"), "content of own");

    // Upload into a root-owned 0755 directory: refused, and nothing is left behind.
    let target = p.join("rootdir/new.txt");
    let (status, _) = status_json(
        a.post("/files")
            .query(&[("path", s(&target)), ("username", "nobody")])
            .body("x")
            .send()
            .await
            .expect("post"),
    )
    .await;
    assert_eq!(status, 403);
    assert!(!target.exists());
    // Nor through a missing parent directory, nor over root's file.
    let nested = p.join("rootdir/sub/new.txt");
    for path in [&nested, &p.join("secret")] {
        let (status, _) = status_json(
            a.post("/files")
                .query(&[("path", s(path)), ("username", "nobody")])
                .body("x")
                .send()
                .await
                .expect("post"),
        )
        .await;
        assert_eq!(status, 403, "{}", path.display());
    }
    assert!(!p.join("rootdir/sub").exists());
    assert_eq!(
        std::fs::read_to_string(p.join("secret")).expect("read"),
        "content of secret"
    );

    // Where the user may write, what it creates belongs to it.
    std::fs::create_dir(p.join("mine")).expect("mkdir");
    std::os::unix::fs::chown(p.join("mine"), Some(NOBODY), Some(NOBODY)).expect("chown");
    let created = p.join("mine/deep/file.txt");
    let resp = a
        .post("/files")
        .query(&[("path", s(&created)), ("username", "nobody")])
        .body("hello")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    for made in [p.join("mine/deep"), created.clone()] {
        let m = std::fs::metadata(&made).expect("stat");
        assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY), "{}", made.display());
    }
    assert_eq!(std::fs::read(&created).expect("read"), b"hello");
}

#[tokio::test]
async fn filesystem_rpcs_act_with_the_users_permissions() {
    if !is_root() {
        return;
    }
    let a = agent().await;
    let dir = user_fixture();
    let p = dir.path();
    let fs = a.fs(Some(TOKEN), Some("nobody"));
    let err = fs
        .list_dir(ListDirRequest {
            path: s(&p.join("private")).into(),
            depth: 1,
            ..Default::default()
        })
        .await
        .expect_err("private dir");
    assert_eq!(err.code, ErrorCode::PermissionDenied);
    for denied in [p.join("private/inner"), p.join("private/.")] {
        let err = fs
            .stat(StatRequest {
                path: s(&denied).into(),
                ..Default::default()
            })
            .await
            .expect_err("stat through private dir");
        assert_eq!(
            err.code,
            ErrorCode::PermissionDenied,
            "{}",
            denied.display()
        );
    }
    let mkdir = fs
        .make_dir(hearth_proto::filesystem::MakeDirRequest {
            path: s(&p.join("rootdir/x")).into(),
            ..Default::default()
        })
        .await
        .expect_err("mkdir in root's dir");
    assert_eq!(mkdir.code, ErrorCode::PermissionDenied);
    let rm = fs
        .remove(hearth_proto::filesystem::RemoveRequest {
            path: s(&p.join("secret")).into(),
            ..Default::default()
        })
        .await
        .expect_err("remove root's file");
    assert_eq!(rm.code, ErrorCode::PermissionDenied);
    assert!(p.join("secret").exists());
    let mv = fs
        .r#move(hearth_proto::filesystem::MoveRequest {
            source: s(&p.join("own")).into(),
            destination: s(&p.join("rootdir/own")).into(),
            ..Default::default()
        })
        .await
        .expect_err("move into root's dir");
    assert_eq!(mv.code, ErrorCode::PermissionDenied);

    // The parent is listable: entries show, the private dir is not descended into.
    let listed = fs
        .list_dir(ListDirRequest {
            path: s(p).into(),
            depth: 2,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_owned();
    let names: Vec<&str> = listed.entries.iter().map(|e| e.name.as_str()).collect();
    assert!(
        names.contains(&"private") && names.contains(&"own"),
        "{names:?}"
    );
    assert!(!names.contains(&"inner"), "{names:?}");
    // Root sees inside.
    a.fs(Some(TOKEN), Some("root"))
        .stat(StatRequest {
            path: s(&p.join("private/inner")).into(),
            ..Default::default()
        })
        .await
        .expect("root stat");
}

#[tokio::test]
async fn processes_run_as_the_user() {
    if !is_root() {
        return;
    }
    let a = agent().await;
    let (out, code) = a
        .exec(Some("nobody"), "sh", &["-c", "id -u; id -g; id -G"])
        .await;
    assert_eq!(code, 0);
    assert_eq!(out, "65534\n65534\n65534\n");
    let (out, _) = a.exec(Some("root"), "id", &["-u"]).await;
    assert_eq!(out, "0\n");
    let dir = user_fixture();
    let (_, code) = a
        .exec(Some("nobody"), "cat", &[s(&dir.path().join("secret"))])
        .await;
    assert_ne!(code, 0, "nobody read root's 0600 file");
}

// ---------------------------------------------------------------- robustness

#[tokio::test]
async fn overlong_paths_are_bad_requests() {
    let a = agent().await;
    let long_name = format!("/tmp/{}", "a".repeat(300));
    let long_path = format!("/tmp{}", "/abcdefgh".repeat(600));
    for path in [&long_name, &long_path] {
        for rb in [
            a.get("/files").query(&[("path", path)]),
            a.post("/files").query(&[("path", path)]).body("x"),
        ] {
            let (status, body) = status_json(rb.send().await.expect("send")).await;
            assert_eq!(status, 400, "{body}");
        }
        let err = a
            .fs(Some(TOKEN), None)
            .stat(StatRequest {
                path: path.clone(),
                ..Default::default()
            })
            .await
            .expect_err("stat");
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }
    let start = StartRequest {
        process: buffa::MessageField::some(ProcessConfig {
            cmd: long_name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let code = match a.process(Some(TOKEN), None).start(start).await {
        Err(e) => e.code,
        Ok(mut s) => s.message().await.expect_err("refused").code,
    };
    assert_eq!(code, ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn pseudo_files_download_in_full() {
    let a = agent().await;
    let status = a
        .get("/files")
        .query(&[("path", "/proc/self/status")])
        .send()
        .await
        .expect("get");
    assert_eq!(status.status(), 200);
    let text = status.text().await.expect("body");
    assert!(
        text.starts_with("Name:") && text.contains("\nPid:"),
        "{text:?}"
    );
    let mac = a
        .get("/files")
        .query(&[("path", "/sys/class/net/lo/address")])
        .send()
        .await
        .expect("get");
    assert_eq!(mac.status(), 200);
    assert_eq!(mac.text().await.expect("body"), "00:00:00:00:00:00\n");
}

#[tokio::test]
async fn special_files_are_refused_without_blocking() {
    let a = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let started = Instant::now();
    for path in [fifo.as_path(), &sock, Path::new("/dev/null"), dir.path()] {
        let (status, body) = status_json(
            a.get("/files")
                .query(&[("path", s(path))])
                .send()
                .await
                .expect("get"),
        )
        .await;
        assert_eq!(status, 400, "{}: {body}", path.display());
        if path != dir.path() {
            let (status, body) = status_json(
                a.post("/files")
                    .query(&[("path", s(path))])
                    .body("x")
                    .send()
                    .await
                    .expect("post"),
            )
            .await;
            assert_eq!(status, 400, "{}: {body}", path.display());
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let (status, _) = status_json(
        a.get("/files")
            .query(&[("path", "/nonexistent/x")])
            .send()
            .await
            .expect("get"),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn init_bodies_are_bounded_and_checked() {
    let a = agent().await;
    let huge = format!(
        "{{\"envVars\":{{\"BIG\":\"{}\"}}}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let (status, _) = status_json(
        a.post("/init")
            .header("content-type", "application/json")
            .body(huge)
            .send()
            .await
            .expect("init"),
    )
    .await;
    assert_eq!(status, 413);
    for bad in ["{not json", "{\"envVars\": 3}", "[]"] {
        let (status, body) = status_json(
            a.post("/init")
                .header("content-type", "application/json")
                .body(bad)
                .send()
                .await
                .expect("init"),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let envs: serde_json::Value = a
        .get("/envs")
        .send()
        .await
        .expect("envs")
        .json()
        .await
        .expect("json");
    assert!(envs.get("BIG").is_none());
}

#[tokio::test]
async fn malformed_requests_get_json_errors() {
    let a = agent().await;
    let put = a
        .anon
        .put(format!("{}/files?path=/tmp/x", a.base))
        .header("x-access-token", TOKEN)
        .body("x")
        .send()
        .await
        .expect("put");
    let (status, _) = status_json(put).await;
    assert_eq!(status, 405);
    // A query string that does not parse.
    let (status, _) = status_json(a.get("/files?path=/a&path=/b").send().await.expect("get")).await;
    assert_eq!(status, 400);
}

/// Starts an agent with explicit transport limits; returns its address.
async fn limited_agent(limits: hearth_guest::server::ServerLimits) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(hearth_guest::serve_with(
        listener,
        AgentState::default(),
        limits,
    ));
    addr
}

#[tokio::test]
async fn half_sent_request_heads_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = limited_agent(hearth_guest::server::ServerLimits {
        header_read_timeout: Duration::from_millis(500),
        max_connections: 16,
    })
    .await;
    // A partial head, nothing at all, and a keep-alive connection gone idle.
    let whole = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    for sent in [&b"GET /health HTTP/1.1\r\nHost: x\r\n"[..], b"", whole] {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(sent).await.expect("write");
        let started = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "connection still open after 10 s ({sent:?} sent)"
        );
        assert!(started.elapsed() >= Duration::from_millis(400));
        if sent == whole {
            let text = String::from_utf8_lossy(&buf);
            assert!(text.starts_with("HTTP/1.1 204"), "{text}");
        }
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = limited_agent(hearth_guest::server::ServerLimits {
        header_read_timeout: Duration::from_secs(60),
        max_connections: 1,
    })
    .await;
    let first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    second
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_millis(700), second.read_to_end(&mut buf)).await;
    assert!(early.is_err(), "served beyond the cap: {buf:?}");
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut buf))
        .await
        .expect("served once a slot is free")
        .expect("read");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 204"), "{text}");
}

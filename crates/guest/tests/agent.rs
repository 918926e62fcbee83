//! In-process tests of the guest agent: the server runs on 127.0.0.1:0 (not as PID 1) and
//! is driven with the generated Connect clients and plain HTTP.

use std::time::{Duration, Instant};

use connectrpc::client::{CallOptions, ClientConfig, HttpClient};
use connectrpc::{ConnectError, ErrorCode};
use hearth_guest::state::AgentState;
use hearth_proto::filesystem::{
    FileType, FilesystemClient, ListDirRequest, MakeDirRequest, MoveRequest, RemoveRequest,
    StatRequest,
};
use hearth_proto::process::{
    process_event, process_input, process_selector, pty, CloseStdinRequest, ConnectRequest,
    ListRequest, ProcessClient, ProcessConfig, ProcessInput, ProcessSelector, SendInputRequest,
    SendSignalRequest, Signal, StartRequest, UpdateRequest, PTY,
};

struct Agent {
    base: String,
    process: ProcessClient<HttpClient>,
    fs: FilesystemClient<HttpClient>,
    http: reqwest::Client,
}

/// Access token the test agents are initialised with.
const TOKEN: &str = "test-token-0123456789";

/// Starts an agent, initialises it with [`TOKEN`] and returns clients that send it.
async fn agent() -> Agent {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(hearth_guest::serve(listener, AgentState::default()));
    let base = format!("http://{addr}");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "x-access-token",
        reqwest::header::HeaderValue::from_static(TOKEN),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client");
    let resp = http
        .post(format!("{base}/init"))
        .json(&serde_json::json!({"accessToken": TOKEN}))
        .send()
        .await
        .expect("init");
    assert_eq!(resp.status(), 204);
    let uri: http::Uri = base.parse().expect("uri");
    let config = ClientConfig::new(uri).with_default_header("x-access-token", TOKEN);
    Agent {
        process: ProcessClient::new(HttpClient::plaintext(), config.clone()),
        fs: FilesystemClient::new(HttpClient::plaintext(), config),
        http,
        base,
    }
}

fn config(cmd: &str, args: &[&str]) -> ProcessConfig {
    ProcessConfig {
        cmd: cmd.into(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn start_req(cfg: ProcessConfig) -> StartRequest {
    StartRequest {
        process: buffa::MessageField::some(cfg),
        ..Default::default()
    }
}

fn by_pid(pid: u32) -> buffa::MessageField<ProcessSelector, buffa::Inline<ProcessSelector>> {
    buffa::MessageField::some(ProcessSelector {
        selector: Some(process_selector::Selector::Pid(pid)),
        ..Default::default()
    })
}

#[derive(Default, Debug)]
struct Outcome {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    end: Option<process_event::EndEvent>,
    error: Option<ConnectError>,
}

/// Applies one event to the outcome; returns the pid on a start event.
fn apply(out: &mut Outcome, ev: Option<&hearth_proto::process::ProcessEvent>) -> Option<u32> {
    use process_event::data_event::Output;
    match ev.and_then(|e| e.event.as_ref())? {
        process_event::Event::Start(s) => {
            out.pid = Some(s.pid);
            return Some(s.pid);
        }
        process_event::Event::Data(d) => match &d.output {
            Some(Output::Stdout(b)) => out.stdout.extend_from_slice(b),
            Some(Output::Stderr(b)) => out.stderr.extend_from_slice(b),
            Some(Output::Pty(b)) => out.pty.extend_from_slice(b),
            None => {}
        },
        process_event::Event::End(e) => out.end = Some((**e).clone()),
        process_event::Event::Keepalive(_) => {}
    }
    None
}

async fn run_with(a: &Agent, req: StartRequest, opts: CallOptions) -> Outcome {
    let mut out = Outcome::default();
    let mut stream = match a.process.start_with_options(req, opts).await {
        Ok(s) => s,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let m = m.to_owned_message();
                apply(&mut out, m.event.as_option());
            }
            Ok(None) => break,
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    out
}

async fn run(a: &Agent, cmd: &str, args: &[&str]) -> Outcome {
    run_with(a, start_req(config(cmd, args)), CallOptions::default()).await
}

#[tokio::test]
async fn exit_code_and_separate_stdout_stderr() {
    let a = agent().await;
    let out = run(&a, "sh", &["-c", "echo out; echo err >&2; exit 3"]).await;
    assert!(out.error.is_none(), "{:?}", out.error);
    assert!(out.pid.is_some());
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    let end = out.end.expect("end event");
    assert_eq!(end.exit_code, 3);
    assert!(end.exited);
    assert_eq!(end.status, "exit status 3");

    let ok = run(&a, "true", &[]).await;
    assert_eq!(ok.end.expect("end").status, "exit status 0");
}

#[tokio::test]
async fn env_and_cwd_are_applied() {
    let a = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config("sh", &["-c", "echo \"$FOO\"; pwd; echo \"$HOME\""]);
    cfg.envs.insert("FOO".into(), "bar baz".into());
    cfg.cwd = Some(dir.path().display().to_string());
    let out = run_with(&a, start_req(cfg), CallOptions::default()).await;
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert_eq!(text, format!("bar baz\n{}\n/root\n", dir.path().display()));
    assert_eq!(out.end.expect("end").exit_code, 0);
}

#[tokio::test]
async fn missing_command_and_bad_cwd_are_errors() {
    let a = agent().await;
    let out = run(&a, "/nonexistent/binary", &[]).await;
    assert_eq!(out.error.expect("error").code, ErrorCode::NotFound);
    let mut cfg = config("true", &[]);
    cfg.cwd = Some("/nonexistent/dir".into());
    let out = run_with(&a, start_req(cfg), CallOptions::default()).await;
    assert_eq!(out.error.expect("error").code, ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn non_utf8_output_bytes_arrive_intact() {
    let a = agent().await;
    let out = run(&a, "sh", &["-c", r"printf '\377\376\000abc\200'"]).await;
    assert_eq!(out.stdout, b"\xff\xfe\x00abc\x80");
}

/// Starts a process and returns its pid plus the still-open event stream.
async fn start_and_pid(
    a: &Agent,
    req: StartRequest,
) -> (
    u32,
    connectrpc::client::ServerStream<
        <HttpClient as connectrpc::client::ClientTransport>::ResponseBody,
        hearth_proto::process::StartResponseView<'static>,
    >,
    Outcome,
) {
    let mut stream = a.process.start(req).await.expect("start");
    let mut out = Outcome::default();
    loop {
        let m = stream
            .message()
            .await
            .expect("message")
            .expect("start event");
        let m = m.to_owned_message();
        if let Some(pid) = apply(&mut out, m.event.as_option()) {
            return (pid, stream, out);
        }
    }
}

async fn finish<B>(
    mut stream: connectrpc::client::ServerStream<
        B,
        hearth_proto::process::StartResponseView<'static>,
    >,
    mut out: Outcome,
) -> Outcome
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let m = m.to_owned_message();
                apply(&mut out, m.event.as_option());
            }
            Ok(None) => return out,
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        }
    }
}

#[tokio::test]
async fn stdin_input_then_close() {
    let a = agent().await;
    let (pid, stream, out) = start_and_pid(&a, start_req(config("cat", &[]))).await;
    for chunk in [&b"hello "[..], &b"world"[..]] {
        a.process
            .send_input(SendInputRequest {
                process: by_pid(pid),
                input: buffa::MessageField::some(ProcessInput {
                    input: Some(process_input::Input::Stdin(chunk.to_vec())),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("send_input");
    }
    a.process
        .close_stdin(CloseStdinRequest {
            process: by_pid(pid),
            ..Default::default()
        })
        .await
        .expect("close_stdin");
    let out = finish(stream, out).await;
    assert_eq!(out.stdout, b"hello world");
    assert_eq!(out.end.expect("end").exit_code, 0);
}

#[tokio::test]
async fn sigkill_kills_the_whole_process_group() {
    let a = agent().await;
    let (pid, stream, out) = start_and_pid(
        &a,
        start_req(config("sh", &["-c", "sleep 100 & echo started; wait"])),
    )
    .await;
    let listed = a
        .process
        .list(ListRequest::default())
        .await
        .expect("list")
        .into_owned();
    assert!(listed.processes.iter().any(|p| p.pid == pid));
    let sent = Instant::now();
    a.process
        .send_signal(SendSignalRequest {
            process: by_pid(pid),
            signal: Signal::SIGNAL_SIGKILL.into(),
            ..Default::default()
        })
        .await
        .expect("signal");
    let out = finish(stream, out).await;
    let end = out.end.expect("end");
    assert_eq!(end.status, "signal: killed");
    assert!(!end.exited);
    // The grandchild `sleep` holds stdout too: output only ends this fast if it died.
    assert!(
        sent.elapsed() < Duration::from_millis(1500),
        "output stayed open: {:?}",
        sent.elapsed()
    );
    let err = a
        .process
        .send_signal(SendSignalRequest {
            process: by_pid(pid),
            signal: Signal::SIGNAL_SIGKILL.into(),
            ..Default::default()
        })
        .await
        .expect_err("process is gone");
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[tokio::test]
async fn deadline_kills_the_process() {
    let a = agent().await;
    let started = Instant::now();
    let out = run_with(
        &a,
        start_req(config("sleep", &["100"])),
        CallOptions::default().with_timeout(Duration::from_millis(800)),
    )
    .await;
    let pid = out.pid.expect("started");
    assert!(started.elapsed() < Duration::from_secs(10));
    match (&out.end, &out.error) {
        (Some(end), _) => assert_eq!(end.status, "signal: killed"),
        (None, Some(e)) => assert_eq!(e.code, ErrorCode::DeadlineExceeded),
        (None, None) => panic!("stream ended without end event or error"),
    }
    // Either the process is already gone, or re-attaching shows it being killed.
    match a
        .process
        .connect(ConnectRequest {
            process: by_pid(pid),
            ..Default::default()
        })
        .await
    {
        Err(e) => assert_eq!(e.code, ErrorCode::NotFound),
        Ok(mut s) => {
            // A server stream carries its error in the body: the process can be gone
            // between the response headers and the first message.
            let mut o = Outcome::default();
            let mut gone = false;
            loop {
                match s.message().await {
                    Ok(Some(m)) => {
                        apply(&mut o, m.to_owned_message().event.as_option());
                    }
                    Ok(None) => break,
                    Err(e) if e.code == ErrorCode::NotFound && o.end.is_none() => {
                        gone = true;
                        break;
                    }
                    Err(e) => panic!("connect stream failed: {e}"),
                }
            }
            if !gone {
                assert_eq!(o.end.expect("end").status, "signal: killed");
            }
        }
    }
}

fn pty_req(cmd: &str, args: &[&str], cols: u32, rows: u32) -> StartRequest {
    StartRequest {
        pty: buffa::MessageField::some(PTY {
            size: buffa::MessageField::some(pty::Size {
                cols,
                rows,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..start_req(config(cmd, args))
    }
}

#[tokio::test]
async fn pty_output_and_resize() {
    let a = agent().await;
    let out = run_with(
        &a,
        pty_req("sh", &["-c", "tty; stty size; echo \"$TERM\""], 100, 30),
        CallOptions::default(),
    )
    .await;
    let text = String::from_utf8_lossy(&out.pty).to_string();
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("30 100"), "{text:?}");
    assert!(text.contains("xterm"), "{text:?}");
    assert_eq!(out.end.expect("end").exit_code, 0);

    // Resize a running PTY process, then let it report the new size.
    let (pid, stream, o) =
        start_and_pid(&a, pty_req("sh", &["-c", "read x; stty size"], 80, 24)).await;
    a.process
        .update(UpdateRequest {
            process: by_pid(pid),
            pty: buffa::MessageField::some(PTY {
                size: buffa::MessageField::some(pty::Size {
                    cols: 132,
                    rows: 50,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("update");
    a.process
        .send_input(SendInputRequest {
            process: by_pid(pid),
            input: buffa::MessageField::some(ProcessInput {
                input: Some(process_input::Input::Pty(b"go\n".to_vec())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("input");
    let o = finish(stream, o).await;
    let text = String::from_utf8_lossy(&o.pty).to_string();
    assert!(text.contains("50 132"), "{text:?}");
}

#[tokio::test]
async fn connect_reattaches_by_tag() {
    let a = agent().await;
    let mut req = start_req(config("cat", &[]));
    req.tag = Some("worker".into());
    let (pid, _stream, _) = start_and_pid(&a, req).await;
    let mut sub = a
        .process
        .connect(ConnectRequest {
            process: buffa::MessageField::some(ProcessSelector {
                selector: Some(process_selector::Selector::Tag("worker".into())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("connect");
    let mut o = Outcome::default();
    // The first event names the process.
    let first = sub.message().await.expect("msg").expect("start");
    assert_eq!(
        apply(&mut o, first.to_owned_message().event.as_option()),
        Some(pid)
    );
    a.process
        .send_input(SendInputRequest {
            process: by_pid(pid),
            input: buffa::MessageField::some(ProcessInput {
                input: Some(process_input::Input::Stdin(b"ping".to_vec())),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("input");
    a.process
        .close_stdin(CloseStdinRequest {
            process: by_pid(pid),
            ..Default::default()
        })
        .await
        .expect("close");
    while let Some(m) = sub.message().await.expect("msg") {
        apply(&mut o, m.to_owned_message().event.as_option());
    }
    assert_eq!(o.stdout, b"ping");
    assert_eq!(o.end.expect("end").exit_code, 0);
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn file_upload_download_round_trip() {
    let a = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a/b/data.bin");
    let data = pseudo_random(3 * 1024 * 1024 + 17);
    let resp = a
        .http
        .post(format!("{}/files", a.base))
        .query(&[("path", path.to_str().expect("path"))])
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body[0]["path"], path.to_str().expect("path"));
    assert_eq!(body[0]["name"], "data.bin");
    assert_eq!(body[0]["type"], "file");

    let resp = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", path.to_str().expect("path")), ("username", "root")])
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().expect("ct"),
        "application/octet-stream"
    );
    let got = resp.bytes().await.expect("bytes");
    assert!(got.as_ref() == data.as_slice(), "downloaded bytes differ");

    // Overwrite with something shorter.
    let resp = a
        .http
        .post(format!("{}/files", a.base))
        .query(&[("path", path.to_str().expect("path"))])
        .body("short")
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    assert_eq!(std::fs::read(&path).expect("read"), b"short");

    let missing = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", "/nonexistent/file")])
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.expect("json");
    assert_eq!(body["code"], 404);
    assert!(body["message"].is_string());

    let is_dir = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", dir.path().to_str().expect("path"))])
        .send()
        .await
        .expect("get");
    assert_eq!(is_dir.status(), 400);
}

#[tokio::test]
async fn gzip_uploads_are_inflated_and_downloads_gzipped_on_request() {
    use std::io::{Read, Write};
    let a = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gz.txt");
    let path_s = path.to_str().expect("path");
    let data = pseudo_random(200_000);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&data).expect("gzip");
    let gz = enc.finish().expect("gzip");
    let resp = a
        .http
        .post(format!("{}/files", a.base))
        .query(&[("path", path_s)])
        .header("content-type", "application/octet-stream")
        .header("content-encoding", "gzip")
        .body(gz)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    assert!(
        std::fs::read(&path).expect("read") == data,
        "stored bytes are not the inflated ones"
    );

    let resp = a
        .http
        .get(format!("{}/files", a.base))
        .query(&[("path", path_s)])
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("download");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let body = resp.bytes().await.expect("bytes");
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(body.as_ref())
        .read_to_end(&mut plain)
        .expect("gunzip");
    assert!(plain == data, "gunzipped download differs");

    // Not gzip at all: an error (what was inflated before the bad bytes may remain, as
    // with any upload cut short). An encoding the guest does not speak: 415, no file.
    let resp = a
        .http
        .post(format!("{}/files", a.base))
        .query(&[("path", dir.path().join("bad.txt").to_str().expect("path"))])
        .header("content-encoding", "gzip")
        .body("this is not gzip")
        .send()
        .await
        .expect("upload");
    assert!(
        resp.status().is_client_error() || resp.status().is_server_error(),
        "{}",
        resp.status()
    );
    let br = dir.path().join("br.txt");
    let resp = a
        .http
        .post(format!("{}/files", a.base))
        .query(&[("path", br.to_str().expect("path"))])
        .header("content-encoding", "br")
        .body("x")
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 415);
    assert!(
        !br.exists(),
        "an upload refused by its encoding left a file"
    );
}

#[tokio::test]
async fn multipart_upload() {
    let a = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("up/m.bin");
    let data = pseudo_random(256 * 1024);
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(data.clone()).file_name("m.bin"),
    );
    let resp = a
        .http
        .post(format!("{}/files", a.base))
        .query(&[("path", path.to_str().expect("path"))])
        .multipart(form)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body[0]["path"], path.to_str().expect("path"));
    assert!(std::fs::read(&path).expect("read") == data);
}

#[tokio::test]
async fn health_is_204() {
    let a = agent().await;
    let resp = a
        .http
        .get(format!("{}/health", a.base))
        .send()
        .await
        .expect("health");
    assert_eq!(resp.status(), 204);
}

#[tokio::test]
async fn filesystem_stat_list_mkdir_move_remove() {
    let a = agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |p: &str| dir.path().join(p).display().to_string();
    std::fs::write(dir.path().join("f.txt"), b"12345").expect("write");

    let st =
        a.fs.stat(StatRequest {
            path: d("f.txt"),
            ..Default::default()
        })
        .await
        .expect("stat")
        .into_owned();
    let e = st.entry.as_option().expect("entry");
    assert_eq!(e.name, "f.txt");
    assert_eq!(e.size, 5);
    assert_eq!(e.r#type.as_known(), Some(FileType::FILE_TYPE_FILE));
    assert_eq!(e.path, d("f.txt"));
    assert_eq!(e.owner, "root");
    assert_eq!(e.group, "root");
    assert_eq!(e.permissions.len(), 10);
    assert!(e.permissions.starts_with('-'));
    assert!(e.modified_time.as_option().is_some_and(|t| t.seconds > 0));

    let made =
        a.fs.make_dir(MakeDirRequest {
            path: d("x/y"),
            ..Default::default()
        })
        .await
        .expect("mkdir")
        .into_owned();
    let e = made.entry.as_option().expect("entry");
    assert_eq!(e.r#type.as_known(), Some(FileType::FILE_TYPE_DIRECTORY));
    assert!(e.permissions.starts_with('d'));
    let again =
        a.fs.make_dir(MakeDirRequest {
            path: d("x/y"),
            ..Default::default()
        })
        .await
        .expect_err("exists");
    assert_eq!(again.code, ErrorCode::AlreadyExists);

    a.fs.r#move(MoveRequest {
        source: d("f.txt"),
        destination: d("x/y/g.txt"),
        ..Default::default()
    })
    .await
    .expect("move");
    std::os::unix::fs::symlink("y/g.txt", dir.path().join("x/link")).expect("symlink");

    let shallow =
        a.fs.list_dir(ListDirRequest {
            path: d("x"),
            depth: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_owned();
    let names: Vec<&str> = shallow.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["link", "y"]);
    let link = &shallow.entries[0];
    assert_eq!(link.symlink_target.as_deref(), Some("y/g.txt"));

    let deep =
        a.fs.list_dir(ListDirRequest {
            path: d("x"),
            depth: 2,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_owned();
    let paths: Vec<&str> = deep.entries.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&d("x/y/g.txt").as_str()), "{paths:?}");

    a.fs.remove(RemoveRequest {
        path: d("x"),
        ..Default::default()
    })
    .await
    .expect("remove");
    assert!(!dir.path().join("x").exists());
    for err in [
        a.fs.stat(StatRequest {
            path: d("x"),
            ..Default::default()
        })
        .await
        .expect_err("gone"),
        a.fs.remove(RemoveRequest {
            path: d("x"),
            ..Default::default()
        })
        .await
        .expect_err("gone"),
    ] {
        assert_eq!(err.code, ErrorCode::NotFound);
    }
}

#[tokio::test]
async fn init_sets_default_env() {
    let a = agent().await;
    let resp = a
        .http
        .post(format!("{}/init", a.base))
        .json(&serde_json::json!({"envVars": {"FROM_INIT": "yes"}}))
        .send()
        .await
        .expect("init");
    assert_eq!(resp.status(), 204);
    let out = run(&a, "sh", &["-c", "echo $FROM_INIT"]).await;
    assert_eq!(out.stdout, b"yes\n");
}

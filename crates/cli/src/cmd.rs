//! Client commands: sandboxes, templates, exec and cp.

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

use crate::client::split_remote;
use crate::output::{print_json, print_object, print_table};
use crate::{client, kv_map, CpArgs, CreateArgs, ExecArgs, Global, ListArgs};

/// A progress spinner on stderr, shown only when stderr is a terminal.
struct Spinner(Option<indicatif::ProgressBar>);

impl Spinner {
    fn start(msg: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_message(msg.to_string());
        pb.enable_steady_tick(std::time::Duration::from_millis(100));
        Spinner(Some(pb))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(pb) = self.0.take() {
            pb.finish_and_clear();
        }
    }
}

const SANDBOX_COLUMNS: &[&str] = &[
    "id",
    "template",
    "state",
    "vcpus",
    "memory_mb",
    "expires_at",
];

pub async fn sandbox_create(g: &Global, a: CreateArgs) -> Result<()> {
    let c = client(g)?;
    let body = json!({
        "template": a.template,
        "vcpus": a.vcpus,
        "memory_mb": a.memory_mb,
        "disk_size_mb": a.disk_size_mb,
        "timeout_s": a.timeout_s,
        "on_timeout": a.on_timeout,
        "env": kv_map(&a.env),
        "metadata": kv_map(&a.metadata),
    });
    let spinner = Spinner::start(&format!("booting a {} sandbox", a.template));
    let sb: Result<Value> = c
        .json(c.request(Method::POST, "/v1/sandboxes").json(&body))
        .await;
    drop(spinner);
    let sb = sb?;
    if g.json {
        print_json(&sb);
    } else {
        print_object(&sb);
    }
    Ok(())
}

/// Every page of the listing (the API gives at most 1000 rows a page).
pub async fn sandbox_list(g: &Global, a: ListArgs) -> Result<()> {
    let c = client(g)?;
    let mut rows: Vec<Value> = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut query: Vec<(&str, String)> = vec![("limit", "1000".into())];
        if a.all {
            query.push(("all", "true".into()));
        }
        if let Some(s) = &a.state {
            query.push(("state", s.clone()));
        }
        if let Some(t) = &token {
            query.push(("next_token", t.clone()));
        }
        let v: Value = c
            .json(c.request(Method::GET, "/v1/sandboxes").query(&query))
            .await?;
        rows.extend(v["sandboxes"].as_array().cloned().unwrap_or_default());
        match v["next_token"].as_str() {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => break,
        }
    }
    if g.json {
        print_json(&json!({ "sandboxes": rows }));
    } else {
        print_table(&rows, SANDBOX_COLUMNS);
    }
    Ok(())
}

pub async fn sandbox_get(g: &Global, id: &str) -> Result<()> {
    let c = client(g)?;
    let v: Value = c
        .json(c.request(Method::GET, &format!("/v1/sandboxes/{id}")))
        .await?;
    if g.json {
        print_json(&v);
    } else {
        print_object(&v);
    }
    Ok(())
}

pub async fn sandbox_rm(g: &Global, ids: &[String]) -> Result<()> {
    let c = client(g)?;
    let mut failed = 0;
    let mut removed = Vec::new();
    for id in ids {
        match c
            .send(c.request(Method::DELETE, &format!("/v1/sandboxes/{id}")))
            .await
        {
            Ok(_) => {
                removed.push(id.clone());
                if !g.json {
                    println!("{id} destroyed");
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {id}: {e:#}");
            }
        }
    }
    if g.json {
        print_json(&json!({ "destroyed": removed }));
    }
    if failed > 0 {
        bail!("{failed} of {} sandboxes could not be destroyed", ids.len());
    }
    Ok(())
}

pub async fn template_list(g: &Global) -> Result<()> {
    let c = client(g)?;
    let v: Value = c.json(c.request(Method::GET, "/v1/templates")).await?;
    if g.json {
        print_json(&v);
    } else {
        let rows = v["templates"].as_array().cloned().unwrap_or_default();
        print_table(
            &rows,
            &["name", "team_id", "has_memory", "size_bytes", "created_at"],
        );
    }
    Ok(())
}

/// Exit code reported when the command was killed at its timeout (as GNU `timeout`).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// Run a command over the exec WebSocket, streaming output as it comes.
pub async fn exec(g: &Global, a: ExecArgs) -> Result<i32> {
    let c = client(g)?;
    let mut req = c
        .ws_url(&format!("/v1/sandboxes/{}/exec/ws", a.id))
        .into_client_request()
        .context("bad control plane URL")?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", c.creds.api_key)
            .parse()
            .context("API key is not a valid header value")?,
    );
    let (ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            bail!("{msg} (HTTP {})", resp.status().as_u16());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot reach hearth at {}", c.creds.url)),
    };
    let (mut tx, mut rx) = ws.split();
    let mut start = json!({
        "cmd": a.cmd,
        "env": kv_map(&a.env),
        "cwd": a.cwd,
        "user": a.user,
        "timeout_s": a.timeout_s,
    });
    if a.tty {
        let (cols, rows) = terminal_size();
        start["pty"] = json!({ "cols": cols, "rows": rows });
    }
    tx.send(Message::Text(start.to_string().into())).await?;

    // With -t on a real terminal, keystrokes go to the remote PTY as they are typed
    // (raw mode); the terminal is restored when this function returns.
    let _raw = if a.tty && std::io::stdin().is_terminal() {
        RawTerminal::enter()
    } else {
        None
    };

    // Forward our stdin unless it is a terminal and no TTY was asked for (then the
    // command gets EOF at once, as `ssh host cmd` with nothing piped in would not wait).
    let forward_stdin = a.tty || !std::io::stdin().is_terminal();
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    if forward_stdin {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = in_tx.send(None).await;
                        break;
                    }
                    Ok(n) => {
                        if in_tx.send(Some(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        let _ = in_tx.send(None).await;
    }

    let b64 = base64::engine::general_purpose::STANDARD;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            chunk = in_rx.recv(), if stdin_open => {
                let frame = match chunk {
                    Some(Some(data)) => json!({"type": "stdin", "data": b64.encode(data)}),
                    _ => { stdin_open = false; json!({"type": "stdin_close"}) }
                };
                if tx.send(Message::Text(frame.to_string().into())).await.is_err() {
                    stdin_open = false;
                }
            }
            msg = rx.next() => {
                let Some(msg) = msg else { bail!("the connection closed before the command ended") };
                let text = match msg? {
                    Message::Text(t) => t.to_string(),
                    Message::Close(_) => bail!("the server closed the stream before the command ended"),
                    _ => continue,
                };
                let ev: Value = serde_json::from_str(&text).context("bad frame from server")?;
                match ev["type"].as_str() {
                    Some("stdout") | Some("stderr") => {
                        let data = b64.decode(ev["data"].as_str().unwrap_or_default()).context("bad output frame")?;
                        if ev["type"] == "stdout" {
                            stdout.write_all(&data).await?;
                            stdout.flush().await?;
                        } else {
                            stderr.write_all(&data).await?;
                            stderr.flush().await?;
                        }
                    }
                    Some("exit") => {
                        let _ = tx.send(Message::Close(None)).await;
                        if ev["timed_out"].as_bool() == Some(true) {
                            eprintln!("error: the command was killed after its timeout");
                            return Ok(TIMEOUT_EXIT_CODE);
                        }
                        let code = ev["exit_code"].as_i64().unwrap_or(1);
                        return Ok(i32::try_from(code).unwrap_or(1));
                    }
                    Some("error") => {
                        bail!("{} ({})", ev["error"]["message"].as_str().unwrap_or("exec failed"), ev["error"]["code"].as_str().unwrap_or("error"));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The local terminal in raw mode; restores the saved settings on drop.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios we own; failures leave
        // the terminal untouched and we carry on in cooked mode.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same fd.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0);
        }
    }
}

fn terminal_size() -> (u16, u16) {
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own; a failure leaves zeros.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        (ws.ws_col, ws.ws_row)
    } else {
        (80, 24)
    }
}

pub async fn cp(g: &Global, a: CpArgs) -> Result<()> {
    let c = client(g)?;
    let user = a.user.as_deref().unwrap_or("root");
    match (split_remote(&a.src), split_remote(&a.dst)) {
        (None, Some((id, path))) => {
            let file = tokio::fs::File::open(&a.src)
                .await
                .with_context(|| format!("reading {}", a.src))?;
            let len = file.metadata().await?.len();
            let path = if path.ends_with('/') {
                let name = std::path::Path::new(&a.src)
                    .file_name()
                    .context("source has no file name")?;
                format!("{path}{}", name.to_string_lossy())
            } else {
                path.to_string()
            };
            let v: Value = c
                .json(
                    c.request(Method::PUT, &format!("/v1/sandboxes/{id}/files"))
                        .query(&[("path", path.as_str()), ("user", user)])
                        .header(reqwest::header::CONTENT_LENGTH, len)
                        .body(reqwest::Body::wrap_stream(
                            tokio_util::io::ReaderStream::new(file),
                        )),
                )
                .await?;
            if g.json {
                print_json(&v);
            } else {
                println!("{} -> {id}:{} ({} bytes)", a.src, path, v["size"]);
            }
        }
        (Some((id, path)), None) => {
            let mut resp = c
                .send(
                    c.request(Method::GET, &format!("/v1/sandboxes/{id}/files"))
                        .query(&[("path", path), ("user", user)]),
                )
                .await?;
            let mut dst = std::path::PathBuf::from(&a.dst);
            if dst.is_dir() {
                let name = std::path::Path::new(path)
                    .file_name()
                    .context("remote path has no file name")?;
                dst.push(name);
            }
            let tmp = dst.with_extension("hearth-partial");
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut n: u64 = 0;
            while let Some(chunk) = resp.chunk().await? {
                n += chunk.len() as u64;
                f.write_all(&chunk).await?;
            }
            f.flush().await?;
            drop(f);
            tokio::fs::rename(&tmp, &dst).await?;
            if g.json {
                print_json(&json!({"path": dst, "size": n}));
            } else {
                println!("{id}:{path} -> {} ({n} bytes)", dst.display());
            }
        }
        (Some(_), Some(_)) => {
            bail!("copying between two sandboxes is not supported: copy to a local file first")
        }
        (None, None) => bail!("one of SRC and DST must be a sandbox path like sb-…:/tmp/file"),
    }
    Ok(())
}

//! [`AgentHostClient`]: the control plane's client of one host agent (Connect RPC for the
//! agent's service and the guest's process service, plain HTTP through the agent's envd
//! proxy for files, console and metrics). Every answer is bounded and checked here: see
//! the parent module's docs.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use connectrpc::client::{CallOptions, ClientBody, ClientConfig, ServiceTransport};
use futures::StreamExt;
use hearth_proto::hearth::agent::v1 as agent;
use hearth_proto::process;
use hearth_proto::AGENT_TOKEN_HEADER;
use hearth_types::{SandboxId, TemplateName};

use super::*;

/// No byte of a file body for this long ends the transfer.
const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest metrics answer read from a guest.
const MAX_METRICS_BODY: usize = 16 * 1024;

/// The events of a process stream (Start or Connect: both carry `event`), without
/// keepalives.
macro_rules! proc_events {
    ($stream:expr) => {{
        use process::__buffa::oneof::process_event::{data_event::Output, Event};
        let events = futures::stream::unfold(Some($stream), |state| async move {
            let mut stream = state?;
            loop {
                match stream.message().await {
                    Ok(None) => return None,
                    Err(e) => return Some((Err(HostError::from_connect(e)), None)),
                    Ok(Some(msg)) => {
                        let msg = msg.to_owned_message();
                        let ev = match msg.event.into_option().and_then(|e| e.event) {
                            Some(Event::Start(s)) => ProcEvent::Started { pid: s.pid },
                            Some(Event::Data(d)) => match d.output {
                                Some(Output::Stdout(b)) => ProcEvent::Stdout(b.into()),
                                Some(Output::Stderr(b)) => ProcEvent::Stderr(b.into()),
                                Some(Output::Pty(b)) => ProcEvent::Pty(b.into()),
                                None => continue,
                            },
                            Some(Event::End(e)) => ProcEvent::Exited {
                                exit_code: e.exit_code,
                                error: e.error,
                            },
                            Some(Event::Keepalive(_)) | None => continue,
                        };
                        return Some((Ok(ev), Some(stream)));
                    }
                }
            }
        });
        events.boxed()
    }};
}

/// The HTTP client under the Connect clients: plain HTTP for a static host, mutual
/// TLS for an enrolled one (one connector type for both; see [`TlsMode`]).
type HttpClient = ServiceTransport<
    hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        ClientBody,
    >,
>;

/// How the control plane reaches an agent.
pub enum TlsMode {
    /// `http://`, optionally with the shared agent token (static `--agent-url` hosts).
    Plain { token: Option<String> },
    /// `https://` only, with this client config (the control plane's certificate,
    /// the agent's pinned: see `hearth_pki::control_client_config`).
    Mutual(Box<rustls::ClientConfig>),
}

/// An HTTPS-capable connector: `https_only` with `tls` for an enrolled host; for a
/// static one `http` only in effect (its URL is `http://`; the config has no roots).
pub(crate) fn connector(
    tls: Option<rustls::ClientConfig>,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.set_nodelay(true);
    http.enforce_http(false);
    let b = hyper_rustls::HttpsConnectorBuilder::new();
    match tls {
        Some(cfg) => b
            .with_tls_config(cfg)
            .https_only()
            .enable_http1()
            .wrap_connector(http),
        None => b
            .with_tls_config(no_tls())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http),
    }
}

/// A TLS config that trusts nothing (a static host's connector never uses it).
fn no_tls() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        })
}

/// The real host agent: Connect RPC for lifecycle, the agent's envd reverse proxy
/// (`/sandboxes/{id}/envd/...`) for processes and files.
pub struct AgentHostClient {
    url: String,
    http: HttpClient,
    /// Plain HTTP/1.1 for the sandbox proxy (upgrades included).
    raw: crate::app::host_proxy::RawClient,
    agent: agent::HostAgentClient<HttpClient>,
    files: reqwest::Client,
    token: Option<String>,
}

/// How long a lifecycle RPC may take (a TCG boot takes a few seconds; leave room).
const CREATE_TIMEOUT: Duration = Duration::from_secs(180);
const SHORT_TIMEOUT: Duration = Duration::from_secs(30);
/// Flattening a disk (and saving memory) of a large sandbox takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

impl AgentHostClient {
    /// A static host over plain HTTP; `token`: the host agent's shared secret, sent on
    /// every call (RPC, proxy, files).
    pub fn new(url: &str, token: Option<&str>) -> Result<Self, HostError> {
        Self::connect(
            url,
            TlsMode::Plain {
                token: token.map(str::to_owned),
            },
        )
    }

    /// A host at `url` reached as `mode` says (an enrolled host: `https://` only).
    pub fn connect(url: &str, mode: TlsMode) -> Result<Self, HostError> {
        let url = url.trim_end_matches('/').to_owned();
        let uri: http::Uri = url
            .parse()
            .map_err(|e| HostError::Transport(format!("invalid agent URL {url:?}: {e}")))?;
        if uri.scheme().is_none() || uri.host().is_none() {
            return Err(HostError::Transport(format!(
                "invalid agent URL {url:?}: needs http://host:port"
            )));
        }
        let (token, tls) = match mode {
            TlsMode::Plain { token } => (token, None),
            TlsMode::Mutual(cfg) => {
                if uri.scheme_str() != Some("https") {
                    return Err(HostError::Transport(format!(
                        "invalid agent URL {url:?}: an enrolled host needs https://"
                    )));
                }
                (None, Some(*cfg))
            }
        };
        let http: HttpClient = ServiceTransport::new(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector(tls.clone())),
        );
        let agent = agent::HostAgentClient::new(
            http.clone(),
            with_token(
                ClientConfig::new(uri)
                    .with_default_timeout(SHORT_TIMEOUT)
                    .with_default_max_message_size(MAX_RPC_MESSAGE),
                token.as_deref(),
            ),
        );
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = &token {
            let mut v = reqwest::header::HeaderValue::from_str(t).map_err(|_| {
                HostError::Transport("agent token is not a valid header value".into())
            })?;
            v.set_sensitive(true);
            headers.insert(AGENT_TOKEN_HEADER, v);
        }
        // The connectrpc client (hyper) never follows redirects; this one is told not to.
        let mut files = reqwest::Client::builder();
        if let Some(cfg) = tls.clone() {
            files = files.use_preconfigured_tls(cfg).https_only(true);
        }
        let files = files
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(BODY_IDLE_TIMEOUT)
            .default_headers(headers)
            .build()
            .map_err(|e| HostError::Transport(e.without_url().to_string()))?;
        Ok(Self {
            url,
            http,
            raw: crate::app::host_proxy::raw_client(tls),
            agent,
            files,
            token,
        })
    }

    fn envd_base(&self, id: &SandboxId) -> String {
        format!("{}/sandboxes/{id}/envd", self.url)
    }

    fn process(&self, id: &SandboxId) -> Result<process::ProcessClient<HttpClient>, HostError> {
        let uri: http::Uri = self
            .envd_base(id)
            .parse()
            .map_err(|e| HostError::Transport(format!("envd URL: {e}")))?;
        Ok(process::ProcessClient::new(
            self.http.clone(),
            with_token(
                ClientConfig::new(uri)
                    .with_default_timeout(SHORT_TIMEOUT)
                    .with_default_max_message_size(MAX_RPC_MESSAGE),
                self.token.as_deref(),
            ),
        ))
    }
}

/// The wire form of a sandbox spec.
fn proto_spec(s: CreateSpec) -> agent::SandboxSpec {
    agent::SandboxSpec {
        sandbox_id: s.sandbox_id.to_string(),
        template: s.template.to_string(),
        vcpus: s.vcpus,
        memory_mb: s.memory_mb,
        disk_size_mb: s.disk_size_mb,
        expires_at_unix_ms: s.expires_at_unix_ms,
        env: s.env.into_iter().collect(),
        team_id: s.team_id.to_string(),
        ..Default::default()
    }
}

/// A host's template report; `None` when its name is not a valid template name.
fn host_template(t: &agent::TemplateInfo) -> Option<HostTemplate> {
    Some(HostTemplate {
        name: t.name.parse().ok()?,
        allocated_bytes: t.allocated_bytes,
        apparent_bytes: t.apparent_bytes,
        has_memory: t.has_memory,
        source_sandbox_id: t.source_sandbox_id.parse().ok(),
        vcpus: t.vcpus,
        memory_mb: t.memory_mb,
        disk_size_mb: t.disk_size_mb,
        in_use: t.in_use,
    })
}

fn with_token(config: ClientConfig, token: Option<&str>) -> ClientConfig {
    match token {
        Some(t) => config.with_default_header(AGENT_TOKEN_HEADER, t.to_owned()),
        None => config,
    }
}

/// envd's convention: the Unix user rides in `Authorization: Basic base64("<user>:")`.
pub fn basic_user(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

fn selector(pid: u32) -> process::ProcessSelector {
    process::ProcessSelector {
        selector: Some(process::__buffa::oneof::process_selector::Selector::Pid(
            pid,
        )),
        ..Default::default()
    }
}

fn user_opts(user: &str) -> CallOptions {
    CallOptions::default().with_header("authorization", basic_user(user))
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

#[async_trait]
impl HostClient for AgentHostClient {
    fn url(&self) -> &str {
        &self.url
    }

    async fn proxy(
        &self,
        id: &SandboxId,
        port: u16,
        req: http::Request<axum::body::Body>,
    ) -> Result<http::Response<axum::body::Body>, HostError> {
        crate::app::host_proxy::forward(&self.raw, &self.url, self.token.as_deref(), id, port, req)
            .await
    }

    async fn console(&self, id: &SandboxId, limit: usize) -> Result<Vec<(i64, String)>, HostError> {
        let url = format!("{}/sandboxes/{id}/console", self.url);
        let resp = self
            .files
            .get(url)
            .query(&[("limit", limit)])
            .timeout(SHORT_TIMEOUT)
            .send()
            .await
            .map_err(|e| HostError::Transport(e.without_url().to_string()))?;
        let resp = check_status(resp).await?;
        let text = read_bounded(resp, 4 * 1024 * 1024).await;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| HostError::Transport(format!("console: not JSON: {e}")))?;
        Ok(v["lines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| Some((l["timestamp_ms"].as_i64()?, l["line"].as_str()?.to_owned())))
            .collect())
    }

    async fn info(&self) -> Result<HostInfo, HostError> {
        let r = self
            .agent
            .info(agent::InfoRequest::default())
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        let host_id = r.host_id.parse().map_err(|e| HostError::Rpc {
            code: ErrorCode::Internal,
            message: format!("agent reported a bad host ID: {e}"),
        })?;
        Ok(HostInfo {
            host_id,
            vmm: r.vmm,
            accel: r.accel,
            templates: r.templates.iter().filter_map(|t| t.parse().ok()).collect(),
            running: r.running,
            capacity: HostCapacity {
                memory_capacity_mb: r.memory_capacity_mb,
                memory_used_mb: r.memory_used_mb,
                vcpus_capacity: r.vcpus_capacity,
                vcpus_used: r.vcpus_used,
                disk_free_mb: r.disk_free_mb,
                max_sandboxes: r.max_sandboxes,
                vm_sandboxes: r.vm_sandboxes,
                pooled_sandboxes: r.pooled_sandboxes,
                pooled_memory_mb: r.pooled_memory_mb,
                pooled_vcpus: r.pooled_vcpus,
            },
            warm: r
                .warm
                .iter()
                .filter_map(|w| {
                    Some(WarmShape {
                        template: w.template.parse().ok()?,
                        vcpus: w.vcpus,
                        memory_mb: w.memory_mb,
                        disk_size_mb: w.disk_size_mb,
                        pooled: w.pooled,
                    })
                })
                .collect(),
            vm_sandboxes: r
                .vm_sandbox_ids
                .iter()
                .filter_map(|id| id.parse().ok())
                .collect(),
        })
    }

    async fn create_sandbox(&self, s: CreateSpec) -> Result<(), HostError> {
        let spec = proto_spec(s);
        self.agent
            .create_sandbox_with_options(
                agent::CreateSandboxRequest {
                    spec: spec.into(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(CREATE_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn destroy_sandbox(&self, id: &SandboxId) -> Result<bool, HostError> {
        let r = self
            .agent
            .destroy_sandbox_with_options(
                agent::DestroySandboxRequest {
                    sandbox_id: id.to_string(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(Duration::from_secs(60)),
            )
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.existed)
    }

    async fn list_sandboxes(&self) -> Result<Vec<HostSandbox>, HostError> {
        let r = self
            .agent
            .list_sandboxes(agent::ListSandboxesRequest::default())
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.sandboxes
            .iter()
            .filter(|s| {
                !matches!(
                    s.state.as_known(),
                    Some(agent::SandboxState::SANDBOX_STATE_STOPPED)
                )
            })
            .filter_map(|s| {
                let id = s.spec.as_option()?.sandbox_id.parse().ok()?;
                let phase = match s.state.as_known() {
                    Some(agent::SandboxState::SANDBOX_STATE_PAUSED) => HostPhase::Paused,
                    Some(
                        agent::SandboxState::SANDBOX_STATE_PAUSING
                        | agent::SandboxState::SANDBOX_STATE_RESUMING
                        | agent::SandboxState::SANDBOX_STATE_STOPPING,
                    ) => HostPhase::Changing,
                    _ => HostPhase::Running,
                };
                let failure = matches!(
                    s.state.as_known(),
                    Some(agent::SandboxState::SANDBOX_STATE_ERROR)
                )
                .then(|| {
                    if s.error.is_empty() {
                        "the sandbox failed on its host".to_owned()
                    } else {
                        sanitize(&s.error)
                    }
                });
                Some(HostSandbox { id, failure, phase })
            })
            .collect())
    }

    async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), HostError> {
        self.agent
            .pause_sandbox_with_options(
                agent::PauseSandboxRequest {
                    sandbox_id: id.to_string(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(CREATE_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn resume_sandbox(
        &self,
        id: &SandboxId,
        expires_at_unix_ms: i64,
    ) -> Result<(), HostError> {
        self.agent
            .resume_sandbox_with_options(
                agent::ResumeSandboxRequest {
                    sandbox_id: id.to_string(),
                    expires_at_unix_ms,
                    ..Default::default()
                },
                CallOptions::default().with_timeout(CREATE_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn snapshot_sandbox(
        &self,
        id: &SandboxId,
        template: &TemplateName,
        memory: bool,
    ) -> Result<HostTemplate, HostError> {
        let r = self
            .agent
            .snapshot_sandbox_with_options(
                agent::SnapshotSandboxRequest {
                    sandbox_id: id.to_string(),
                    template: template.to_string(),
                    memory,
                    ..Default::default()
                },
                CallOptions::default().with_timeout(SNAPSHOT_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        let t = r.template.as_option().ok_or_else(|| HostError::Rpc {
            code: ErrorCode::Internal,
            message: "the host agent answered a snapshot without its template".into(),
        })?;
        host_template(t).ok_or_else(|| HostError::Rpc {
            code: ErrorCode::Internal,
            message: "the host agent reported a bad template name".into(),
        })
    }

    async fn fork_sandbox(&self, id: &SandboxId, copies: Vec<CreateSpec>) -> Result<(), HostError> {
        self.agent
            .fork_sandbox_with_options(
                agent::ForkSandboxRequest {
                    sandbox_id: id.to_string(),
                    copies: copies.into_iter().map(proto_spec).collect(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(CREATE_TIMEOUT),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn list_templates(&self) -> Result<Vec<HostTemplate>, HostError> {
        let r = self
            .agent
            .list_templates(agent::ListTemplatesRequest::default())
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.templates.iter().filter_map(host_template).collect())
    }

    async fn delete_template(&self, template: &TemplateName) -> Result<bool, HostError> {
        let r = self
            .agent
            .delete_template_with_options(
                agent::DeleteTemplateRequest {
                    template: template.to_string(),
                    ..Default::default()
                },
                CallOptions::default().with_timeout(Duration::from_secs(60)),
            )
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.existed)
    }

    async fn start_process(&self, id: &SandboxId, spec: ProcSpec) -> Result<ProcEvents, HostError> {
        let client = self.process(id)?;
        let req = process::StartRequest {
            process: process::ProcessConfig {
                cmd: spec.cmd,
                args: spec.args,
                envs: spec.env.into_iter().collect(),
                cwd: spec.cwd,
                ..Default::default()
            }
            .into(),
            pty: spec
                .pty
                .map(|(cols, rows)| process::PTY {
                    size: process::pty::Size {
                        cols,
                        rows,
                        ..Default::default()
                    }
                    .into(),
                    ..Default::default()
                })
                .into(),
            stdin: Some(spec.stdin),
            ..Default::default()
        };
        let stream = client
            .start_with_options(req, user_opts(&spec.user).with_timeout(spec.deadline))
            .await
            .map_err(HostError::from_connect)?;
        Ok(proc_events!(stream))
    }

    async fn list_processes(&self, id: &SandboxId) -> Result<Vec<ProcInfo>, HostError> {
        let r = self
            .process(id)?
            .list_with_options(process::ListRequest::default(), user_opts("root"))
            .await
            .map_err(HostError::from_connect)?
            .into_owned();
        Ok(r.processes
            .iter()
            .map(|p| {
                let cfg = p.config.as_option();
                ProcInfo {
                    pid: p.pid,
                    cmd: cfg.map(|c| sanitize(&c.cmd)).unwrap_or_default(),
                    args: cfg
                        .map(|c| c.args.iter().map(|a| sanitize(a)).collect())
                        .unwrap_or_default(),
                    cwd: cfg.and_then(|c| c.cwd.as_deref().map(sanitize)),
                    tag: p.tag.as_deref().map(sanitize),
                }
            })
            .collect())
    }

    async fn connect_process(
        &self,
        id: &SandboxId,
        pid: u32,
        deadline: Duration,
    ) -> Result<ProcEvents, HostError> {
        let stream = self
            .process(id)?
            .connect_with_options(
                process::ConnectRequest {
                    process: selector(pid).into(),
                    ..Default::default()
                },
                user_opts("root").with_timeout(deadline),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(proc_events!(stream))
    }

    async fn send_signal(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        signal: Signal,
    ) -> Result<(), HostError> {
        let sig = match signal {
            Signal::Term => process::Signal::SIGNAL_SIGTERM,
            Signal::Kill => process::Signal::SIGNAL_SIGKILL,
        };
        self.process(id)?
            .send_signal_with_options(
                process::SendSignalRequest {
                    process: selector(pid).into(),
                    signal: sig.into(),
                    ..Default::default()
                },
                user_opts(user),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn send_input(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        data: Bytes,
        pty: bool,
    ) -> Result<(), HostError> {
        use process::__buffa::oneof::process_input::Input;
        let input = if pty {
            Input::Pty(data.to_vec())
        } else {
            Input::Stdin(data.to_vec())
        };
        self.process(id)?
            .send_input_with_options(
                process::SendInputRequest {
                    process: selector(pid).into(),
                    input: process::ProcessInput {
                        input: Some(input),
                        ..Default::default()
                    }
                    .into(),
                    ..Default::default()
                },
                user_opts(user),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn close_stdin(&self, id: &SandboxId, user: &str, pid: u32) -> Result<(), HostError> {
        self.process(id)?
            .close_stdin_with_options(
                process::CloseStdinRequest {
                    process: selector(pid).into(),
                    ..Default::default()
                },
                user_opts(user),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn resize_pty(
        &self,
        id: &SandboxId,
        user: &str,
        pid: u32,
        cols: u32,
        rows: u32,
    ) -> Result<(), HostError> {
        self.process(id)?
            .update_with_options(
                process::UpdateRequest {
                    process: selector(pid).into(),
                    pty: process::PTY {
                        size: process::pty::Size {
                            cols,
                            rows,
                            ..Default::default()
                        }
                        .into(),
                        ..Default::default()
                    }
                    .into(),
                    ..Default::default()
                },
                user_opts(user),
            )
            .await
            .map_err(HostError::from_connect)?;
        Ok(())
    }

    async fn upload_file(
        &self,
        id: &SandboxId,
        user: &str,
        path: &str,
        body: ByteStream,
    ) -> Result<(), HostError> {
        let url = format!("{}/files", self.envd_base(id));
        let resp = self
            .files
            .post(url)
            .query(&[("path", path)])
            .header("authorization", basic_user(user))
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(transport)?;
        check_status(resp).await.map(|_| ())
    }

    async fn export_template(&self, template: &TemplateName) -> Result<ByteStream, HostError> {
        self.export_stream(template).await
    }

    async fn import_template(
        &self,
        template: &TemplateName,
        body: ByteStream,
    ) -> Result<u64, HostError> {
        self.import_stream(template, body).await
    }

    async fn metrics(&self, id: &SandboxId) -> Result<SandboxMetrics, HostError> {
        let url = format!("{}/metrics", self.envd_base(id));
        let resp = self
            .files
            .get(url)
            .timeout(SHORT_TIMEOUT)
            .send()
            .await
            .map_err(transport)?;
        let resp = check_status(resp).await?;
        SandboxMetrics::from_guest(&read_bounded(resp, MAX_METRICS_BODY).await)
    }

    async fn download_file(
        &self,
        id: &SandboxId,
        user: &str,
        path: &str,
    ) -> Result<(Option<u64>, ByteStream), HostError> {
        let url = format!("{}/files", self.envd_base(id));
        let resp = self
            .files
            .get(url)
            .query(&[("path", path)])
            .header("authorization", basic_user(user))
            .send()
            .await
            .map_err(transport)?;
        let resp = check_status(resp).await?;
        let len = resp.content_length();
        let stream = resp.bytes_stream().map(|r| r.map_err(transport));
        Ok((len, stream.boxed()))
    }
}

impl AgentHostClient {
    /// `GET /templates/{name}/export` on the agent: the template's stream.
    pub(crate) async fn export_stream(
        &self,
        template: &TemplateName,
    ) -> Result<ByteStream, HostError> {
        let resp = self
            .files
            .get(format!("{}/templates/{template}/export", self.url))
            .send()
            .await
            .map_err(transport)?;
        let resp = check_status(resp).await?;
        Ok(resp.bytes_stream().map(|r| r.map_err(transport)).boxed())
    }

    /// `PUT /templates/{name}/import` on the agent, the body streamed as it comes.
    pub(crate) async fn import_stream(
        &self,
        template: &TemplateName,
        body: ByteStream,
    ) -> Result<u64, HostError> {
        let resp = self
            .files
            .put(format!("{}/templates/{template}/import", self.url))
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(transport)?;
        let resp = check_status(resp).await?;
        let made: serde_json::Value =
            serde_json::from_str(&read_bounded(resp, MAX_ERROR_BODY).await).unwrap_or_default();
        Ok(made["allocated_bytes"].as_u64().unwrap_or(0))
    }
}

/// A failed HTTP exchange, without its URL (no host addresses in API errors).
fn transport(e: reqwest::Error) -> HostError {
    let what = if e.is_timeout() {
        "the guest agent did not answer in time"
    } else if e.is_connect() {
        "the host agent is not reachable"
    } else if e.is_body() || e.is_decode() {
        "the transfer from the guest broke off"
    } else {
        "the call to the guest agent failed"
    };
    tracing::debug!(error = %e, "HTTP call through the host agent failed");
    HostError::Transport(what.to_owned())
}

/// A success passes; a redirect is refused (never followed); any other answer
/// becomes [`HostError::Http`] with the far side's message, read up to
/// [`MAX_ERROR_BODY`] and sanitized.
async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response, HostError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    if status.is_redirection() {
        // Reported as a bad gateway: the guest agent answered what it must not.
        return Err(HostError::Http {
            status: 502,
            message: format!(
                "the guest agent answered {} (redirects are not followed)",
                status.as_u16()
            ),
        });
    }
    let text = read_bounded(resp, MAX_ERROR_BODY).await;
    // envd answers errors as {"message": "...", "code": N}, the host agent's proxy as
    // {"error": {"code", "message"}}; fall back to the raw text.
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("message")
                .or_else(|| v.get("error").and_then(|e| e.get("message")))
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or(text);
    Err(HostError::Http {
        status: status.as_u16(),
        message: sanitize(&message),
    })
}

/// At most `limit` bytes of `resp`'s body as (lossy) text, within [`SHORT_TIMEOUT`];
/// whatever is not read by then is dropped.
async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> String {
    let mut buf = Vec::new();
    let read = async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            let room = limit.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if buf.len() >= limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(SHORT_TIMEOUT, read).await;
    String::from_utf8_lossy(&buf).into_owned()
}

//! `hearth`: one binary for the whole platform.
//!
//! `hearth up` runs the control plane, a host agent and SQLite in one process for a
//! single machine; `hearth server` and `hearth agent` run them apart; every other
//! command is a client of the REST API.

mod accounts;
mod bench;
mod client;
mod cmd;
mod config;
mod e2b;
mod lifecycle;
mod output;
mod serve;

use std::collections::BTreeMap;

use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: the API server allocates per row and per
/// response, and glibc's allocator (its arena locks and `malloc_consolidate`) was a
/// fifth of the CPU of `hearth bench api` (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Self-hosted microVM sandboxes: create a sandbox, run code in it, move files, destroy it.",
    after_help = "Start everything on this machine with `hearth up`, then e.g.:\n  \
        hearth sandbox create\n  hearth exec sb-… -- uname -r\n  hearth cp ./file sb-…:/tmp/file\n  hearth sandbox rm sb-…"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// Control plane URL (default: the one `hearth up` stored, else http://127.0.0.1:7420).
    #[arg(long, global = true, env = "HEARTH_URL")]
    url: Option<String>,
    /// API key (default: the admin key `hearth up` stored in ~/.config/hearth/credentials.json).
    #[arg(long, global = true, env = "HEARTH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run control plane + host agent + SQLite on this machine (single-host mode).
    Up(serve::UpArgs),
    /// Run only the control plane (REST API, database, reconciler).
    Server(serve::ServerArgs),
    /// Run only the host agent (VMs, disks, networks of this host).
    Agent(serve::AgentArgs),
    /// Create, list, inspect and destroy sandboxes.
    #[command(subcommand)]
    Sandbox(SandboxCmd),
    /// Run a command in a sandbox, stream its output, exit with its exit code.
    Exec(ExecArgs),
    /// Copy a file into or out of a sandbox: `hearth cp ./a sb-…:/tmp/a` or `hearth cp sb-…:/etc/os-release .`
    Cp(CpArgs),
    /// Templates you can create sandboxes from.
    #[command(subcommand)]
    Template(TemplateCmd),
    /// Save sandboxes as your team's templates (with or without memory), list and delete them.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Benchmarks that print numbers (and write them under bench/results/).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Use E2B's SDKs with this hearth: `eval "$(hearth e2b env)"`.
    #[command(subcommand)]
    E2b(e2b::E2bCmd),
    /// Your team's API keys: make (shown once), list, revoke.
    #[command(subcommand)]
    Key(accounts::KeyCmd),
    /// Operators (admin key): teams, any team's keys, users, hosts, every team's templates.
    #[command(subcommand)]
    Admin(accounts::AdminCmd),
    /// The team, key and rights your API key speaks for.
    Whoami,
    /// Your team's webhooks: its events POSTed to your URLs, signed.
    #[command(subcommand)]
    Webhook(accounts::WebhookCmd),
    /// Your team's audit log, newest first: who created, paused, snapshotted, deleted
    /// what, and which keys were made and revoked.
    Audit {
        /// Entries to show, 1 to 500.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// Entries older than this entry ID (printed at the end of a full page).
        #[arg(long)]
        before: Option<i64>,
    },
}

#[derive(Subcommand)]
enum SandboxCmd {
    /// Boot a new sandbox and print it once its guest agent answers.
    Create(CreateArgs),
    /// List your team's sandboxes (those not stopped or failed, as `docker ps`).
    #[command(alias = "ls")]
    List(ListArgs),
    /// Show one sandbox.
    Get { id: String },
    /// Destroy sandboxes (their VM, disk and network are released).
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Pause a running sandbox: its memory, processes and disk are kept, its VM is
    /// stopped and it holds no vCPUs or memory until `hearth sandbox resume`.
    Pause { id: String },
    /// Resume a paused sandbox exactly where it was; its lifetime starts again.
    Resume {
        id: String,
        /// New lifetime in seconds from now (default: the sandbox's own).
        #[arg(long = "timeout", value_name = "SECONDS")]
        timeout_s: Option<u32>,
    },
    /// Make running copies of a running sandbox (memory, processes, disk); the original keeps running.
    Fork {
        id: String,
        /// Number of copies, 1 to 16.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u32,
    },
    /// Keep a running sandbox alive: it ends (or pauses, with --on-timeout pause) SECONDS from now.
    Timeout { id: String, seconds: u32 },
    /// List the processes running in a sandbox (those started before a pause too).
    Ps { id: String },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Save a running or paused sandbox as a template of your team; a running one is
    /// frozen for the moment of the snapshot and then carries on.
    Create {
        /// Sandbox ID.
        id: String,
        /// Template name (lowercase letters, digits, '-', '_'), unique in your team.
        #[arg(long)]
        name: String,
        /// Keep memory too: sandboxes from it start by restore (warm), with the
        /// processes that ran at the snapshot.
        #[arg(long)]
        memory: bool,
    },
    /// List your team's snapshots (`hearth template list` shows the built-in ones too).
    #[command(alias = "ls")]
    List,
    /// Delete snapshots; one that sandboxes still use is refused.
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
pub struct ListArgs {
    /// Also stopped and failed sandboxes (kept for a retention period).
    #[arg(long, short)]
    pub all: bool,
    /// Only these states, comma-separated (e.g. `stopped,error`).
    #[arg(long, conflicts_with = "all")]
    pub state: Option<String>,
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// List templates visible to your team.
    #[command(alias = "ls")]
    List,
}

#[derive(Args)]
pub struct CreateArgs {
    /// Template to boot from: a built-in one or one of your snapshots.
    #[arg(long, short, default_value = "minimal")]
    pub template: String,
    #[arg(long)]
    pub vcpus: Option<u32>,
    #[arg(long)]
    pub memory_mb: Option<u32>,
    #[arg(long)]
    pub disk_size_mb: Option<u32>,
    /// Seconds until the sandbox is destroyed (or paused, see --on-timeout) automatically.
    #[arg(long)]
    pub timeout_s: Option<u32>,
    /// What happens when its time is up: destroy it, or pause it (kept paused for the
    /// server's paused retention, resumable with `hearth sandbox resume`).
    #[arg(long, value_parser = ["destroy", "pause"])]
    pub on_timeout: Option<String>,
    /// Environment variable for every command, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Free-form label, KEY=VALUE (repeatable).
    #[arg(long = "metadata", short = 'm', value_parser = parse_kv)]
    pub metadata: Vec<(String, String)>,
}

#[derive(Args)]
pub struct ExecArgs {
    /// Sandbox ID.
    pub id: String,
    /// Environment variable, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Working directory in the sandbox.
    #[arg(long)]
    pub cwd: Option<String>,
    /// User to run as (root or user).
    #[arg(long)]
    pub user: Option<String>,
    /// Kill the command after this many seconds (exit code 124 is reported).
    #[arg(long)]
    pub timeout_s: Option<u32>,
    /// Allocate a terminal (interactive programs).
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Command and arguments.
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(Args)]
pub struct CpArgs {
    /// Source: a local path or SANDBOX:/path.
    pub src: String,
    /// Destination: a local path or SANDBOX:/path.
    pub dst: String,
    /// Sandbox user who owns the written file / whose permissions apply (default root).
    #[arg(long)]
    pub user: Option<String>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if k.is_empty() {
        return Err(format!("empty key in {s:?}"));
    }
    Ok((k.to_string(), v.to_string()))
}

pub fn kv_map(v: &[(String, String)]) -> BTreeMap<String, String> {
    v.iter().cloned().collect()
}

fn main() {
    let cli = Cli::parse();
    if cli.command.is_client() {
        restore_sigpipe();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(run(cli));
    std::process::exit(code);
}

impl Command {
    /// Commands that only talk to the API and print: they may end quietly when their
    /// output pipe closes (`hearth sandbox list | head -1`). Not the servers, which
    /// write to pipes of child processes and must not die of a reader that went away.
    fn is_client(&self) -> bool {
        matches!(
            self,
            Command::Sandbox(_)
                | Command::Template(_)
                | Command::Snapshot(_)
                | Command::Exec(_)
                | Command::Cp(_)
                | Command::E2b(_)
                | Command::Key(_)
                | Command::Admin(_)
                | Command::Audit { .. }
                | Command::Whoami
                | Command::Webhook(_)
        )
    }
}

/// Let a write to a closed pipe end the process as for any Unix filter (Rust ignores
/// SIGPIPE, so `println!` would panic on EPIPE instead).
fn restore_sigpipe() {
    // SAFETY: called at the start of main before any thread exists; setting a signal's
    // disposition to SIG_DFL has no other effect on this process's memory.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

async fn run(cli: Cli) -> i32 {
    let g = cli.global;
    let result = match cli.command {
        Command::Up(a) => serve::up(a).await.map(|_| 0),
        Command::Server(a) => serve::server(a).await.map(|_| 0),
        Command::Agent(a) => serve::agent(a).await.map(|_| 0),
        Command::Sandbox(SandboxCmd::Create(a)) => cmd::sandbox_create(&g, a).await.map(|_| 0),
        Command::Sandbox(SandboxCmd::List(a)) => cmd::sandbox_list(&g, a).await.map(|_| 0),
        Command::Sandbox(SandboxCmd::Get { id }) => cmd::sandbox_get(&g, &id).await.map(|_| 0),
        Command::Sandbox(SandboxCmd::Rm { ids }) => cmd::sandbox_rm(&g, &ids).await.map(|_| 0),
        Command::Sandbox(SandboxCmd::Pause { id }) => lifecycle::pause(&g, &id).await.map(|_| 0),
        Command::Sandbox(SandboxCmd::Resume { id, timeout_s }) => {
            lifecycle::resume(&g, &id, timeout_s).await.map(|_| 0)
        }
        Command::Sandbox(SandboxCmd::Fork { id, count }) => {
            lifecycle::fork(&g, &id, count).await.map(|_| 0)
        }
        Command::Sandbox(SandboxCmd::Timeout { id, seconds }) => {
            lifecycle::timeout(&g, &id, seconds).await.map(|_| 0)
        }
        Command::Sandbox(SandboxCmd::Ps { id }) => lifecycle::ps(&g, &id).await.map(|_| 0),
        Command::Template(TemplateCmd::List) => cmd::template_list(&g).await.map(|_| 0),
        Command::Snapshot(SnapshotCmd::Create { id, name, memory }) => {
            lifecycle::snapshot_create(&g, &id, &name, memory)
                .await
                .map(|_| 0)
        }
        Command::Snapshot(SnapshotCmd::List) => lifecycle::snapshot_list(&g).await.map(|_| 0),
        Command::Snapshot(SnapshotCmd::Rm { names }) => {
            lifecycle::snapshot_rm(&g, &names).await.map(|_| 0)
        }
        Command::Exec(a) => cmd::exec(&g, a).await,
        Command::Cp(a) => cmd::cp(&g, a).await.map(|_| 0),
        Command::Bench(b) => bench::run(&g, b).await.map(|_| 0),
        Command::E2b(c) => e2b::run(&g, c).map(|_| 0),
        Command::Key(c) => accounts::key(&g, c).await.map(|_| 0),
        Command::Admin(c) => accounts::admin(&g, c).await.map(|_| 0),
        Command::Audit { limit, before } => accounts::audit(&g, limit, before).await.map(|_| 0),
        Command::Whoami => accounts::whoami(&g).await.map(|_| 0),
        Command::Webhook(c) => accounts::webhook(&g, c).await.map(|_| 0),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = e.downcast_ref::<client::ApiError>().and_then(client::hint) {
                eprintln!("hint: {hint}");
            }
            1
        }
    }
}

pub fn client(g: &Global) -> anyhow::Result<client::Client> {
    client::Client::new(config::resolve(g.url.clone(), g.api_key.clone())?)
}

//! `hearth key …` (a team's own API keys) and `hearth admin …` (teams, any team's
//! keys, every team's templates, host agents; needs an admin key).

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use crate::output::{print_json, print_table};
use crate::{client, Global};

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Make an API key of your team; prints the key alone on the last line (shown once).
    Create(NewKey),
    /// List your team's keys (prefix, last use, expiry; never the secrets).
    #[command(alias = "ls")]
    List,
    /// Revoke keys of your team: they stop working on the next request.
    #[command(alias = "rm")]
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Make and list teams.
    #[command(subcommand)]
    Team(TeamCmd),
    /// Make, list and revoke any team's API keys.
    #[command(subcommand)]
    Key(AdminKeyCmd),
    /// Make, list and disable users (people who sign in to the dashboard).
    #[command(subcommand)]
    User(UserCmd),
    /// List every team's templates and the platform's.
    Templates,
    /// Add host agents (one-time enrollment tokens), list, drain and revoke them.
    #[command(subcommand)]
    Host(HostCmd),
}

#[derive(Subcommand)]
pub enum HostCmd {
    /// Record a host; prints its one-time enrollment token alone on the last line
    /// (valid 1 h): give it to `hearth agent --control-url URL --enroll-token T` there.
    Create {
        /// Unique name: lowercase letters, digits and '-'.
        #[arg(long)]
        name: String,
        /// Where the control plane reaches the agent: https://HOST:PORT.
        #[arg(long)]
        url: String,
    },
    /// List hosts: status, last heartbeat, capacity and load.
    #[command(alias = "ls")]
    List,
    /// No new sandboxes go to these hosts (running ones keep running).
    Drain {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Take new sandboxes again.
    Undrain {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Revoke hosts: their certificates are refused from the next call on and their
    /// sandboxes are marked lost.
    #[command(alias = "rm")]
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

const HOST_COLUMNS: &[&str] = &[
    "id",
    "name",
    "status",
    "url",
    "last_heartbeat_at",
    "running",
];

fn host_row(h: &Value) -> Value {
    let mut r = h.clone();
    r["running"] = h["load"]["running"].clone();
    r
}

/// `METHOD /v1/admin/hosts/{id}{suffix}` for each ID; prints what each became.
async fn each_host(
    g: &Global,
    method: Method,
    suffix: &str,
    ids: &[String],
    done: &str,
) -> Result<()> {
    let c = client(g)?;
    let mut failed = 0;
    for id in ids {
        match c
            .json::<Value>(c.request(method.clone(), &format!("/v1/admin/hosts/{id}{suffix}")))
            .await
        {
            Ok(v) if g.json => print_json(&v),
            Ok(v) => println!(
                "{id} {done} (status {})",
                v["status"].as_str().unwrap_or("?")
            ),
            Err(e) => {
                eprintln!("error: {id}: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} host(s) failed", ids.len());
    }
    Ok(())
}

async fn host(g: &Global, cmd: HostCmd) -> Result<()> {
    let c = client(g)?;
    match cmd {
        HostCmd::Create { name, url } => {
            let v: Value = c
                .json(
                    c.request(Method::POST, "/v1/admin/hosts")
                        .json(&json!({ "name": name, "url": url })),
                )
                .await?;
            if g.json {
                print_json(&v);
            } else {
                let h = &v["host"];
                eprintln!(
                    "created host {} ({}) at {}; its enrollment token works once, until {}:",
                    h["id"].as_str().unwrap_or("?"),
                    h["name"].as_str().unwrap_or("?"),
                    h["url"].as_str().unwrap_or("?"),
                    h["enroll_expires_at"].as_str().unwrap_or("?"),
                );
                println!("{}", v["enrollment_token"].as_str().unwrap_or(""));
            }
        }
        HostCmd::List => {
            let v: Value = c.json(c.request(Method::GET, "/v1/admin/hosts")).await?;
            if g.json {
                print_json(&v);
            } else {
                let rows: Vec<Value> = v["hosts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(host_row)
                    .collect();
                print_table(&rows, HOST_COLUMNS);
            }
        }
        HostCmd::Drain { ids } => each_host(g, Method::POST, "/drain", &ids, "drained").await?,
        HostCmd::Undrain { ids } => {
            each_host(g, Method::POST, "/undrain", &ids, "undrained").await?
        }
        HostCmd::Revoke { ids } => each_host(g, Method::DELETE, "", &ids, "revoked").await?,
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Make a user of team T who signs in with EMAIL and a password read from the first
    /// line of standard input (10 to 256 characters), e.g.
    /// `printf '%s\n' "$PASSWORD" | hearth admin user create --team T --email E`.
    Create {
        /// Team name or ID.
        #[arg(long)]
        team: String,
        #[arg(long)]
        email: String,
        /// An admin user (may manage every team).
        #[arg(long)]
        admin: bool,
    },
    /// List users (all teams, or one).
    #[command(alias = "ls")]
    List {
        /// Team name or ID.
        #[arg(long)]
        team: Option<String>,
    },
    /// Disable users: their sessions end at once and they can no longer sign in.
    Disable {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum TeamCmd {
    /// Make a team (name: lowercase letters, digits, '-', '_'); then give it a key with
    /// `hearth admin key create --team NAME`.
    Create { name: String },
    /// List the teams.
    #[command(alias = "ls")]
    List,
}

#[derive(Subcommand)]
pub enum AdminKeyCmd {
    /// Make an API key of team T; prints the key alone on the last line (shown once).
    Create {
        /// Team name or ID.
        #[arg(long)]
        team: String,
        #[command(flatten)]
        key: NewKey,
        /// An admin key (may manage every team).
        #[arg(long)]
        admin: bool,
    },
    /// List the keys of team T.
    #[command(alias = "ls")]
    List {
        /// Team name or ID.
        #[arg(long)]
        team: String,
    },
    /// Revoke keys of any team: they stop working on the next request.
    #[command(alias = "rm")]
    Revoke {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Args)]
pub struct NewKey {
    /// A label to tell keys apart.
    #[arg(long)]
    pub name: Option<String>,
    /// The key stops working this many days from now (default: never).
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub expires_in_days: Option<u32>,
}

impl NewKey {
    fn body(&self, admin: bool) -> Value {
        let mut b = json!({"is_admin": admin});
        if let Some(n) = &self.name {
            b["name"] = json!(n);
        }
        if let Some(d) = self.expires_in_days {
            b["expires_in_s"] = json!(u64::from(d) * 86_400);
        }
        b
    }
}

const KEY_COLUMNS: &[&str] = &[
    "id",
    "name",
    "prefix",
    "is_admin",
    "active",
    "last_used_at",
    "expires_at",
    "revoked_at",
];

fn print_keys(g: &Global, v: &Value) {
    if g.json {
        print_json(v);
    } else {
        print_table(
            &v["keys"].as_array().cloned().unwrap_or_default(),
            KEY_COLUMNS,
        );
    }
}

/// A made key: `--json` prints the whole answer; otherwise what it is on stderr and
/// the secret alone on stdout's last line, for `KEY=$(hearth key create)`.
fn print_created(g: &Global, v: &Value) {
    if g.json {
        print_json(v);
        return;
    }
    let k = &v["key"];
    eprintln!(
        "created {} ({}) of team {}{}; store it now, it is not shown again:",
        k["id"].as_str().unwrap_or("?"),
        k["name"].as_str().unwrap_or("?"),
        k["team_id"].as_str().unwrap_or("?"),
        match k["expires_at"].as_str() {
            Some(t) => format!(", expires {t}"),
            None => String::new(),
        }
    );
    println!("{}", v["secret"].as_str().unwrap_or(""));
}

async fn revoke_all(g: &Global, prefix: &str, ids: &[String]) -> Result<()> {
    let c = client(g)?;
    let mut failed = 0;
    for id in ids {
        match c
            .json::<Value>(c.request(Method::DELETE, &format!("{prefix}/{id}")))
            .await
        {
            Ok(v) if g.json => print_json(&v),
            Ok(_) => println!("{id} revoked"),
            Err(e) => {
                eprintln!("error: {id}: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} key(s) not revoked", ids.len());
    }
    Ok(())
}

pub async fn key(g: &Global, cmd: KeyCmd) -> Result<()> {
    let c = client(g)?;
    match cmd {
        KeyCmd::Create(k) => {
            let v: Value = c
                .json(c.request(Method::POST, "/v1/keys").json(&k.body(false)))
                .await?;
            print_created(g, &v);
        }
        KeyCmd::List => print_keys(g, &c.json(c.request(Method::GET, "/v1/keys")).await?),
        KeyCmd::Revoke { ids } => revoke_all(g, "/v1/keys", &ids).await?,
    }
    Ok(())
}

/// A team's ID from its name or ID (names cannot be UUIDs, so there is no doubt).
async fn team_id(g: &Global, team: &str) -> Result<String> {
    if team.parse::<hearth_types::TeamId>().is_ok() {
        return Ok(team.to_owned());
    }
    let c = client(g)?;
    let v: Value = c.json(c.request(Method::GET, "/v1/admin/teams")).await?;
    v["teams"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["name"] == team)
        .and_then(|t| t["id"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no team named '{team}' (`hearth admin team list` shows them; \
                 `hearth admin team create {team}` makes it)"
            )
        })
}

pub async fn admin(g: &Global, cmd: AdminCmd) -> Result<()> {
    let c = client(g)?;
    match cmd {
        AdminCmd::Team(TeamCmd::Create { name }) => {
            let v: Value = c
                .json(
                    c.request(Method::POST, "/v1/admin/teams")
                        .json(&json!({ "name": name })),
                )
                .await?;
            if g.json {
                print_json(&v);
            } else {
                println!("{}", v["id"].as_str().unwrap_or(""));
            }
        }
        AdminCmd::Team(TeamCmd::List) => {
            let v: Value = c.json(c.request(Method::GET, "/v1/admin/teams")).await?;
            if g.json {
                print_json(&v);
            } else {
                print_table(
                    &v["teams"].as_array().cloned().unwrap_or_default(),
                    &["id", "name", "created_at"],
                );
            }
        }
        AdminCmd::Key(AdminKeyCmd::Create { team, key, admin }) => {
            let id = team_id(g, &team).await?;
            let v: Value = c
                .json(
                    c.request(Method::POST, &format!("/v1/admin/teams/{id}/keys"))
                        .json(&key.body(admin)),
                )
                .await?;
            print_created(g, &v);
        }
        AdminCmd::Key(AdminKeyCmd::List { team }) => {
            let id = team_id(g, &team).await?;
            let v: Value = c
                .json(c.request(Method::GET, &format!("/v1/admin/teams/{id}/keys")))
                .await?;
            print_keys(g, &v);
        }
        AdminCmd::Key(AdminKeyCmd::Revoke { ids }) => revoke_all(g, "/v1/admin/keys", &ids).await?,
        AdminCmd::User(cmd) => user(g, cmd).await?,
        AdminCmd::Host(cmd) => host(g, cmd).await?,
        AdminCmd::Templates => {
            let v: Value = c
                .json(c.request(Method::GET, "/v1/admin/templates"))
                .await?;
            if g.json {
                print_json(&v);
            } else {
                print_table(
                    &v["templates"].as_array().cloned().unwrap_or_default(),
                    &["name", "team_id", "has_memory", "size_bytes", "created_at"],
                );
            }
        }
    }
    Ok(())
}

const USER_COLUMNS: &[&str] = &[
    "id",
    "email",
    "team_id",
    "is_admin",
    "created_at",
    "disabled_at",
];

async fn user(g: &Global, cmd: UserCmd) -> Result<()> {
    let c = client(g)?;
    match cmd {
        UserCmd::Create { team, email, admin } => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                bail!("no password on standard input: pipe it in, e.g. `printf '%s\\n' \"$PASSWORD\" | hearth admin user create ...`");
            }
            let team_id = team_id(g, &team).await?;
            let v: Value = c
                .json(c.request(Method::POST, "/v1/admin/users").json(&json!({
                    "team_id": team_id, "email": email, "password": password, "is_admin": admin,
                })))
                .await?;
            if g.json {
                print_json(&v);
            } else {
                println!("{}", v["id"].as_str().unwrap_or(""));
            }
        }
        UserCmd::List { team } => {
            let path = match team {
                Some(t) => format!("/v1/admin/users?team_id={}", team_id(g, &t).await?),
                None => "/v1/admin/users".to_owned(),
            };
            let v: Value = c.json(c.request(Method::GET, &path)).await?;
            if g.json {
                print_json(&v);
            } else {
                print_table(
                    &v["users"].as_array().cloned().unwrap_or_default(),
                    USER_COLUMNS,
                );
            }
        }
        UserCmd::Disable { ids } => {
            let mut failed = 0;
            for id in &ids {
                match c
                    .json::<Value>(c.request(Method::DELETE, &format!("/v1/admin/users/{id}")))
                    .await
                {
                    Ok(v) if g.json => print_json(&v),
                    Ok(_) => println!("{id} disabled"),
                    Err(e) => {
                        eprintln!("error: {id}: {e:#}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} user(s) not disabled", ids.len());
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum WebhookCmd {
    /// POST your team's events (audit entries) to URL, signed; prints the signing
    /// secret alone on the last line (shown once).
    Create {
        url: String,
        /// Action patterns, comma-separated: `*` (default), `sandbox.*`, `sandbox.create`.
        #[arg(long, value_delimiter = ',')]
        events: Option<Vec<String>>,
    },
    /// List your team's webhooks: cursor, failures, last error.
    #[command(alias = "ls")]
    List,
    /// Remove webhooks: nothing more is sent to them.
    #[command(alias = "rm")]
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// `hearth webhook ...`.
pub async fn webhook(g: &Global, cmd: WebhookCmd) -> Result<()> {
    let c = client(g)?;
    match cmd {
        WebhookCmd::Create { url, events } => {
            let mut body = json!({ "url": url });
            if let Some(e) = events {
                body["events"] = json!(e);
            }
            let v: Value = c
                .json(c.request(Method::POST, "/v1/webhooks").json(&body))
                .await?;
            if g.json {
                print_json(&v);
            } else {
                eprintln!(
                    "created {} for {}; its signing secret, not shown again:",
                    v["webhook"]["id"].as_str().unwrap_or("?"),
                    v["webhook"]["url"].as_str().unwrap_or("?")
                );
                println!("{}", v["secret"].as_str().unwrap_or(""));
            }
        }
        WebhookCmd::List => {
            let v: Value = c.json(c.request(Method::GET, "/v1/webhooks")).await?;
            if g.json {
                print_json(&v);
            } else {
                print_table(
                    &v["webhooks"].as_array().cloned().unwrap_or_default(),
                    &[
                        "id",
                        "url",
                        "events",
                        "cursor",
                        "failures",
                        "last_error",
                        "disabled_at",
                    ],
                );
            }
        }
        WebhookCmd::Delete { ids } => {
            let mut failed = 0;
            for id in &ids {
                let r = c.request(Method::DELETE, &format!("/v1/webhooks/{id}"));
                match c.send(r).await {
                    Ok(_) => println!("{id} deleted"),
                    Err(e) => {
                        eprintln!("error: {id}: {e:#}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} webhook(s) not deleted", ids.len());
            }
        }
    }
    Ok(())
}

/// `hearth whoami`: the team, key and rights the configured key speaks for.
pub async fn whoami(g: &Global) -> Result<()> {
    let c = client(g)?;
    let v: Value = c.json(c.request(Method::GET, "/v1/me")).await?;
    if g.json {
        print_json(&v);
    } else {
        println!(
            "team      {} ({})",
            v["team_name"].as_str().unwrap_or("?"),
            v["team_id"].as_str().unwrap_or("?")
        );
        println!("key       {}", v["key_id"].as_str().unwrap_or("?"));
        println!("admin     {}", v["is_admin"]);
        if let Some(email) = v["user"]["email"].as_str() {
            println!("user      {email}");
        }
    }
    Ok(())
}

/// `hearth audit`: the team's audit log, newest first.
pub async fn audit(g: &Global, limit: u32, before: Option<i64>) -> Result<()> {
    let c = client(g)?;
    let mut path = format!("/v1/audit?limit={limit}");
    if let Some(b) = before {
        path.push_str(&format!("&before={b}"));
    }
    let v: Value = c.json(c.request(Method::GET, &path)).await?;
    if g.json {
        print_json(&v);
        return Ok(());
    }
    print_table(
        &v["entries"].as_array().cloned().unwrap_or_default(),
        &["id", "at", "action", "target", "actor_key_id"],
    );
    if let Some(next) = v["next_before"].as_i64() {
        eprintln!("older entries: hearth audit --before {next}");
    }
    Ok(())
}

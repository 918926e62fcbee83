//! Application logic: what each API operation does, independent of HTTP.
//!
//! Handlers in `http/` parse and call into [`App`]; [`App`] validates, talks to the
//! store (`hearth_db`) and to host agents (through [`hosts::HostClient`]). Nothing here
//! knows about status codes; errors are [`AppError`].

pub mod accounts;
pub mod audit;
pub mod concurrency;
pub mod e2b_tokens;
pub mod error;
pub mod exec;
pub mod files;
pub mod fleet;
pub mod host_proxy;
pub mod hosts;
pub mod lifecycle;
pub mod metrics;
mod ops;
pub mod reconcile;
pub mod sandbox_proxy;
pub mod sandboxes;
pub mod template_copy;
pub mod templates;
pub mod users;
pub mod validate;
pub mod webhooks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_db::Db;
use hearth_types::{SandboxId, SandboxLimits, TeamId, TeamQuota};
use tokio_util::sync::CancellationToken;

pub use error::{AppError, AppResult};
use hosts::{HostClient, Hosts};

/// Admission and housekeeping rules of the control plane (from its config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Quota of a team without its own `team_quotas` row.
    pub team_quota: TeamQuota,
    /// A sandbox still `starting` this long after its row was written is given up on
    /// (marked `error`, destroyed on its host) by the reconciler.
    pub create_timeout: Duration,
    /// Rows of `stopped` and `error` sandboxes are deleted this long after their last change.
    pub retention: Duration,
    /// Per-team caps on concurrent exec streams and file transfers.
    pub streams: concurrency::StreamCaps,
    /// A sandbox paused this long (since its last change) is destroyed.
    pub paused_retention: Duration,
    /// The reconciler leaves a running or paused row alone this long after its last
    /// change: a pause or resume may still be under way on its host.
    pub transition_grace: Duration,
    /// The `domain` E2B clients are told: a sandbox's port P is reached as
    /// `P-<sandbox id>.<domain>` through the sandbox proxy. `None`: not announced
    /// (`hearth_control::start` fills in `localhost:<its port>`).
    pub e2b_domain: Option<String>,
    /// Webhooks may call loopback, private and link-local addresses (tests, or an
    /// operator whose receivers live on a private network).
    pub webhook_allow_private: bool,
    /// Failed deliveries in a row after which a webhook is disabled.
    pub webhook_max_failures: u32,
    /// First wait after a failed delivery (doubled per failure, at most 5 minutes).
    pub webhook_backoff: Duration,
    /// How often the control plane polls each enrolled host's Info (the heartbeat).
    pub host_heartbeat: Duration,
    /// An enrolled host whose last heartbeat is older than this is `unreachable`
    /// (no new sandboxes; back to `active` when it answers).
    pub host_unreachable_after: Duration,
    /// An unreachable host's running and paused sandboxes become `error` (lost)
    /// once its last heartbeat is this old.
    pub host_lost_after: Duration,
    /// How long a host's enrollment token works.
    pub enroll_token_ttl: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            team_quota: TeamQuota::default(),
            // The host's CreateSandbox deadline (180 s) plus slack.
            create_timeout: Duration::from_secs(240),
            retention: Duration::from_secs(7 * 24 * 3600),
            streams: concurrency::StreamCaps::default(),
            paused_retention: Duration::from_secs(30 * 24 * 3600),
            // A pause or resume RPC may take up to 180 s (full migration under TCG).
            transition_grace: Duration::from_secs(240),
            e2b_domain: None,
            webhook_allow_private: false,
            webhook_max_failures: 20,
            webhook_backoff: Duration::from_secs(1),
            host_heartbeat: Duration::from_secs(2),
            host_unreachable_after: Duration::from_secs(10),
            host_lost_after: Duration::from_secs(60),
            enroll_token_ttl: Duration::from_secs(3600),
        }
    }
}

/// Shared state of the control plane.
pub struct App {
    pub db: Db,
    pub hosts: Hosts,
    pub limits: SandboxLimits,
    pub max_upload_bytes: u64,
    pub policy: Policy,
    /// Per sandbox, cancelled when it is destroyed: ends its exec streams at once.
    streams: Mutex<HashMap<SandboxId, CancellationToken>>,
    /// Exec streams and file transfers in flight, per team.
    concurrency: concurrency::Counters,
    /// The key behind sandboxes' access tokens (see `e2b_tokens`), read once.
    token_key: tokio::sync::OnceCell<Vec<u8>>,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: metrics::Metrics,
    /// Failed sign-ins per email.
    login_throttle: users::LoginThrottle,
    /// When failing webhooks may be tried again.
    webhook_backoff: webhooks::Backoff,
    /// The deployment CA (from the database), read once; `None` until first used.
    ca: tokio::sync::OnceCell<Arc<hearth_pki::Ca>>,
    /// Sandboxes with a long operation in flight here (see `ops`).
    in_flight: ops::InFlight,
}

impl App {
    pub fn new(
        db: Db,
        hosts: Vec<Arc<dyn HostClient>>,
        limits: SandboxLimits,
        max_upload_bytes: u64,
    ) -> Self {
        Self {
            db,
            hosts: Hosts::new(hosts),
            limits,
            max_upload_bytes,
            policy: Policy::default(),
            streams: Mutex::new(HashMap::new()),
            concurrency: concurrency::Counters::default(),
            token_key: tokio::sync::OnceCell::new(),
            metrics: metrics::Metrics::new(),
            login_throttle: users::LoginThrottle::default(),
            webhook_backoff: webhooks::Backoff::default(),
            ca: tokio::sync::OnceCell::new(),
            in_flight: ops::InFlight::default(),
        }
    }

    /// The same app with other admission and housekeeping rules.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The token that ends the exec streams of `id` when it is destroyed (see
    /// `running_stream`, which takes it between two checks that the sandbox runs).
    pub(crate) fn stream_token(&self, id: &SandboxId) -> CancellationToken {
        match self.streams.lock() {
            Ok(mut m) => m.entry(id.clone()).or_default().clone(),
            // A poisoned map only loses the early end of streams; the host still ends them.
            Err(_) => CancellationToken::new(),
        }
    }

    /// A slot of `kind` for `team` under its cap, released when dropped.
    pub(crate) fn permit(
        &self,
        team: TeamId,
        kind: concurrency::Kind,
    ) -> AppResult<concurrency::Permit> {
        self.concurrency
            .acquire(&self.policy.streams, team, kind)
            .map_err(AppError::QuotaExceeded)
    }

    /// End every exec stream of `id` now (it was destroyed or lost).
    pub(crate) fn end_streams(&self, id: &SandboxId) {
        if let Some(t) = self.streams.lock().ok().and_then(|mut m| m.remove(id)) {
            t.cancel();
        }
    }
}

/// Create the default team and an admin API key on first start. Returns the key's
/// secret (shown once), or `None` when the installation already has API keys.
pub async fn bootstrap(db: &Db) -> AppResult<Option<String>> {
    if db.count_api_keys().await? > 0 {
        return Ok(None);
    }
    let team = db.create_team("default").await?;
    let (key, secret) = db
        .create_api_key(&hearth_db::NewApiKey::new(team.id, "admin", true))
        .await?;
    tracing::info!(team_id = %team.id, key_id = %key.id, "bootstrapped default team and admin API key");
    Ok(Some(secret))
}

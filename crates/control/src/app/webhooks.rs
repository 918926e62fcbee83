//! Webhooks: a team's audit entries (the events of `GET /v1/events`) POSTed to URLs it
//! registers, in order, at least once, signed.
//!
//! Delivery runs on the control plane that leads background work (one per database),
//! a pass every half second: for each webhook, the entries after its cursor, each one
//! it wants POSTed as JSON with `hearth-webhook-id`, `hearth-event-id`,
//! `hearth-timestamp` and `hearth-signature: v1=<hex HMAC-SHA256(secret,
//! "<timestamp>.<body>")>`; a 2xx moves the cursor past it. A failure stops that
//! webhook's pass and backs off (1 s, 2 s, 4 s ... up to 5 min); after
//! `Policy::webhook_max_failures` failures in a row the webhook is disabled, with its
//! last error kept for its team to read.
//!
//! Webhook URLs are chosen by tenants, so they are requests the control plane makes on
//! a tenant's behalf: no redirect is followed, each POST has a 5 s deadline, the answer
//! is not read beyond its status, and addresses that are not public (loopback, private,
//! link-local, unique-local, unspecified) are refused at registration (IP literals) and
//! at every delivery (after the name is resolved, the POST goes to the checked address),
//! unless the operator allows them (`Policy::webhook_allow_private`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hearth_db::{AuditEntry, Principal, Webhook};
use hearth_types::WebhookId;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{App, AppError, AppResult};

/// Webhooks a team may have.
pub const MAX_WEBHOOKS_PER_TEAM: usize = 10;
/// Longest URL, in bytes.
pub const MAX_URL: usize = 2048;
/// Event patterns per webhook, and the longest one.
pub const MAX_PATTERNS: usize = 16;
pub const MAX_PATTERN: usize = 64;
/// Deadline of one POST.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Entries read per webhook per pass.
const BATCH: u32 = 50;
/// Longest backoff after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// When each failing webhook may be tried again (in this process).
#[derive(Debug, Default)]
pub struct Backoff {
    next: Mutex<HashMap<WebhookId, Instant>>,
}

/// What a delivery pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: usize,
    pub failed: usize,
}

/// Whether `ip` is an address a webhook may reach without the operator's leave.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)) // 100.64/10, shared address space
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80) // link local
        }
    }
}

/// A webhook URL: http or https, a host, no user or password, at most [`MAX_URL`].
fn check_url(raw: &str, allow_private: bool) -> AppResult<reqwest::Url> {
    let bad = |why: &str| AppError::InvalidArgument(format!("url {why}"));
    if raw.len() > MAX_URL {
        return Err(bad(&format!("must be at most {MAX_URL} bytes")));
    }
    let url = reqwest::Url::parse(raw).map_err(|e| bad(&format!("does not parse: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must be http:// or https://"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry a user or password"));
    }
    let Some(host) = url.host() else {
        return Err(bad("needs a host"));
    };
    let ip = match host {
        url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
        url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
        url::Host::Domain(_) => None,
    };
    if let Some(ip) = ip {
        if !allow_private && !is_public(ip) {
            return Err(bad(
                "points at a loopback, private or link-local address, which this server does not call",
            ));
        }
    }
    Ok(url)
}

/// Event patterns: `*`, `prefix.*`, or an action; lowercase letters, digits, `.`, `_`.
fn check_events(events: Option<Vec<String>>) -> AppResult<Vec<String>> {
    let events = events.unwrap_or_else(|| vec!["*".into()]);
    if events.is_empty() || events.len() > MAX_PATTERNS {
        return Err(AppError::InvalidArgument(format!(
            "events must have 1 to {MAX_PATTERNS} patterns"
        )));
    }
    for e in &events {
        // `*`, or dot-separated words of [a-z0-9_], the last of which may be `*`.
        let body = e.strip_suffix(".*").unwrap_or(e);
        let ok = e.len() <= MAX_PATTERN
            && (e == "*"
                || body.split('.').all(|w| {
                    !w.is_empty()
                        && w.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                }));
        if !ok {
            return Err(AppError::InvalidArgument(format!(
                "event pattern {:?} must be `*`, `prefix.*` or an action like sandbox.create",
                e.chars().take(70).collect::<String>()
            )));
        }
    }
    Ok(events)
}

fn parse_webhook_id(id: &str) -> AppResult<WebhookId> {
    id.parse()
        .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))
}

/// The JSON body of one delivery (the same fields as an event of `GET /v1/events`).
pub fn payload(e: &AuditEntry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id,
        "at": e.at.to_rfc3339(),
        "team_id": e.team_id.to_string(),
        "actor_key_id": e.actor_key_id.as_ref().map(|k| k.to_string()),
        "action": e.action,
        "target": e.target,
        "detail": e.detail,
    })
}

/// `v1=` and the hex HMAC-SHA256 of `"<timestamp>.<body>"` under `secret`: what a
/// receiver recomputes to check a delivery.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl App {
    /// Register a webhook of the caller's team; returns it and its signing secret.
    pub async fn create_webhook(
        &self,
        caller: &Principal,
        url: &str,
        events: Option<Vec<String>>,
    ) -> AppResult<(Webhook, String)> {
        let url = check_url(url, self.policy.webhook_allow_private)?;
        let events = check_events(events)?;
        if self.db.list_webhooks(caller.team_id).await?.len() >= MAX_WEBHOOKS_PER_TEAM {
            return Err(AppError::QuotaExceeded(format!(
                "team quota: at most {MAX_WEBHOOKS_PER_TEAM} webhooks (delete one first)"
            )));
        }
        let (hook, secret) = self
            .db
            .create_webhook(caller.team_id, url.as_str(), &events)
            .await?;
        tracing::info!(webhook = %hook.id, team_id = %caller.team_id, "webhook created");
        self.audit(
            caller.team_id,
            super::audit::action::WEBHOOK_CREATE,
            hook.id.as_str(),
            serde_json::json!({"url": hook.url, "events": hook.events}),
        )
        .await;
        Ok((hook, secret))
    }

    pub async fn list_webhooks(&self, caller: &Principal) -> AppResult<Vec<Webhook>> {
        Ok(self.db.list_webhooks(caller.team_id).await?)
    }

    /// Remove a webhook of the caller's team (another team's is a 404).
    pub async fn delete_webhook(&self, caller: &Principal, id: &str) -> AppResult<()> {
        let id = parse_webhook_id(id)?;
        if !self.db.delete_webhook(caller.team_id, &id).await? {
            return Err(AppError::NotFound(format!("webhook '{id}' not found")));
        }
        self.audit(
            caller.team_id,
            super::audit::action::WEBHOOK_DELETE,
            id.as_str(),
            serde_json::json!({}),
        )
        .await;
        Ok(())
    }

    /// One delivery pass over every active webhook (the leader runs it on a timer).
    pub async fn deliver_webhooks_once(&self) -> AppResult<DeliveryReport> {
        let mut report = DeliveryReport::default();
        for (hook, secret) in self.db.active_webhooks().await? {
            let waiting = {
                let next = self
                    .webhook_backoff
                    .next
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                next.get(&hook.id).is_some_and(|t| Instant::now() < *t)
            };
            if waiting {
                continue;
            }
            let entries = self
                .db
                .list_audit_after(hook.team_id, hook.cursor, BATCH)
                .await?;
            for entry in entries {
                if !hook.wants(&entry.action) {
                    self.db.webhook_delivered(&hook.id, entry.id, false).await?;
                    continue;
                }
                match self.post(&hook, &secret, &entry).await {
                    Ok(()) => {
                        self.db.webhook_delivered(&hook.id, entry.id, true).await?;
                        self.webhook_backoff
                            .next
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&hook.id);
                        report.delivered += 1;
                    }
                    Err(why) => {
                        report.failed += 1;
                        let max = self.policy.webhook_max_failures;
                        let n = self.db.webhook_failed(&hook.id, &why, max).await?;
                        if n >= max {
                            tracing::warn!(webhook = %hook.id, failures = n, error = %why,
                                "webhook disabled after failing too often");
                        } else {
                            tracing::info!(webhook = %hook.id, failures = n, error = %why,
                                "webhook delivery failed; will retry");
                        }
                        let base = self.policy.webhook_backoff;
                        let wait = base
                            .saturating_mul(1u32 << n.saturating_sub(1).min(16))
                            .min(MAX_BACKOFF);
                        self.webhook_backoff
                            .next
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(hook.id.clone(), Instant::now() + wait);
                        break;
                    }
                }
            }
        }
        Ok(report)
    }

    /// POST one entry; `Err` says why it failed (kept as the webhook's `last_error`).
    async fn post(&self, hook: &Webhook, secret: &str, entry: &AuditEntry) -> Result<(), String> {
        let url = reqwest::Url::parse(&hook.url).map_err(|e| format!("bad url: {e}"))?;
        let host = url.host_str().ok_or("url has no host")?.to_owned();
        let port = url.port_or_known_default().ok_or("url has no port")?;
        // Resolve once, check every address, and send to the checked one (no second
        // lookup that could answer differently).
        let addrs: Vec<SocketAddr> = tokio::time::timeout(
            DELIVERY_TIMEOUT,
            tokio::net::lookup_host((host.trim_matches(['[', ']']), port)),
        )
        .await
        .map_err(|_| "name lookup timed out".to_owned())?
        .map_err(|e| format!("name lookup failed: {e}"))?
        .collect();
        let addr = addrs
            .first()
            .copied()
            .ok_or("name resolves to no address")?;
        if !self.policy.webhook_allow_private && addrs.iter().any(|a| !is_public(a.ip())) {
            return Err(format!(
                "{host} resolves to a loopback, private or link-local address, which this server does not call"
            ));
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(DELIVERY_TIMEOUT)
            .resolve(&host, addr)
            .build()
            .map_err(|e| format!("client: {e}"))?;
        let body = serde_json::to_vec(&payload(entry)).map_err(|e| e.to_string())?;
        let now = chrono::Utc::now().timestamp();
        let resp = client
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", "hearth-webhooks")
            .header("hearth-webhook-id", hook.id.as_str())
            .header("hearth-event-id", entry.id.to_string())
            .header("hearth-timestamp", now.to_string())
            .header("hearth-signature", signature(secret, now, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| format!("POST failed: {}", super::hosts::sanitize(&e.to_string())))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("POST answered HTTP {}", status.as_u16()))
        }
    }
}

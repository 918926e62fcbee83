//! Enrolled hosts: what an admin does with them (create, list, drain, revoke), how an
//! agent enrolls (a one-time token traded for a certificate from the deployment CA),
//! and the heartbeat that keeps the registry ([`super::hosts::Hosts`]) in line with
//! the `hosts` table.
//!
//! Host lifecycle (`hearth_db::HostStatus`):
//! ```text
//! pending --enroll--> active <--drain/undrain--> draining
//!                       |  ^                        |  ^
//!          no heartbeat v  | answers   no heartbeat v  | answers
//!                     unreachable  <----------------+--+
//! any --revoke--> revoked (final)
//! ```
//! The heartbeat runs on every control plane (every `Policy::host_heartbeat`): it
//! loads enrolled hosts from the database (so a host enrolled through another replica
//! is picked up without a restart, and a revoked one is dropped), polls each one's
//! Info over mutual TLS, stores its capacity and load, and marks a host that has not
//! answered for `Policy::host_unreachable_after` `unreachable`. Polling rather than
//! agent pushes: the control plane already holds the only credential that reaches an
//! agent, agents need no route back to the control plane after enrollment, and one
//! place decides reachability from what it saw itself.
//!
//! This module does not pick hosts (the registry's scheduler does) and does not mark
//! sandboxes lost (the reconciler does, after `Policy::host_lost_after`).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hearth_db::{DbError, Host, HostLoad, HostStatus, Principal};
use hearth_pki::Ca;
use hearth_types::{HostId, TeamId};
use serde_json::json;

use super::accounts::require_admin;
use super::hosts::{AgentHostClient, Enrolled, HostClient, TlsMode};
use super::{App, AppError, AppResult};

/// Longest host name (`[a-z0-9][a-z0-9-]*`).
pub const MAX_HOST_NAME: usize = 63;
/// Longest host URL.
pub const MAX_HOST_URL: usize = 512;
/// Every enrollment token starts with this (so it is recognisable in a leak scan).
pub const ENROLL_TOKEN_PREFIX: &str = "hearth_enroll_";
/// The `secrets` row holding the CA bundle (`hearth_pki::Ca`).
const CA_SECRET: &str = "pki.ca.v1";
/// One heartbeat's Info call may take this long.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Audit actions of this module.
pub mod action {
    pub const HOST_CREATE: &str = "host.create";
    pub const HOST_ENROLL: &str = "host.enroll";
    pub const HOST_DRAIN: &str = "host.drain";
    pub const HOST_UNDRAIN: &str = "host.undrain";
    pub const HOST_REVOKE: &str = "host.revoke";
}

/// A new host and its one-time enrollment token (shown once).
pub struct NewHost {
    pub host: Host,
    pub token: String,
}

/// What an agent gets for its token.
pub struct Enrollment {
    pub host_id: HostId,
    pub certificate_pem: String,
    pub ca_certificate_pem: String,
}

/// A host name: lowercase letters, digits and '-', starting with a letter or digit.
pub fn host_name(name: &str) -> AppResult<String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_HOST_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(AppError::InvalidArgument(format!(
            "host name must be 1 to {MAX_HOST_NAME} of [a-z0-9-], starting with a letter or digit, got {:?}",
            name.chars().take(70).collect::<String>()
        )));
    }
    Ok(name.to_owned())
}

/// The URL the control plane reaches an enrolled host on: `https://HOST:PORT`, no
/// user, path, query or fragment.
pub fn host_url(url: &str) -> AppResult<String> {
    let bad = || {
        AppError::InvalidArgument(format!(
            "url must be https://HOST:PORT (the agent's address; no path), got {:?}",
            url.chars().take(80).collect::<String>()
        ))
    };
    if url.len() > MAX_HOST_URL || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad());
    }
    let trimmed = url.trim_end_matches('/');
    let uri: http::Uri = trimmed.parse().map_err(|_| bad())?;
    let ok = uri.scheme_str() == Some("https")
        && uri.host().is_some_and(|h| !h.is_empty())
        && uri.port_u16().is_some_and(|p| p > 0)
        && !uri.authority().is_some_and(|a| a.as_str().contains('@'))
        && uri
            .path_and_query()
            .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/");
    if !ok {
        return Err(bad());
    }
    Ok(trimmed.to_owned())
}

pub fn parse_host_id(id: &str) -> AppResult<HostId> {
    id.parse()
        .map_err(|e: hearth_types::IdError| AppError::InvalidArgument(e.to_string()))
}

fn not_found(id: &HostId) -> AppError {
    AppError::NotFound(format!("host '{id}' not found"))
}

fn token_hash(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn new_token() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    format!(
        "{ENROLL_TOKEN_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rngs::OsRng, 40)
    )
}

fn refused() -> AppError {
    AppError::Forbidden("the enrollment token is unknown, already used, expired or revoked".into())
}

impl App {
    /// The deployment CA: made on first use and kept in the database, so every
    /// replica on it signs and trusts the same one.
    pub async fn ca(&self) -> AppResult<Arc<Ca>> {
        self.ca
            .get_or_try_init(|| async {
                let bytes = self
                    .db
                    .get_or_create_secret(CA_SECRET, || {
                        Ca::generate().map(|c| c.to_bytes()).unwrap_or_default()
                    })
                    .await?;
                Ca::from_bytes(&bytes)
                    .map(Arc::new)
                    .map_err(|e| AppError::Internal(format!("the stored CA is unusable: {e}")))
            })
            .await
            .cloned()
    }

    /// A new pending host `name` reached at `url`, with its one-time enrollment token
    /// (valid for `Policy::enroll_token_ttl`). Admins only.
    pub async fn create_host(
        &self,
        caller: &Principal,
        name: &str,
        url: &str,
    ) -> AppResult<NewHost> {
        require_admin(caller)?;
        let new = self.create_host_record(name, url).await?;
        self.audit(
            caller.team_id,
            action::HOST_CREATE,
            new.host.id.as_str(),
            json!({ "name": name, "url": new.host.url }),
        )
        .await;
        Ok(new)
    }

    /// [`App::create_host`] without a caller: `hearth up` enrolling its own agent.
    pub async fn create_host_record(&self, name: &str, url: &str) -> AppResult<NewHost> {
        let name = host_name(name)?;
        let url = host_url(url)?;
        let token = new_token();
        let ttl = chrono::Duration::from_std(self.policy.enroll_token_ttl)
            .unwrap_or(chrono::Duration::hours(1));
        let id = HostId::generate();
        let host = self
            .db
            .create_host(&id, &name, &url, &token_hash(&token), Utc::now() + ttl)
            .await
            .map_err(|e| match e {
                DbError::AlreadyExists { what } => {
                    AppError::Conflict(format!("{what} already exists"))
                }
                e => AppError::Db(e),
            })?;
        tracing::info!(host_id = %id, name, url, "host created; waiting for its agent to enroll");
        Ok(NewHost { host, token })
    }

    /// Every host (enrolled and static), by ID. Admins only.
    pub async fn list_hosts(&self, caller: &Principal) -> AppResult<Vec<Host>> {
        require_admin(caller)?;
        Ok(self.db.list_hosts().await?)
    }

    pub async fn get_host(&self, caller: &Principal, id: &HostId) -> AppResult<Host> {
        require_admin(caller)?;
        self.db.get_host(id).await?.ok_or_else(|| not_found(id))
    }

    /// Drain (no new sandboxes; running ones stay) or undrain an enrolled host.
    pub async fn drain_host(
        &self,
        caller: &Principal,
        id: &HostId,
        drain: bool,
    ) -> AppResult<Host> {
        let host = self.get_host(caller, id).await?;
        if host.name.is_none() {
            return Err(AppError::Conflict(format!(
                "host '{id}' is a static host (--agent-url): remove its --agent-url instead"
            )));
        }
        if !self.db.set_host_drain(id, drain).await? {
            return Err(AppError::Conflict(format!("host '{id}' is revoked")));
        }
        let host = self.db.get_host(id).await?.ok_or_else(|| not_found(id))?;
        self.hosts.set_status(id, host.status);
        let what = if drain {
            action::HOST_DRAIN
        } else {
            action::HOST_UNDRAIN
        };
        tracing::info!(host_id = %id, status = host.status.as_str(), "{what}");
        self.audit(caller.team_id, what, id.as_str(), json!({}))
            .await;
        Ok(host)
    }

    /// Revoke a host: its token and certificate are refused from the next call on; no
    /// call goes to it any more; its sandboxes are marked lost by the reconciler.
    pub async fn revoke_host(&self, caller: &Principal, id: &HostId) -> AppResult<Host> {
        let host = self.get_host(caller, id).await?;
        if host.name.is_none() {
            return Err(AppError::Conflict(format!(
                "host '{id}' is a static host (--agent-url): remove its --agent-url instead"
            )));
        }
        if !self.db.revoke_host(id).await? {
            return Err(AppError::Conflict(format!(
                "host '{id}' is already revoked"
            )));
        }
        self.hosts.remove_enrolled(id);
        tracing::warn!(host_id = %id, "host revoked");
        self.audit(caller.team_id, action::HOST_REVOKE, id.as_str(), json!({}))
            .await;
        self.db.get_host(id).await?.ok_or_else(|| not_found(id))
    }

    /// Trade a one-time enrollment token and a CSR for a certificate naming the host
    /// (the token is the only credential). The token works once, before it expires.
    pub async fn enroll_host(&self, token: &str, csr_pem: &str) -> AppResult<Enrollment> {
        if token.len() > 128 || !token.starts_with(ENROLL_TOKEN_PREFIX) {
            return Err(refused());
        }
        if csr_pem.is_empty() || csr_pem.len() > hearth_pki::MAX_CSR_BYTES {
            return Err(AppError::InvalidArgument(format!(
                "csr must be a PEM certificate signing request of at most {} bytes",
                hearth_pki::MAX_CSR_BYTES
            )));
        }
        let hash = token_hash(token);
        let host = self
            .db
            .host_for_enrollment(&hash)
            .await?
            .ok_or_else(refused)?;
        let ca = self.ca().await?;
        let (cert, fingerprint) = ca.sign_host_csr(csr_pem, &host.id).map_err(|e| {
            AppError::InvalidArgument(format!(
                "csr is not a usable PEM certificate signing request: {e}"
            ))
        })?;
        // Compare-and-set on the token: of two racing uses, one wins.
        if !self
            .db
            .complete_enrollment(&host.id, &hash, &fingerprint)
            .await?
        {
            return Err(refused());
        }
        tracing::info!(host_id = %host.id, url = %host.url, "host enrolled");
        self.audit_as(
            None,
            TeamId::PLATFORM,
            action::HOST_ENROLL,
            host.id.as_str(),
            json!({ "fingerprint": fingerprint }),
        )
        .await;
        Ok(Enrollment {
            host_id: host.id,
            certificate_pem: cert,
            ca_certificate_pem: ca.ca_cert_pem.clone(),
        })
    }

    /// One heartbeat pass: registry from the `hosts` table, then every enrolled host
    /// not revoked is polled; returns the IDs of hosts that answered.
    pub async fn heartbeat_once(&self) -> AppResult<Vec<HostId>> {
        let rows = self.db.list_hosts().await?;
        if rows.iter().all(|h| h.cert_fingerprint.is_none()) {
            return Ok(Vec::new());
        }
        let ca = self.ca().await?;
        for h in &rows {
            let Some(fp) = &h.cert_fingerprint else {
                continue;
            };
            if matches!(h.status, HostStatus::Revoked | HostStatus::Pending) {
                self.hosts.remove_enrolled(&h.id);
                continue;
            }
            match self.hosts.enrolled(&h.id) {
                Some(e) if &e.fingerprint == fp => {
                    if e.status != h.status {
                        self.hosts.set_status(&h.id, h.status);
                    }
                }
                _ => match self.enrolled_client(&ca, h, fp) {
                    Ok(client) => {
                        tracing::info!(host_id = %h.id, url = %h.url, "enrolled host registered");
                        self.hosts.put_enrolled(
                            Enrolled {
                                id: h.id.clone(),
                                fingerprint: fp.clone(),
                                status: h.status,
                            },
                            client,
                        );
                    }
                    Err(e) => {
                        tracing::warn!(host_id = %h.id, error = %e, "cannot make a client for an enrolled host")
                    }
                },
            }
        }
        let polls = self
            .hosts
            .entries()
            .into_iter()
            .filter_map(|e| e.enrolled.clone().map(|n| (n, e.client)))
            .map(|(n, client)| async move {
                let asked = std::time::Instant::now();
                let r = tokio::time::timeout(HEARTBEAT_TIMEOUT, client.info()).await;
                (n, client, r, asked)
            });
        let mut answered = Vec::new();
        let stale_before = Utc::now()
            - chrono::Duration::from_std(self.policy.host_unreachable_after)
                .unwrap_or(chrono::Duration::seconds(10));
        for (n, client, r, asked) in futures::future::join_all(polls).await {
            let why = match r {
                Ok(Ok(info)) if info.host_id == n.id => {
                    let load = HostLoad {
                        memory_capacity_mb: info.capacity.memory_capacity_mb,
                        memory_used_mb: info.capacity.memory_used_mb,
                        vcpu_capacity: info.capacity.vcpus_capacity,
                        vcpus_used: info.capacity.vcpus_used,
                        disk_free_mb: info.capacity.disk_free_mb,
                        running: u64::from(info.running),
                    };
                    self.db
                        .record_heartbeat(&n.id, &info.vmm, &info.accel, &load)
                        .await?;
                    if n.status == HostStatus::Unreachable {
                        if let Some(h) = self.db.get_host(&n.id).await? {
                            tracing::info!(host_id = %n.id, status = h.status.as_str(), "host answers again");
                            self.hosts.set_status(&n.id, h.status);
                        }
                    }
                    self.hosts.set_info(&client, info, asked);
                    answered.push(n.id);
                    continue;
                }
                Ok(Ok(info)) => format!("it says it is {}", info.host_id),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {HEARTBEAT_TIMEOUT:?}"),
            };
            tracing::debug!(host_id = %n.id, error = %why, "heartbeat failed");
            if self.db.mark_host_unreachable(&n.id, stale_before).await? {
                tracing::warn!(host_id = %n.id, error = %why, "host marked unreachable: no new sandboxes go there");
                self.hosts.set_status(&n.id, HostStatus::Unreachable);
            }
        }
        Ok(answered)
    }

    fn enrolled_client(&self, ca: &Ca, h: &Host, fp: &str) -> AppResult<Arc<dyn HostClient>> {
        let tls = ca
            .control_client_config(&h.id, fp)
            .map_err(|e| AppError::Internal(format!("TLS config: {e}")))?;
        let client = AgentHostClient::connect(&h.url, TlsMode::Mutual(Box::new(tls)))
            .map_err(AppError::host("enrolled host"))?;
        Ok(Arc::new(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_urls_are_checked() {
        for ok in ["a", "host-1", "0x"] {
            assert!(host_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a/b", "..", &"a".repeat(64)] {
            assert!(host_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            host_url("https://10.0.0.2:7421/").unwrap(),
            "https://10.0.0.2:7421"
        );
        for bad in [
            "http://10.0.0.2:7421",
            "https://10.0.0.2",
            "https://u:p@10.0.0.2:1",
            "https://h:1/path",
            "https://h:1?q",
            "https://h:0",
            "ftp://h:1",
            "https:// h:1",
            "",
        ] {
            assert!(host_url(bad).is_err(), "{bad}");
        }
    }
}

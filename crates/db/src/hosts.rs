//! Host agents (the templates catalogue is in `templates.rs`).

use hearth_types::HostId;
use sqlx::Row;

use chrono::{DateTime, Utc};

use crate::keys::ms_to_time;
use crate::{now_ms, Db, DbError, Host, HostLoad, HostStatus, Result};

impl Db {
    /// Record a host agent (or refresh it): its URL, VMM and accelerator, seen now.
    pub async fn upsert_host(&self, id: &HostId, url: &str, vmm: &str, accel: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO hosts (id, url, vmm, accel, last_seen_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, $5) \
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, vmm = excluded.vmm, \
             accel = excluded.accel, last_seen_at = excluded.last_seen_at",
        )
        .bind(id.as_str())
        .bind(url)
        .bind(vmm)
        .bind(accel)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every host, by ID (static and enrolled, revoked ones too).
    pub async fn list_hosts(&self) -> Result<Vec<Host>> {
        let rows = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(host_from_row).collect()
    }

    pub async fn get_host(&self, id: &HostId) -> Result<Option<Host>> {
        let row = sqlx::query(&format!("SELECT {HOST_COLUMNS} FROM hosts WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(host_from_row).transpose()
    }

    /// Record a new `pending` host that an agent may enroll with the token whose
    /// SHA-256 is `token_hash` until `expires_at`. [`DbError::AlreadyExists`] when the
    /// name is taken.
    pub async fn create_host(
        &self,
        id: &HostId,
        name: &str,
        url: &str,
        token_hash: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<Host> {
        sqlx::query(
            "INSERT INTO hosts (id, url, vmm, accel, last_seen_at, name, status, \
             enroll_token_hash, enroll_expires_at, created_at) \
             VALUES ($1, $2, '', '', 0, $3, 'pending', $4, $5, $6)",
        )
        .bind(id.as_str())
        .bind(url)
        .bind(name)
        .bind(token_hash)
        .bind(expires_at.timestamp_millis())
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => DbError::AlreadyExists {
                what: format!("host '{name}'"),
            },
            _ => DbError::Query(e),
        })?;
        self.get_host(id)
            .await?
            .ok_or(DbError::Query(sqlx::Error::RowNotFound))
    }

    /// The pending host whose unexpired, unused enrollment token hashes to `token_hash`.
    pub async fn host_for_enrollment(&self, token_hash: &str) -> Result<Option<Host>> {
        let row = sqlx::query(&format!(
            "SELECT {HOST_COLUMNS} FROM hosts WHERE enroll_token_hash = $1 \
             AND status = 'pending' AND enroll_expires_at > $2"
        ))
        .bind(token_hash)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(host_from_row).transpose()
    }

    /// Use the enrollment token of `id` (compare-and-set on it, so it works once):
    /// the host becomes `active` with the certificate `fingerprint`. Returns whether
    /// this call used it.
    pub async fn complete_enrollment(
        &self,
        id: &HostId,
        token_hash: &str,
        fingerprint: &str,
    ) -> Result<bool> {
        let now = now_ms();
        let r = sqlx::query(
            "UPDATE hosts SET status = 'active', enroll_token_hash = NULL, \
             cert_fingerprint = $1, enrolled_at = $2 \
             WHERE id = $3 AND enroll_token_hash = $4 AND status = 'pending' \
             AND enroll_expires_at > $2",
        )
        .bind(fingerprint)
        .bind(now)
        .bind(id.as_str())
        .bind(token_hash)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Set or clear an admin's drain of a host that is not revoked; its status follows
    /// (an unreachable host stays unreachable until it answers). Returns whether the
    /// host exists and is not revoked.
    pub async fn set_host_drain(&self, id: &HostId, drain: bool) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE hosts SET drain = $1, status = CASE \
             WHEN status IN ('active', 'draining') THEN $2 ELSE status END \
             WHERE id = $3 AND status <> 'revoked'",
        )
        .bind(i64::from(drain))
        .bind(if drain { "draining" } else { "active" })
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Revoke a host (final). Its unused token is dropped. Returns whether it existed
    /// and was not revoked already.
    pub async fn revoke_host(&self, id: &HostId) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE hosts SET status = 'revoked', enroll_token_hash = NULL \
             WHERE id = $1 AND status <> 'revoked'",
        )
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// A heartbeat of enrolled host `id`: its load, VMM and accelerator; an
    /// unreachable host is back (`active`, or `draining` if drained).
    pub async fn record_heartbeat(
        &self,
        id: &HostId,
        vmm: &str,
        accel: &str,
        load: &HostLoad,
    ) -> Result<()> {
        let now = now_ms();
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(
            "UPDATE hosts SET vmm = $1, accel = $2, last_seen_at = $3, last_heartbeat_at = $3, \
             memory_capacity_mb = $4, memory_used_mb = $5, vcpu_capacity = $6, vcpus_used = $7, \
             disk_free_mb = $8, running = $9, status = CASE \
             WHEN status = 'unreachable' AND drain = 1 THEN 'draining' \
             WHEN status = 'unreachable' THEN 'active' ELSE status END \
             WHERE id = $10 AND status IN ('active', 'draining', 'unreachable')",
        )
        .bind(vmm)
        .bind(accel)
        .bind(now)
        .bind(big(load.memory_capacity_mb))
        .bind(big(load.memory_used_mb))
        .bind(big(load.vcpu_capacity))
        .bind(big(load.vcpus_used))
        .bind(big(load.disk_free_mb))
        .bind(big(load.running))
        .bind(id.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Mark `id` unreachable if it is active or draining and its last heartbeat (or
    /// enrollment) is older than `before`. Returns whether it changed.
    pub async fn mark_host_unreachable(&self, id: &HostId, before: DateTime<Utc>) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE hosts SET status = 'unreachable' WHERE id = $1 \
             AND status IN ('active', 'draining') \
             AND COALESCE(last_heartbeat_at, enrolled_at, 0) < $2",
        )
        .bind(id.as_str())
        .bind(before.timestamp_millis())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

const HOST_COLUMNS: &str = "id, url, vmm, accel, last_seen_at, name, status, drain, \
    created_at, enrolled_at, enroll_expires_at, cert_fingerprint, last_heartbeat_at, \
    memory_capacity_mb, memory_used_mb, vcpu_capacity, vcpus_used, disk_free_mb, running";

fn host_from_row(r: &sqlx::any::AnyRow) -> Result<Host> {
    let u64_of = |c: &str| -> Result<u64> { Ok(r.try_get::<i64, _>(c)?.max(0) as u64) };
    let time_of = |c: &str| -> Result<Option<DateTime<Utc>>> {
        Ok(r.try_get::<Option<i64>, _>(c)?.map(ms_to_time))
    };
    let status: &str = r.try_get("status")?;
    Ok(Host {
        id: r
            .try_get::<&str, _>("id")?
            .parse()
            .map_err(DbError::corrupt("hosts.id"))?,
        url: r.try_get("url")?,
        vmm: r.try_get("vmm")?,
        accel: r.try_get("accel")?,
        last_seen_at: ms_to_time(r.try_get("last_seen_at")?),
        name: r.try_get("name")?,
        status: HostStatus::parse(status).ok_or_else(|| DbError::Corrupt {
            column: "hosts.status",
            source: format!("unknown host status {status:?}").into(),
        })?,
        drain: r.try_get::<i64, _>("drain")? != 0,
        created_at: ms_to_time(r.try_get("created_at")?),
        enrolled_at: time_of("enrolled_at")?,
        enroll_expires_at: time_of("enroll_expires_at")?,
        cert_fingerprint: r.try_get("cert_fingerprint")?,
        last_heartbeat_at: time_of("last_heartbeat_at")?,
        load: HostLoad {
            memory_capacity_mb: u64_of("memory_capacity_mb")?,
            memory_used_mb: u64_of("memory_used_mb")?,
            vcpu_capacity: u64_of("vcpu_capacity")?,
            vcpus_used: u64_of("vcpus_used")?,
            disk_free_mb: u64_of("disk_free_mb")?,
            running: u64_of("running")?,
        },
    })
}

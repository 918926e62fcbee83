//! Host agents and the templates catalogue.

use hearth_types::{HostId, TeamId, TemplateName};
use sqlx::Row;

use chrono::{DateTime, Utc};

use crate::keys::{ms_to_time, parse_team};
use crate::{
    flag, now_ms, Db, DbError, Host, HostLoad, HostStatus, NewTemplate, Result, Template,
    TemplateLocation,
};

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

    /// Record a template of `team` (the platform team for built-in ones); refreshes its
    /// size if it exists, keeps its creation time.
    pub async fn upsert_template(
        &self,
        team: TeamId,
        name: &TemplateName,
        size_bytes: u64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO templates (name, team_id, size_bytes, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (team_id, name) DO UPDATE SET size_bytes = excluded.size_bytes",
        )
        .bind(name.as_str())
        .bind(team.to_string())
        .bind(i64::try_from(size_bytes).unwrap_or(i64::MAX))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Templates `team` may use: its own and the platform team's, by name.
    pub async fn list_templates(&self, team: TeamId) -> Result<Vec<Template>> {
        let rows = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates \
             WHERE team_id = $1 OR team_id = $2 ORDER BY name, team_id"
        ))
        .bind(team.to_string())
        .bind(TeamId::PLATFORM.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(template_from_row).collect()
    }

    /// Every template of every team and the platform's, by team then name (admins).
    pub async fn list_all_templates(&self) -> Result<Vec<Template>> {
        let rows = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates ORDER BY team_id, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(template_from_row).collect()
    }

    /// Remove the platform template `name` from the catalogue. Returns whether it existed.
    pub async fn delete_platform_template(&self, name: &TemplateName) -> Result<bool> {
        let r = sqlx::query("DELETE FROM templates WHERE team_id = $1 AND name = $2")
            .bind(TeamId::PLATFORM.to_string())
            .bind(name.as_str())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// The template `name` as `team` sees it: its own first, else the platform's.
    pub async fn get_template(
        &self,
        team: TeamId,
        name: &TemplateName,
    ) -> Result<Option<Template>> {
        let row = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates \
             WHERE name = $1 AND (team_id = $2 OR team_id = $3) \
             ORDER BY CASE WHEN team_id = $2 THEN 0 ELSE 1 END LIMIT 1"
        ))
        .bind(name.as_str())
        .bind(team.to_string())
        .bind(TeamId::PLATFORM.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(template_from_row).transpose()
    }

    /// Refresh what a host says about a platform template (sizes, memory, shape).
    pub async fn update_platform_template(
        &self,
        name: &TemplateName,
        apparent_bytes: u64,
        allocated_bytes: u64,
        has_memory: bool,
        shape: (u32, u32, u32),
    ) -> Result<()> {
        sqlx::query(
            "UPDATE templates SET size_bytes = $1, allocated_bytes = $2, has_memory = $3, \
             vcpus = $4, memory_mb = $5, disk_size_mb = $6 WHERE team_id = $7 AND name = $8",
        )
        .bind(i64::try_from(apparent_bytes).unwrap_or(i64::MAX))
        .bind(i64::try_from(allocated_bytes).unwrap_or(i64::MAX))
        .bind(has_memory)
        .bind(i64::from(shape.0))
        .bind(i64::from(shape.1))
        .bind(i64::from(shape.2))
        .bind(TeamId::PLATFORM.to_string())
        .bind(name.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record a team's new snapshot. [`DbError::AlreadyExists`] when the team already
    /// has a template of that name.
    pub async fn insert_template(&self, t: &NewTemplate) -> Result<Template> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO templates (name, team_id, size_bytes, created_at, host_id, host_name, \
             has_memory, allocated_bytes, source_sandbox_id, vcpus, memory_mb, disk_size_mb) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(t.name.as_str())
        .bind(t.team_id.to_string())
        .bind(i64::try_from(t.apparent_bytes).unwrap_or(i64::MAX))
        .bind(now)
        .bind(t.location.host_id.as_str())
        .bind(t.location.host_name.as_str())
        .bind(t.has_memory)
        .bind(i64::try_from(t.allocated_bytes).unwrap_or(i64::MAX))
        .bind(t.source_sandbox_id.as_str())
        .bind(i64::from(t.vcpus))
        .bind(i64::from(t.memory_mb))
        .bind(i64::from(t.disk_size_mb))
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => DbError::AlreadyExists {
                what: format!("template '{}'", t.name),
            },
            _ => DbError::Query(e),
        })?;
        Ok(Template {
            name: t.name.clone(),
            team_id: t.team_id,
            size_bytes: t.apparent_bytes,
            created_at: ms_to_time(now),
            location: Some(t.location.clone()),
            has_memory: t.has_memory,
            allocated_bytes: t.allocated_bytes,
            source_sandbox_id: Some(t.source_sandbox_id.clone()),
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            disk_size_mb: t.disk_size_mb,
        })
    }

    /// Remove `team`'s own template `name` from the catalogue (never a platform one).
    /// Returns whether it existed.
    pub async fn delete_team_template(&self, team: TeamId, name: &TemplateName) -> Result<bool> {
        if team.is_platform() {
            return Ok(false);
        }
        let r = sqlx::query("DELETE FROM templates WHERE team_id = $1 AND name = $2")
            .bind(team.to_string())
            .bind(name.as_str())
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
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

const TEMPLATE_COLUMNS: &str = "name, team_id, size_bytes, created_at, host_id, host_name, \
    CAST(has_memory AS INTEGER) AS has_memory, allocated_bytes, source_sandbox_id, vcpus, memory_mb, disk_size_mb";

fn u32_of(r: &sqlx::any::AnyRow, column: &str) -> Result<u32> {
    Ok(u32::try_from(r.try_get::<i64, _>(column)?.max(0)).unwrap_or(u32::MAX))
}

fn template_from_row(r: &sqlx::any::AnyRow) -> Result<Template> {
    Ok(Template {
        name: r
            .try_get::<&str, _>("name")?
            .parse()
            .map_err(DbError::corrupt("templates.name"))?,
        team_id: parse_team("templates.team_id", r.try_get("team_id")?)?,
        size_bytes: r.try_get::<i64, _>("size_bytes")?.max(0) as u64,
        created_at: ms_to_time(r.try_get("created_at")?),
        location: match (
            r.try_get::<Option<&str>, _>("host_id")?,
            r.try_get::<Option<&str>, _>("host_name")?,
        ) {
            (Some(h), Some(n)) => Some(TemplateLocation {
                host_id: h.parse().map_err(DbError::corrupt("templates.host_id"))?,
                host_name: n.parse().map_err(DbError::corrupt("templates.host_name"))?,
            }),
            _ => None,
        },
        has_memory: flag(r, "has_memory")?,
        allocated_bytes: r.try_get::<i64, _>("allocated_bytes")?.max(0) as u64,
        source_sandbox_id: r
            .try_get::<Option<&str>, _>("source_sandbox_id")?
            .map(str::parse)
            .transpose()
            .map_err(DbError::corrupt("templates.source_sandbox_id"))?,
        vcpus: u32_of(r, "vcpus")?,
        memory_mb: u32_of(r, "memory_mb")?,
        disk_size_mb: u32_of(r, "disk_size_mb")?,
    })
}

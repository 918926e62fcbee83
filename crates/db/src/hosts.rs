//! Host agents and the templates catalogue.

use hearth_types::{HostId, TeamId, TemplateName};
use sqlx::Row;

use crate::keys::{ms_to_time, parse_team};
use crate::{flag, now_ms, Db, DbError, Host, NewTemplate, Result, Template, TemplateLocation};

impl Db {
    /// Record a host agent (or refresh it): its URL, VMM and accelerator, seen now.
    pub async fn upsert_host(&self, id: &HostId, url: &str, vmm: &str, accel: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO hosts (id, url, vmm, accel, last_seen_at) VALUES ($1, $2, $3, $4, $5) \
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

    pub async fn list_hosts(&self) -> Result<Vec<Host>> {
        let rows = sqlx::query("SELECT id, url, vmm, accel, last_seen_at FROM hosts ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Host {
                    id: r
                        .try_get::<&str, _>("id")?
                        .parse()
                        .map_err(DbError::corrupt("hosts.id"))?,
                    url: r.try_get("url")?,
                    vmm: r.try_get("vmm")?,
                    accel: r.try_get("accel")?,
                    last_seen_at: ms_to_time(r.try_get("last_seen_at")?),
                })
            })
            .collect()
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

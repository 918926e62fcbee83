//! The templates catalogue: platform templates (team = the platform team, on every
//! host that lists them) and teams' snapshots (made on one host under a host-level
//! name, perhaps copied to others under the same name), with which hosts hold
//! each (`template_hosts`). The database is the source of truth; hosts' listings
//! only add or remove `template_hosts` rows of templates the catalogue has. Writes
//! that read first take the catalogue's lock from their first statement (on SQLite a
//! deferred transaction that reads, then writes, fails with "database is locked"
//! when another writer is about, whatever the busy timeout).

use std::collections::HashMap;

use hearth_types::{HostId, TeamId, TemplateName};
use sqlx::Row;

use crate::keys::{ms_to_time, parse_team};
use crate::{flag, now_ms, Db, DbError, NewTemplate, Result, Template, TemplateLocation};

impl Db {
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
        let list = rows
            .iter()
            .map(template_from_row)
            .collect::<Result<Vec<_>>>()?;
        self.with_hosts(list).await
    }

    /// Every template of every team and the platform's, by team then name (admins).
    pub async fn list_all_templates(&self) -> Result<Vec<Template>> {
        let rows = sqlx::query(&format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates ORDER BY team_id, name"
        ))
        .fetch_all(&self.pool)
        .await?;
        let list = rows
            .iter()
            .map(template_from_row)
            .collect::<Result<Vec<_>>>()?;
        self.with_hosts(list).await
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
        match row.as_ref().map(template_from_row).transpose()? {
            Some(t) => Ok(self.with_hosts(vec![t]).await?.pop()),
            None => Ok(None),
        }
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
        let mut tx = self.begin_locked(crate::TEMPLATES_LOCK).await?;
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
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => DbError::AlreadyExists {
                what: format!("template '{}'", t.name),
            },
            _ => DbError::Query(e),
        })?;
        insert_host_row(
            &mut tx,
            t.team_id,
            &t.name,
            &t.location.host_id,
            &t.location.host_name,
            now,
        )
        .await?;
        tx.commit().await?;
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
            hosts: vec![t.location.host_id.clone()],
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

    /// Record what host `host` holds: every template it lists (`listed`, host-level
    /// names: a platform template's own name, a team snapshot's `snap-*` name) that
    /// the catalogue knows is held there; templates it no longer lists are not.
    pub async fn record_host_templates(
        &self,
        host: &HostId,
        listed: &[TemplateName],
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.begin_locked(crate::TEMPLATES_LOCK).await?;
        for n in listed {
            // A platform template by its name, or a team's snapshot by its host-level name.
            sqlx::query(
                "INSERT INTO template_hosts (team_id, name, host_id, host_name, added_at) \
                 SELECT team_id, name, $1, $2, $3 FROM templates \
                 WHERE host_name = $2 OR (team_id = $4 AND name = $2 AND host_name IS NULL) \
                 ON CONFLICT (team_id, name, host_id) DO NOTHING",
            )
            .bind(host.as_str())
            .bind(n.as_str())
            .bind(now)
            .bind(TeamId::PLATFORM.to_string())
            .execute(&mut *tx)
            .await?;
        }
        let mut sql = String::from("DELETE FROM template_hosts WHERE host_id = $1");
        if !listed.is_empty() {
            let ph: Vec<String> = (0..listed.len()).map(|i| format!("${}", i + 2)).collect();
            sql.push_str(&format!(" AND host_name NOT IN ({})", ph.join(", ")));
        }
        let mut q = sqlx::query(&sql).bind(host.as_str());
        for n in listed {
            q = q.bind(n.as_str());
        }
        q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Record that `host` now holds `team`'s template `name` (a copy made there,
    /// under the same host-level name). False when the template is gone.
    pub async fn add_template_host(
        &self,
        team: TeamId,
        name: &TemplateName,
        host: &HostId,
        host_name: &TemplateName,
    ) -> Result<bool> {
        let mut tx = self.begin_locked(crate::TEMPLATES_LOCK).await?;
        let exists = sqlx::query("SELECT 1 FROM templates WHERE team_id = $1 AND name = $2")
            .bind(team.to_string())
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if exists {
            insert_host_row(&mut tx, team, name, host, host_name, now_ms()).await?;
        }
        tx.commit().await?;
        Ok(exists)
    }

    /// `list` with the hosts that hold each template filled in.
    async fn with_hosts(&self, mut list: Vec<Template>) -> Result<Vec<Template>> {
        if list.is_empty() {
            return Ok(list);
        }
        let teams: std::collections::BTreeSet<String> =
            list.iter().map(|t| t.team_id.to_string()).collect();
        let ph: Vec<String> = (0..teams.len()).map(|i| format!("${}", i + 1)).collect();
        let sql = format!(
            "SELECT team_id, name, host_id FROM template_hosts WHERE team_id IN ({}) \
             ORDER BY host_id",
            ph.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for t in &teams {
            q = q.bind(t.as_str());
        }
        let mut held: HashMap<(String, String), Vec<HostId>> = HashMap::new();
        for r in q.fetch_all(&self.pool).await? {
            let host: HostId = r
                .try_get::<&str, _>("host_id")?
                .parse()
                .map_err(DbError::corrupt("template_hosts.host_id"))?;
            held.entry((r.try_get("team_id")?, r.try_get("name")?))
                .or_default()
                .push(host);
        }
        for t in &mut list {
            if let Some(h) = held.remove(&(t.team_id.to_string(), t.name.to_string())) {
                t.hosts = h;
            }
        }
        Ok(list)
    }
}

/// One `template_hosts` row (already there: its host-level name refreshed).
async fn insert_host_row(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    team: TeamId,
    name: &TemplateName,
    host: &HostId,
    host_name: &TemplateName,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO template_hosts (team_id, name, host_id, host_name, added_at) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (team_id, name, host_id) DO UPDATE SET host_name = excluded.host_name",
    )
    .bind(team.to_string())
    .bind(name.as_str())
    .bind(host.as_str())
    .bind(host_name.as_str())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
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
        hosts: Vec::new(),
    })
}

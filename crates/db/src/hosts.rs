//! Host agents and the templates catalogue.

use hearth_types::{HostId, TeamId, TemplateName};
use sqlx::Row;

use crate::keys::{ms_to_time, parse_team};
use crate::{now_ms, Db, DbError, Host, Result, Template};

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
        let rows = sqlx::query(
            "SELECT name, team_id, size_bytes, created_at FROM templates \
             WHERE team_id = $1 OR team_id = $2 ORDER BY name, team_id",
        )
        .bind(team.to_string())
        .bind(TeamId::PLATFORM.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(template_from_row).collect()
    }

    /// The template `name` as `team` sees it: its own first, else the platform's.
    pub async fn get_template(
        &self,
        team: TeamId,
        name: &TemplateName,
    ) -> Result<Option<Template>> {
        let row = sqlx::query(
            "SELECT name, team_id, size_bytes, created_at FROM templates \
             WHERE name = $1 AND (team_id = $2 OR team_id = $3) \
             ORDER BY CASE WHEN team_id = $2 THEN 0 ELSE 1 END LIMIT 1",
        )
        .bind(name.as_str())
        .bind(team.to_string())
        .bind(TeamId::PLATFORM.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(template_from_row).transpose()
    }
}

fn template_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Template> {
    Ok(Template {
        name: r
            .try_get::<&str, _>("name")?
            .parse()
            .map_err(DbError::corrupt("templates.name"))?,
        team_id: parse_team("templates.team_id", r.try_get("team_id")?)?,
        size_bytes: r.try_get::<i64, _>("size_bytes")?.max(0) as u64,
        created_at: ms_to_time(r.try_get("created_at")?),
    })
}

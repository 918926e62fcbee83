//! Host agents (the templates catalogue is in `templates.rs`).

use hearth_types::HostId;
use sqlx::Row;

use crate::keys::ms_to_time;
use crate::{now_ms, Db, DbError, Host, Result};

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
}

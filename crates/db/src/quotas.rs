//! Per-team quotas and admission: the quota check and the insert of the new
//! sandbox's row are one atomic step, so concurrent creates cannot together pass a
//! limit that each of them alone respects.
//!
//! SQLite: `BEGIN IMMEDIATE` takes the database's write lock before the count, so a
//! second admission waits (busy timeout) until the first has committed its row.
//! PostgreSQL (later): the same transaction with `SELECT ... FROM teams WHERE id = $1
//! FOR UPDATE` first, which serialises admissions of one team and leaves other teams
//! free.
//!
//! What counts: every active sandbox (pending, starting, running, paused) counts
//! against the number of sandboxes and the disk; only those that hold a VM (not
//! paused ones) count against vCPUs and memory, as at E2B. A resume therefore passes
//! the vCPU and memory check in the same atomic step as its `paused` -> `running`.

use hearth_types::{QuotaExceeded, SandboxShape, TeamId, TeamQuota, TeamUsage};
use sqlx::Row;

use chrono::{DateTime, Utc};
use hearth_types::{SandboxId, SandboxState};

use crate::sandboxes::insert_row;
use crate::{now_ms, Db, NewSandbox, Result};

/// Whether a resume was admitted (and its row marked `running`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeAdmission {
    Admitted,
    /// Nothing was written: the team would pass this limit.
    Refused(QuotaExceeded),
    /// The row is not (or no longer) a paused sandbox of the team.
    NotPaused,
}

/// Whether a create was admitted (and its row inserted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The row is in, in the state given.
    Admitted,
    /// Nothing was written: the team would pass this limit.
    Refused(QuotaExceeded),
}

fn opt_u64(r: &sqlx::any::AnyRow, column: &str) -> Result<Option<u64>> {
    Ok(r.try_get::<Option<i64>, _>(column)?
        .map(|v| u64::try_from(v).unwrap_or(0)))
}

impl Db {
    /// The quota of `team`: its own values where the `team_quotas` row sets them,
    /// `default` elsewhere.
    pub async fn team_quota(&self, team: TeamId, default: &TeamQuota) -> Result<TeamQuota> {
        let mut conn = self.pool.acquire().await?;
        quota_in(&mut conn, team, default).await
    }

    /// Give `team` its own quota (all four values); `None` goes back to the defaults.
    pub async fn set_team_quota(&self, team: TeamId, quota: Option<&TeamQuota>) -> Result<()> {
        match quota {
            None => {
                sqlx::query("DELETE FROM team_quotas WHERE team_id = $1")
                    .bind(team.to_string())
                    .execute(&self.pool)
                    .await?;
            }
            Some(q) => {
                sqlx::query(
                    "INSERT INTO team_quotas (team_id, max_sandboxes, max_vcpus, max_memory_mb, max_disk_mb) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (team_id) DO UPDATE SET max_sandboxes = $2, max_vcpus = $3, \
                     max_memory_mb = $4, max_disk_mb = $5",
                )
                .bind(team.to_string())
                .bind(i64::from(q.max_sandboxes))
                .bind(i64::from(q.max_vcpus))
                .bind(i64::try_from(q.max_memory_mb).unwrap_or(i64::MAX))
                .bind(i64::try_from(q.max_disk_mb).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await?;
            }
        }
        Ok(())
    }

    /// What the active sandboxes of `team` hold now.
    pub async fn team_usage(&self, team: TeamId) -> Result<TeamUsage> {
        let mut conn = self.pool.acquire().await?;
        usage_in(&mut conn, team).await
    }

    /// Check `team`'s quota (its own, else `default`) against its active sandboxes plus
    /// `s`, and insert `s` if it fits: one transaction, so that concurrent admissions
    /// are serialised and never pass the quota together.
    pub async fn insert_sandbox_within_quota(
        &self,
        s: &NewSandbox,
        default: &TeamQuota,
    ) -> Result<Admission> {
        self.insert_sandboxes_within_quota(std::slice::from_ref(s), default)
            .await
    }

    /// [`Db::insert_sandbox_within_quota`] for several sandboxes of one team (a fork):
    /// all of them or none.
    pub async fn insert_sandboxes_within_quota(
        &self,
        rows: &[NewSandbox],
        default: &TeamQuota,
    ) -> Result<Admission> {
        let Some(first) = rows.first() else {
            return Ok(Admission::Admitted);
        };
        let mut tx = self.begin_serialized().await?;
        let quota = quota_in(&mut tx, first.team_id, default).await?;
        let mut usage = usage_in(&mut tx, first.team_id).await?;
        for s in rows {
            let shape = SandboxShape {
                vcpus: s.vcpus,
                memory_mb: s.memory_mb,
                disk_size_mb: s.disk_size_mb,
                timeout_s: s.timeout_s,
            };
            if let Err(refused) = quota.admit(&usage, &shape) {
                tx.rollback().await?;
                return Ok(Admission::Refused(refused));
            }
            usage.sandboxes += 1;
            usage.vcpus += u64::from(s.vcpus);
            usage.memory_mb += u64::from(s.memory_mb);
            usage.disk_mb += u64::from(s.disk_size_mb);
            insert_row(&mut *tx, s).await?;
        }
        tx.commit().await?;
        Ok(Admission::Admitted)
    }

    /// Resume admission: a `paused` sandbox of `team` becomes `running` with a new
    /// deadline (and lifetime, with `timeout_s`) if its vCPUs and memory fit the
    /// team's quota beside what its other sandboxes hold; one transaction.
    pub async fn resume_within_quota(
        &self,
        team: TeamId,
        id: &SandboxId,
        expires_at: DateTime<Utc>,
        timeout_s: Option<u32>,
        default: &TeamQuota,
    ) -> Result<ResumeAdmission> {
        SandboxState::Paused.transition(SandboxState::Running)?;
        let mut tx = self.begin_serialized().await?;
        let row = sqlx::query(
            "SELECT vcpus, memory_mb FROM sandboxes WHERE id = $1 AND team_id = $2 AND state = 'paused'",
        )
        .bind(id.as_str())
        .bind(team.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(ResumeAdmission::NotPaused);
        };
        let vcpus = u64::try_from(row.try_get::<i64, _>("vcpus")?).unwrap_or(0);
        let memory_mb = u64::try_from(row.try_get::<i64, _>("memory_mb")?).unwrap_or(0);
        let quota = quota_in(&mut tx, team, default).await?;
        let usage = usage_in(&mut tx, team).await?;
        if usage.vcpus + vcpus > u64::from(quota.max_vcpus) {
            tx.rollback().await?;
            return Ok(ResumeAdmission::Refused(QuotaExceeded::Vcpus {
                max: quota.max_vcpus,
                used: usage.vcpus,
                asked: u32::try_from(vcpus).unwrap_or(u32::MAX),
            }));
        }
        if usage.memory_mb + memory_mb > quota.max_memory_mb {
            tx.rollback().await?;
            return Ok(ResumeAdmission::Refused(QuotaExceeded::MemoryMb {
                max: quota.max_memory_mb,
                used: usage.memory_mb,
                asked: u32::try_from(memory_mb).unwrap_or(u32::MAX),
            }));
        }
        sqlx::query(
            "UPDATE sandboxes SET state = 'running', error = NULL, expires_at = $1, \
             timeout_s = COALESCE($2, timeout_s), updated_at = $3 WHERE id = $4 AND state = 'paused'",
        )
        .bind(expires_at.timestamp_millis())
        .bind(timeout_s.map(i64::from))
        .bind(now_ms())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ResumeAdmission::Admitted)
    }
}

async fn quota_in(
    conn: &mut sqlx::AnyConnection,
    team: TeamId,
    default: &TeamQuota,
) -> Result<TeamQuota> {
    let row = sqlx::query(
        "SELECT max_sandboxes, max_vcpus, max_memory_mb, max_disk_mb FROM team_quotas \
         WHERE team_id = $1",
    )
    .bind(team.to_string())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else {
        return Ok(*default);
    };
    let small = |v: Option<u64>, d: u32| v.map_or(d, |v| u32::try_from(v).unwrap_or(u32::MAX));
    Ok(TeamQuota {
        max_sandboxes: small(opt_u64(&r, "max_sandboxes")?, default.max_sandboxes),
        max_vcpus: small(opt_u64(&r, "max_vcpus")?, default.max_vcpus),
        max_memory_mb: opt_u64(&r, "max_memory_mb")?.unwrap_or(default.max_memory_mb),
        max_disk_mb: opt_u64(&r, "max_disk_mb")?.unwrap_or(default.max_disk_mb),
    })
}

async fn usage_in(conn: &mut sqlx::AnyConnection, team: TeamId) -> Result<TeamUsage> {
    // Paused sandboxes hold no VM: they count for the number and the disk only.
    let r = sqlx::query(
        "SELECT COUNT(*) AS n, \
         CAST(COALESCE(SUM(CASE WHEN state = 'paused' THEN 0 ELSE vcpus END), 0) AS BIGINT) AS vcpus, \
         CAST(COALESCE(SUM(CASE WHEN state = 'paused' THEN 0 ELSE memory_mb END), 0) AS BIGINT) \
         AS memory_mb, \
         CAST(COALESCE(SUM(disk_size_mb), 0) AS BIGINT) AS disk_mb \
         FROM sandboxes WHERE team_id = $1 \
         AND state IN ('pending', 'starting', 'running', 'paused')",
    )
    .bind(team.to_string())
    .fetch_one(&mut *conn)
    .await?;
    let get = |c: &str| -> Result<u64> { Ok(u64::try_from(r.try_get::<i64, _>(c)?).unwrap_or(0)) };
    Ok(TeamUsage {
        sandboxes: get("n")?,
        vcpus: get("vcpus")?,
        memory_mb: get("memory_mb")?,
        disk_mb: get("disk_mb")?,
    })
}

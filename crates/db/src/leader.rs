//! Leadership for background work that must run on one control plane at a time (the
//! reconciler, the reaper of expired sandboxes) when several share one database.
//!
//! PostgreSQL: a session-level advisory lock taken by one connection that the
//! [`Leadership`] keeps out of the pool. The lock lives exactly as long as that
//! connection: a replica that dies (even `kill -9`) loses its connection, the server
//! drops the lock, and the next replica to try takes it over. SQLite: a database file
//! belongs to one process, so that process always leads.

use sqlx::{Connection, Row};

use crate::{Backend, Db, Result};

/// Proof of leadership under one name. Dropping it gives leadership up.
#[derive(Debug)]
pub struct Leadership {
    conn: Option<sqlx::AnyConnection>,
    key: i64,
}

impl Db {
    /// Try to become the one leader for `name` (e.g. "reconciler"); `None` when another
    /// control plane holds it now. Cheap enough to retry every few seconds.
    pub async fn try_lead(&self, name: &str) -> Result<Option<Leadership>> {
        let key = lock_key(name);
        match self.backend {
            Backend::Sqlite => Ok(Some(Leadership { conn: None, key })),
            Backend::Postgres => {
                let mut conn = self.pool.acquire().await?.detach();
                let got: bool = sqlx::query("SELECT pg_try_advisory_lock($1) AS got")
                    .bind(key)
                    .fetch_one(&mut conn)
                    .await?
                    .try_get("got")?;
                if got {
                    Ok(Some(Leadership {
                        conn: Some(conn),
                        key,
                    }))
                } else {
                    let _ = conn.close().await;
                    Ok(None)
                }
            }
        }
    }
}

impl Leadership {
    /// Whether this process still leads: the connection that holds the lock still
    /// answers. A leader whose connection broke has lost the lock (the server dropped
    /// it with the session) and must stop its work and try again.
    pub async fn still_leads(&mut self) -> bool {
        match &mut self.conn {
            None => true,
            Some(conn) => conn.ping().await.is_ok(),
        }
    }

    /// Give leadership up now (otherwise it ends when this value is dropped, with the
    /// connection).
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1) AS released")
                .bind(self.key)
                .fetch_one(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}

/// A stable 63-bit lock key for a leadership name (FNV-1a; the same on every replica
/// and every build, which `std`'s hasher does not promise).
fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"hearth:".iter().chain(name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}

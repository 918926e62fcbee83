//! Server-side secrets made once per deployment and shared by every control plane
//! on this database (e.g. the key behind sandboxes' envd access tokens).

use crate::{now_ms, Db, Result};

impl Db {
    /// The secret `name`; `make` is called to create it when there is none yet. Two
    /// control planes racing to create it end with the same value (the first insert
    /// wins, both read it back).
    pub async fn get_or_create_secret(
        &self,
        name: &str,
        make: impl FnOnce() -> Vec<u8>,
    ) -> Result<Vec<u8>> {
        sqlx::query(
            "INSERT INTO secrets (name, value, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(make())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let value: Vec<u8> = sqlx::query_scalar("SELECT value FROM secrets WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(value)
    }
}

//! hearth's store: the only crate that writes SQL.
//!
//! [`Db`] owns a connection pool and one method per query. Callers get typed rows
//! (typed IDs from `hearth_types`, [`SandboxState`], `chrono` times) and never see SQL
//! or column names. Migrations live in `migrations/<backend>/` and run on connect.
//!
//! Portability: statements use `$N` placeholders and plain SQL that SQLite and
//! PostgreSQL both accept; times are stored as Unix milliseconds (`BIGINT`). The
//! PostgreSQL backend (a later issue) adds `migrations/postgres/` and a second pool
//! variant behind the same methods.
//!
//! This crate does not decide policy (who may see what beyond team scoping): the
//! control plane does. Which state changes are legal is `hearth_types::SandboxState`'s
//! one table; every state change written here passes it and is a compare-and-set on
//! the row's current state ([`Db::transition_sandbox`]).

mod audit;
mod error;
mod hosts;
mod keys;
mod models;
mod quotas;
mod sandboxes;
mod secrets;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::SqlitePool;

pub use error::DbError;
pub use hearth_types::UnknownState;
pub use keys::{KEY_PREFIX, LAST_USED_GRANULARITY_MS, VISIBLE_PREFIX_LEN};
pub use models::{
    ApiKey, AuditEntry, Host, HostLoad, HostStatus, NewApiKey, NewSandbox, NewTemplate, OnTimeout,
    Principal, SandboxRow, SandboxState, Team, Template, TemplateLocation, UnknownOnTimeout,
};
pub use quotas::{Admission, ResumeAdmission};
pub use sandboxes::{PageCursor, SandboxPage, STORED as STORED_STATES};

pub type Result<T, E = DbError> = std::result::Result<T, E>;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A handle to the database. Cheap to clone (it wraps a pool).
#[derive(Clone, Debug)]
pub struct Db {
    pool: SqlitePool,
}

impl Db {
    /// Connect to `url` (`sqlite://path?mode=rwc` or `sqlite::memory:`), turn on WAL and
    /// foreign keys, and apply pending migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        if !url.starts_with("sqlite:") {
            return Err(DbError::UnsupportedUrl { url: redact(url) });
        }
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|source| DbError::Connect {
                url: redact(url),
                source,
            })?
            .foreign_keys(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool = if in_memory {
            // Every connection to `:memory:` is its own database: keep exactly one.
            SqlitePoolOptions::new()
                .max_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(8)
        }
        .connect_with(opts)
        .await
        .map_err(|source| DbError::Connect {
            url: redact(url),
            source,
        })?;
        SQLITE_MIGRATIONS.run(&pool).await?;
        Ok(Self { pool })
    }

    /// A fresh private in-memory database with migrations applied (tests).
    pub async fn connect_in_memory() -> Result<Self> {
        Self::connect("sqlite::memory:").await
    }

    /// Close the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Drop credentials from a URL before it goes into an error message.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests;

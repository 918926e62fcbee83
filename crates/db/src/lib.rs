//! hearth's store: the only crate that writes SQL.
//!
//! [`Db`] owns a connection pool and one method per query. Callers get typed rows
//! (typed IDs from `hearth_types`, [`SandboxState`], `chrono` times) and never see SQL
//! or column names. Migrations live in `migrations/<backend>/` and run on connect.
//!
//! Backends: SQLite (`sqlite:` URLs, the embedded default) and PostgreSQL
//! (`postgres://` / `postgresql://`, for several control planes on one database),
//! through sqlx's `Any` driver so that every method has one body. Statements use `$N`
//! placeholders and plain SQL both accept; times are Unix milliseconds (`BIGINT`).
//! What differs is small and kept here: the migrations (`migrations/sqlite/`,
//! `migrations/postgres/`, the same schema step for step), how a write transaction
//! takes the lock that makes quota checks atomic ([`Db::begin_serialized`]), and
//! leadership for background work ([`Db::try_lead`]: a PostgreSQL advisory lock held
//! by one connection; with SQLite, one process owns the file and always leads).
//! Boolean columns are read through `CAST(x AS INTEGER)`: SQLite reports a column
//! declared `BOOLEAN` as a type the `Any` driver refuses.
//!
//! This crate does not decide policy (who may see what beyond team scoping): the
//! control plane does. Which state changes are legal is `hearth_types::SandboxState`'s
//! one table; every state change written here passes it and is a compare-and-set on
//! the row's current state ([`Db::transition_sandbox`]).

mod audit;
mod error;
mod hosts;
mod keys;
mod leader;
mod models;
mod quotas;
mod sandboxes;
mod secrets;
mod templates;
pub mod testing;
mod users;
mod webhooks;

use std::str::FromStr;
use std::sync::Once;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use error::DbError;
pub use hearth_types::UnknownState;
pub use keys::{KEY_PREFIX, LAST_USED_GRANULARITY_MS, VISIBLE_PREFIX_LEN};
pub use leader::Leadership;
pub use models::{
    ApiKey, AuditEntry, Host, HostLoad, HostStatus, NewApiKey, NewSandbox, NewTemplate, OnTimeout,
    Principal, SandboxRow, SandboxState, Team, Template, TemplateLocation, UnknownOnTimeout,
};
pub use quotas::{Admission, ResumeAdmission};
pub use sandboxes::{PageCursor, SandboxPage, STORED as STORED_STATES};
pub use users::{Login, NewUser, Session, User};
pub use webhooks::Webhook;

pub type Result<T, E = DbError> = std::result::Result<T, E>;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database engine a [`Db`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a URL names, if hearth supports it.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// A handle to the database. Cheap to clone (it wraps a pool).
#[derive(Clone, Debug)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// Keys of the PostgreSQL advisory locks of [`Db::begin_locked`]: quota-checked writes
/// (what `BEGIN IMMEDIATE` is on SQLite; the constant reads "hearth"), audit appends and
/// writes of the templates catalogue.
pub(crate) const SERIALIZE_LOCK: i64 = 0x6865_6172_7468;
pub(crate) const AUDIT_LOCK: i64 = SERIALIZE_LOCK + 1;
/// Writes of the templates catalogue (a template and which hosts hold it).
pub(crate) const TEMPLATES_LOCK: i64 = SERIALIZE_LOCK + 2;

impl Db {
    /// Connect to `url` (`sqlite://path?mode=rwc`, `sqlite::memory:`, or
    /// `postgres://user:pass@host:port/db`; a Unix socket with `?host=/run/postgresql`)
    /// and apply pending migrations. SQLite gets WAL, foreign keys and a 5 s busy timeout.
    pub async fn connect(url: &str) -> Result<Self> {
        let Some(backend) = Backend::of_url(url) else {
            return Err(DbError::UnsupportedUrl { url: redact(url) });
        };
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let connect_err = |source| DbError::Connect {
            url: redact(url),
            source,
        };
        let opts = AnyConnectOptions::from_str(url).map_err(connect_err)?;
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let pool_opts = match backend {
            // Every connection to `:memory:` is its own database: keep exactly one.
            Backend::Sqlite if in_memory => AnyPoolOptions::new()
                .max_connections(1)
                .idle_timeout(None)
                .max_lifetime(None),
            Backend::Sqlite => AnyPoolOptions::new().max_connections(8),
            Backend::Postgres => AnyPoolOptions::new().max_connections(16),
        };
        let pool_opts = match backend {
            Backend::Sqlite => pool_opts.after_connect(move |conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    if !in_memory {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                    }
                    Ok(())
                })
            }),
            Backend::Postgres => pool_opts,
        };
        let pool = pool_opts.connect_with(opts).await.map_err(connect_err)?;
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&pool).await?,
        }
        Ok(Self { pool, backend })
    }

    /// A fresh private in-memory database with migrations applied (tests).
    pub async fn connect_in_memory() -> Result<Self> {
        Self::connect("sqlite::memory:").await
    }

    /// Which engine this handle talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Close the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A transaction that holds the database-wide write lock from its first statement,
    /// so a read-check-write inside it (quotas, ordered audit IDs) is atomic against
    /// every other such transaction, on every control plane: `BEGIN IMMEDIATE` on
    /// SQLite, a transaction-scoped advisory lock on PostgreSQL.
    pub(crate) async fn begin_serialized(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        self.begin_locked(SERIALIZE_LOCK).await
    }

    /// A write transaction that holds lock `key` (one of the `*_LOCK` constants) until
    /// it ends. SQLite has one lock for the whole file: every key takes it.
    pub(crate) async fn begin_locked(
        &self,
        key: i64,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        match self.backend {
            Backend::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                // The function returns `void`, which the `Any` driver cannot carry.
                sqlx::query("SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock($1)) AS l")
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }
}

/// A stored boolean (an `INTEGER` 0/1 after `CAST(col AS INTEGER)` in the select list).
pub(crate) fn flag(r: &sqlx::any::AnyRow, column: &str) -> Result<bool> {
    use sqlx::Row;
    Ok(r.try_get::<i64, _>(column)? != 0)
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

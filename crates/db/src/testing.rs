//! Databases for tests: a private SQLite in memory, or a scratch PostgreSQL database
//! on the test cluster that `scripts/test-postgres.sh` starts (its admin URL in
//! [`POSTGRES_URL_ENV`]). Test suites written once run on either: `HEARTH_TEST_DATABASE
//! =postgres` ([`DATABASE_ENV`]) makes [`test_db`] hand out PostgreSQL ones, which is
//! how `scripts/test.sh` runs the API suite a second time.

use sqlx::{Connection, Executor};

use crate::{Backend, Db};

/// Admin URL of the test PostgreSQL cluster, e.g. `postgres://postgres@127.0.0.1:55432/postgres`.
pub const POSTGRES_URL_ENV: &str = "HEARTH_TEST_POSTGRES_URL";
/// Which backend [`test_db`] uses: `sqlite` (default) or `postgres`.
pub const DATABASE_ENV: &str = "HEARTH_TEST_DATABASE";

/// The backend chosen by [`DATABASE_ENV`].
pub fn chosen_backend() -> Backend {
    match std::env::var(DATABASE_ENV).as_deref() {
        Ok("postgres") => Backend::Postgres,
        Ok("sqlite") | Ok("") | Err(_) => Backend::Sqlite,
        Ok(other) => panic!("{DATABASE_ENV}={other:?}: use sqlite or postgres"),
    }
}

/// A fresh, empty, migrated database of the chosen backend.
pub async fn test_db() -> Db {
    match chosen_backend() {
        Backend::Sqlite => Db::connect_in_memory().await.expect("in-memory SQLite"),
        Backend::Postgres => {
            scratch_postgres()
                .await
                .expect("HEARTH_TEST_DATABASE=postgres needs HEARTH_TEST_POSTGRES_URL")
                .0
        }
    }
}

/// A URL for a fresh database of the chosen backend, for tests that start a server
/// process on it (SQLite: a file under `dir`).
pub async fn test_db_url(dir: &std::path::Path) -> String {
    match chosen_backend() {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("hearth.db").display()),
        Backend::Postgres => scratch_postgres_url()
            .await
            .expect("HEARTH_TEST_DATABASE=postgres needs HEARTH_TEST_POSTGRES_URL"),
    }
}

/// A new empty database on the test cluster, migrated, and its URL; `None` when no
/// cluster is configured. Where the tests must run for real (`CI` or
/// `HEARTH_REQUIRE_E2E` set), a missing cluster is a failure, not a skip.
pub async fn scratch_postgres() -> Option<(Db, String)> {
    let url = scratch_postgres_url().await?;
    let db = Db::connect(&url)
        .await
        .expect("connect to the scratch database");
    Some((db, url))
}

/// [`scratch_postgres`] without connecting: the URL of a new empty database.
pub async fn scratch_postgres_url() -> Option<String> {
    let Ok(admin) = std::env::var(POSTGRES_URL_ENV) else {
        let required = ["CI", "HEARTH_REQUIRE_E2E"]
            .iter()
            .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty() && s != "0"));
        assert!(
            !required,
            "{POSTGRES_URL_ENV} is not set: scripts/test.sh starts a test PostgreSQL \
             (scripts/test-postgres.sh) and sets it"
        );
        eprintln!("skipping PostgreSQL: {POSTGRES_URL_ENV} is not set");
        return None;
    };
    let name = format!("hearth_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("connect to the test PostgreSQL at {admin}: {e}"));
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("CREATE DATABASE");
    let _ = conn.close().await;
    Some(with_database(&admin, &name))
}

/// `url` with its database name replaced by `name` (query kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_name_is_replaced_and_the_query_kept() {
        use super::with_database;
        assert_eq!(
            with_database("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/postgres?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}

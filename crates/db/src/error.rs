use hearth_types::IdError;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL {url:?}: use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl { url: String },
    #[error("cannot open database {url:?}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    /// A row holds a value the code cannot read back (corruption or a bad migration).
    #[error("corrupt value in column {column}")]
    Corrupt {
        column: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// A state change the state table forbids (a bug in the caller).
    #[error("refused state change")]
    BadTransition(#[from] hearth_types::BadTransition),
    /// Only pending, starting, running, paused, stopped and error are stored.
    #[error("state {state} is never stored")]
    NotStored { state: hearth_types::SandboxState },
}

impl DbError {
    pub(crate) fn corrupt(column: &'static str) -> impl FnOnce(IdError) -> DbError {
        move |e| DbError::Corrupt {
            column,
            source: Box::new(e),
        }
    }
}

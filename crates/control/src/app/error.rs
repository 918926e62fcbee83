//! The application layer's error: what went wrong, in terms a caller can act on.
//! Mapped to an HTTP status and `{"error":{"code","message"}}` by `http::error` only.

use hearth_db::DbError;

use super::hosts::HostError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed or out of bounds; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("missing, unknown, expired or revoked API key")]
    Unauthenticated,
    /// A sign-in with an email and password that do not match an active user.
    #[error("wrong email or password")]
    BadCredentials,
    /// Too many tries of something that is throttled (sign-ins); the message says when
    /// to try again.
    #[error("{0}")]
    RateLimited(String),
    /// The caller is known but may not do this (not an admin); the message says why.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// The team would pass one of its quotas; the message names it and its value.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The host cannot hold the sandbox (memory, vCPUs, disk, slots); the message is
    /// the host agent's and names the limit.
    #[error("{0}")]
    CapacityExceeded(String),
    /// The host agent (or the guest agent behind it) refused or failed.
    #[error("{context}: {source}")]
    Host {
        context: String,
        #[source]
        source: HostError,
    },
    #[error("database error")]
    Db(#[from] DbError),
    #[error("{0}")]
    Internal(String),
}

impl AppError {
    /// The variant's name, for metrics and logs (a bounded set; never a message).
    pub fn kind(&self) -> &'static str {
        match self {
            AppError::InvalidArgument(_) => "invalid_argument",
            AppError::Unauthenticated => "unauthenticated",
            AppError::BadCredentials => "bad_credentials",
            AppError::RateLimited(_) => "rate_limited",
            AppError::Forbidden(_) => "forbidden",
            AppError::NotFound(_) => "not_found",
            AppError::Conflict(_) => "conflict",
            AppError::PayloadTooLarge(_) => "payload_too_large",
            AppError::Unavailable(_) => "unavailable",
            AppError::QuotaExceeded(_) => "quota_exceeded",
            AppError::CapacityExceeded(_) => "capacity_exceeded",
            AppError::Host { .. } => "host",
            AppError::Db(_) => "database",
            AppError::Internal(_) => "internal",
        }
    }

    pub fn host(context: impl Into<String>) -> impl FnOnce(HostError) -> AppError {
        let context = context.into();
        move |source| AppError::Host { context, source }
    }
}

pub type AppResult<T> = Result<T, AppError>;

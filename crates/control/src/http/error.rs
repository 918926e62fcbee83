//! The edge: [`AppError`] -> HTTP status and `{"error":{"code","message"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use connectrpc::ErrorCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::hosts::HostError;
use crate::app::AppError;

/// The error body of every failed request.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// invalid_argument | unauthenticated | forbidden | not_found | method_not_allowed | conflict |
    /// payload_too_large | uri_too_long | unsupported_media_type | quota_exceeded |
    /// capacity_exceeded | rate_limited | headers_too_large | unavailable | internal
    /// (see docs/contracts.md)
    pub code: &'static str,
    pub message: String,
}

/// An error on its way out as a response.
#[derive(Debug)]
pub struct ApiError(pub AppError);

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        ApiError(e)
    }
}

impl From<hearth_db::DbError> for ApiError {
    fn from(e: hearth_db::DbError) -> Self {
        ApiError(AppError::Db(e))
    }
}

fn host_status(e: &HostError) -> (StatusCode, &'static str) {
    match e {
        HostError::Rpc { code, .. } => match code {
            ErrorCode::InvalidArgument | ErrorCode::OutOfRange => {
                (StatusCode::BAD_REQUEST, "invalid_argument")
            }
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorCode::AlreadyExists | ErrorCode::FailedPrecondition | ErrorCode::Aborted => {
                (StatusCode::CONFLICT, "conflict")
            }
            ErrorCode::ResourceExhausted | ErrorCode::Unavailable | ErrorCode::DeadlineExceeded => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ErrorCode::PermissionDenied | ErrorCode::Unauthenticated => {
                (StatusCode::BAD_REQUEST, "invalid_argument")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        },
        HostError::Http { status, .. } => match status {
            400 | 401 | 403 => (StatusCode::BAD_REQUEST, "invalid_argument"),
            404 => (StatusCode::NOT_FOUND, "not_found"),
            409 => (StatusCode::CONFLICT, "conflict"),
            413 | 507 => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            502..=504 => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        },
        HostError::Transport(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    }
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match &self.0 {
            AppError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
            AppError::Unauthenticated | AppError::BadCredentials => {
                (StatusCode::UNAUTHORIZED, "unauthenticated")
            }
            AppError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            AppError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            AppError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AppError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            AppError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            AppError::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            AppError::CapacityExceeded(_) => (StatusCode::CONFLICT, "capacity_exceeded"),
            AppError::Host { source, .. } => host_status(source),
            AppError::Db(_) | AppError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (_, code) = self.status_and_code();
        let message = match &self.0 {
            // Do not leak SQL details; the log has them.
            AppError::Db(_) => "internal database error".to_owned(),
            AppError::Host { context, source } => {
                let detail = match source {
                    HostError::Rpc { message, .. } | HostError::Http { message, .. } => message,
                    HostError::Transport(m) => m,
                };
                format!("{context}: {detail}")
            }
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail { code, message },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self.0, source = ?std::error::Error::source(&self.0), "request failed");
        }
        (status, Json(self.body())).into_response()
    }
}

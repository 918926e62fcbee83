//! The access token (envd's `X-Access-Token`): set by the first `POST /init`, required on
//! every other request except `GET /health`.
//!
//! The token lives only in the agent's memory: it is never put into a process's
//! environment, a file, `/envs` or a log line.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::state::AgentState;

/// Header carrying the token, as envd names it.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the guest agent is not initialised (POST /init first)")]
    NotInitialised,
    #[error("missing X-Access-Token header")]
    Missing,
    #[error("wrong access token")]
    Wrong,
    #[error("the first POST /init must carry a non-empty accessToken")]
    TokenRequired,
}

impl AuthError {
    /// HTTP status of the refusal.
    pub fn status(self) -> StatusCode {
        match self {
            AuthError::TokenRequired => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNAUTHORIZED,
        }
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        let y = b.get(i % b.len().max(1)).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// Checks the request's token against `expected` (`None`: not initialised yet).
pub fn check(expected: Option<&str>, headers: &HeaderMap) -> Result<(), AuthError> {
    let Some(expected) = expected else {
        return Err(AuthError::NotInitialised);
    };
    let Some(given) = headers.get(ACCESS_TOKEN_HEADER) else {
        return Err(AuthError::Missing);
    };
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(AuthError::Wrong)
    }
}

/// Whether a request goes to one of the Connect services (which answer errors in
/// Connect's shape) rather than to envd's plain HTTP endpoints.
fn is_connect(path: &str) -> bool {
    path.starts_with("/process.Process/") || path.starts_with("/filesystem.Filesystem/")
}

/// Applies the token part of `POST /init` atomically: the first init must bring a token;
/// later ones must carry the current token in the header and may bring a new one.
pub fn accept_init(
    state: &AgentState,
    headers: &HeaderMap,
    new_token: Option<String>,
) -> Result<(), AuthError> {
    let new_token = new_token.filter(|t| !t.is_empty());
    state.with_access_token(|current| {
        if current.is_some() {
            check(current.as_deref(), headers)?;
        } else if new_token.is_none() {
            return Err(AuthError::TokenRequired);
        }
        if let Some(t) = new_token {
            *current = Some(t);
        }
        Ok(())
    })
}

/// The 401 answer: a Connect `unauthenticated` error for Connect calls, envd's
/// `{"code","message"}` otherwise.
pub fn refusal(path: &str, err: AuthError) -> Response {
    let body = if is_connect(path) {
        serde_json::json!({"code": "unauthenticated", "message": err.to_string()})
    } else {
        serde_json::json!({"code": err.status().as_u16(), "message": err.to_string()})
    };
    (err.status(), Json(body)).into_response()
}

/// Middleware in front of everything: lets `GET /health` and `POST /init` through (the
/// init handler checks the token itself), refuses the rest without the token.
pub async fn require_token(
    State(state): State<AgentState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let open = (path == "/health" && request.method() == Method::GET)
        || (path == "/init" && request.method() == Method::POST);
    if !open {
        let expected = state.access_token();
        if let Err(e) = check(expected.as_deref(), request.headers()) {
            return refusal(path, e);
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_matches_only_equal_strings() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }
}

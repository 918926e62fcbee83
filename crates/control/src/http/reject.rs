//! Errors that happen before or around a handler: malformed JSON, wrong content type,
//! bad query strings and path segments, unknown methods, over-long URIs and header
//! blocks. All leave as `{"error":{"code","message"}}`, like the handlers' own errors.
//!
//! [`ApiJson`] is the JSON body extractor of every handler; [`json_errors`] is the
//! outermost middleware that checks request size limits and turns any error response
//! that is not JSON yet (axum's rejections are plain text, its 405 is empty) into the
//! error shape, keeping the status.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use super::error::{ErrorBody, ErrorDetail};
use super::MAX_JSON_BODY;

/// Longest request target (path and query) accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest header block accepted (names, values and separators).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Longest rejection text kept as the message of a reshaped error.
const MAX_MESSAGE_BYTES: usize = 1024;

/// The error code that goes with a status when nothing more specific is known.
pub fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_argument",
        401 => "unauthenticated",
        403 => "permission_denied",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        426 => "upgrade_required",
        429 => "too_many_requests",
        431 => "headers_too_large",
        503 => "unavailable",
        _ if status.is_client_error() => "invalid_argument",
        _ => "internal",
    }
}

/// A JSON error response.
pub fn error_response(status: StatusCode, code: &'static str, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: ErrorDetail { code, message },
        }),
    )
        .into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Outermost middleware: size limits of the request line and headers, then the JSON
/// shape for every error response.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > MAX_URI_BYTES {
        return error_response(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("request target is longer than {MAX_URI_BYTES} bytes"),
        );
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("request headers are larger than {MAX_HEADER_BYTES} bytes"),
        );
    }
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // Rejection texts are short; a longer body is cut, not an error of its own.
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    if message.is_empty() {
        message = match status {
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this endpoint".to_string(),
            s => s.canonical_reason().unwrap_or("error").to_lowercase(),
        };
    }
    let mut out = error_response(status, code_for(status), message);
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// A JSON request body. The content type must be JSON (`application/json` or
/// `application/*+json`) or absent; anything else is 415 with a hint, so that
/// `curl -d` without `-H 'content-type: application/json'` is told what to add.
/// Bodies over [`MAX_JSON_BODY`] are 413; malformed ones 400 with serde's message.
pub struct ApiJson<T>(pub T);

/// Like [`ApiJson`], but an empty body (no bytes, or only whitespace) is
/// `T::default()`: for endpoints whose body is optional.
pub struct ApiJsonOrEmpty<T>(pub T);

impl<S, T> FromRequest<S> for ApiJsonOrEmpty<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let empty = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
        if empty {
            return Ok(ApiJsonOrEmpty(T::default()));
        }
        let headers = req.headers().clone();
        let bytes = read_body(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJsonOrEmpty(T::default()));
        }
        if headers.get(header::CONTENT_TYPE).is_some() && !is_json(&headers) {
            return Err(error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "request body must be JSON: send content-type: application/json".into(),
            ));
        }
        parse_object(&bytes)
            .map(ApiJsonOrEmpty)
            .map_err(invalid_json)
    }
}

/// A request body: a JSON object of `T`'s fields. Anything else is a 400, also what
/// serde would take for a struct otherwise (an array of its fields in order: `[]`
/// would be every default).
fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err("request body must be a JSON object".into());
    }
    Json::<T>::from_bytes(bytes)
        .map(|Json(v)| v)
        .map_err(|rej| rej.body_text())
}

/// The 400 of a body [`parse_object`] refused.
fn invalid_json(message: String) -> Response {
    error_response(StatusCode::BAD_REQUEST, "invalid_argument", message)
}

/// The whole request body, within [`MAX_JSON_BODY`].
async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, Response> {
    Bytes::from_request(req, state).await.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body is larger than {MAX_JSON_BODY} bytes"),
            )
        } else {
            error_response(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("reading the request body failed: {}", rej.body_text()),
            )
        }
    })
}

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            if !is_json(req.headers()) {
                let shown = String::from_utf8_lossy(ct.as_bytes())
                    .chars()
                    .take(100)
                    .collect::<String>();
                return Err(error_response(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!(
                        "request body must be JSON: send content-type: application/json (got {shown:?})"
                    ),
                ));
            }
        }
        let bytes = read_body(req, state).await?;
        parse_object(&bytes).map(ApiJson).map_err(invalid_json)
    }
}

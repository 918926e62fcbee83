//! `GET /sandboxes/{id}/console?limit=N`: the last lines of a sandbox's serial
//! console (kernel and guest agent output), what the control plane serves as the
//! sandbox's logs. Reads only the end of the capped console log
//! ([`crate::vmm::console::read_tail`]); every line is guest text, escaped and cut.
//! Console lines carry no time of their own: each gets the time of the console
//! log's last write.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use hearth_types::SandboxId;
use http::StatusCode;
use serde::Deserialize;

use crate::sandbox::escape_guest_text;
use crate::vmm::console;
use crate::Ctx;

/// Lines returned when the caller names no limit.
pub const DEFAULT_LINES: usize = 100;
/// Most lines one call returns.
pub const MAX_LINES: usize = 1000;
/// Bytes of the console's end read at most.
const TAIL_BYTES: usize = 256 * 1024;
/// Longest line kept (escaped), the rest cut.
const MAX_LINE: usize = 2000;

#[derive(Debug, Deserialize)]
pub(crate) struct ConsoleQuery {
    limit: Option<usize>,
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

pub(crate) async fn handle(
    State(ctx): State<Arc<Ctx>>,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(DEFAULT_LINES);
    if limit == 0 || limit > MAX_LINES {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("limit must be 1 to {MAX_LINES}"),
        );
    }
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("sandbox {id} is not on this host"),
        )
    };
    let Ok(sid) = id.parse::<SandboxId>() else {
        return not_found();
    };
    let Some(handle) = ctx.registry.get(&sid) else {
        return not_found();
    };
    let run_dir = handle.record.borrow().run_dir.clone();
    let (text, written) = tokio::task::spawn_blocking(move || {
        let text = console::read_tail_raw(&run_dir, TAIL_BYTES);
        let written = std::fs::metadata(run_dir.join(console::CONSOLE_LOG))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        (text, written)
    })
    .await
    .unwrap_or_default();
    let lines = lines(&text, limit, written);
    axum::Json(serde_json::json!({ "lines": lines })).into_response()
}

/// The last `limit` non-empty lines of `text`, escaped, each stamped `written`.
fn lines(text: &[u8], limit: usize, written: i64) -> Vec<serde_json::Value> {
    let all: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect();
    all[all.len().saturating_sub(limit)..]
        .iter()
        .map(|l| {
            serde_json::json!({
                "timestamp_ms": written,
                "line": escape_guest_text(&String::from_utf8_lossy(l), MAX_LINE),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_the_last_ones_escaped_and_cut() {
        let text = b"one\r\n\ntwo \x1b[31mred\nthree\n";
        let l = lines(text, 2, 7);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0]["line"], "two \\x1b[31mred");
        assert_eq!(l[1]["line"], "three");
        assert_eq!(l[1]["timestamp_ms"], 7);
        let long = vec![b'a'; 10_000];
        let l = lines(&long, 5, 0);
        assert!(l[0]["line"].as_str().unwrap().len() <= MAX_LINE + 3);
    }
}

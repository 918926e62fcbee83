//! Moving files in and out of a sandbox through the host agent's envd proxy. Bodies
//! are streamed both ways; nothing holds a whole file in memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use hearth_types::{SandboxId, TeamId};

use super::hosts::{ByteStream, HostError};
use super::sandboxes::guest_error;
use super::{validate, App, AppError, AppResult};

impl App {
    /// Stream `body` into `path`. `declared_len` is the request's Content-Length, if any.
    /// Returns the number of bytes written.
    pub async fn upload_file<S, E>(
        &self,
        team: TeamId,
        id: &SandboxId,
        path: &str,
        user: &str,
        declared_len: Option<u64>,
        body: S,
    ) -> AppResult<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        validate::guest_path("path", path)?;
        validate::user(user)?;
        let limit = self.max_upload_bytes;
        let too_large =
            || AppError::PayloadTooLarge(format!("file is larger than the limit of {limit} bytes"));
        if declared_len.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let _permit = self.permit(team, super::concurrency::Kind::Transfer)?;
        let host = self.running_host(team, id).await?;
        let count = Arc::new(AtomicU64::new(0));
        let over = Arc::new(AtomicBool::new(false));
        let (c, o) = (count.clone(), over.clone());
        let stream: ByteStream = body
            .map(move |chunk| {
                let chunk =
                    chunk.map_err(|e| HostError::Transport(format!("request body: {e}")))?;
                let total = c.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
                if total > limit {
                    o.store(true, Ordering::Relaxed);
                    return Err(HostError::Transport("upload limit exceeded".into()));
                }
                Ok(chunk)
            })
            .boxed();
        let result = host.upload_file(id, user, path, stream).await;
        if over.load(Ordering::Relaxed) {
            return Err(too_large());
        }
        result.map_err(|e| guest_error(&format!("writing {path} failed"), e))?;
        Ok(count.load(Ordering::Relaxed))
    }

    /// Open `path` for streaming download: its length (when known) and its bytes.
    pub async fn download_file(
        &self,
        team: TeamId,
        id: &SandboxId,
        path: &str,
        user: &str,
    ) -> AppResult<(Option<u64>, ByteStream)> {
        validate::guest_path("path", path)?;
        validate::user(user)?;
        let permit = self.permit(team, super::concurrency::Kind::Transfer)?;
        let host = self.running_host(team, id).await?;
        let (len, body) = host
            .download_file(id, user, path)
            .await
            .map_err(|e| guest_error(&format!("reading {path} failed"), e))?;
        // The body holds the team's transfer slot until it is dropped.
        let body = body
            .inspect(move |_| {
                let _ = &permit;
            })
            .boxed();
        Ok((len, body))
    }
}

//! A small typed client of the public REST API (`/v1`), used by every client command.

use anyhow::{Context, Result};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::Credentials;

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    pub creds: Credentials,
}

/// An error the API returned, with its code and message.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Client {
    pub fn new(creds: Credentials) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()?;
        Ok(Self { http, creds })
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.creds.url, path))
            .bearer_auth(&self.creds.api_key)
    }

    /// Send and turn non-2xx answers into [`ApiError`].
    pub async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach hearth at {} (is `hearth up` running? set HEARTH_URL otherwise)",
                self.creds.url
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(api_error(resp).await.into())
    }

    pub async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let resp = self.send(req).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return serde_json::from_value(Value::Null).context("empty response");
        }
        resp.json::<T>().await.context("decoding the API's answer")
    }

    pub fn ws_url(&self, path: &str) -> String {
        let base = &self.creds.url;
        let ws = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.clone()
        };
        format!("{ws}{path}")
    }
}

pub async fn api_error(resp: Response) -> ApiError {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<Value>(&body) {
        Ok(v) if v.get("error").is_some() => ApiError {
            status,
            code: v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
            message: v["error"]["message"].as_str().unwrap_or("").to_string(),
        },
        _ => ApiError {
            status,
            code: "http".into(),
            message: if body.is_empty() {
                format!("HTTP {status}")
            } else {
                body
            },
        },
    }
}

/// `ID:/path` -> (ID, path); anything else is a local path.
pub fn split_remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    if id.starts_with("sb-") && !id.contains('/') {
        Some((id, path))
    } else {
        None
    }
}

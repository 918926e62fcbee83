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

/// What to do next about an API error, for the codes where the user can act.
pub fn hint(e: &ApiError) -> Option<&'static str> {
    match e.code.as_str() {
        "quota_exceeded" => Some(
            "your team is at its quota: destroy sandboxes you no longer need \
             (`hearth sandbox list`, then `hearth sandbox rm ID`), ask for smaller ones \
             (--vcpus, --memory-mb, --disk-size-mb), or ask an admin for a larger quota",
        ),
        "conflict" if e.message.contains("resume it first") => {
            Some("resume it with `hearth sandbox resume ID`")
        }
        "conflict" if e.message.contains("only a paused sandbox can be resumed") => {
            Some("it is not paused: `hearth sandbox get ID` shows its state")
        }
        "conflict" if e.message.contains("already exists") => Some(
            "pick another --name, or delete the old one with `hearth snapshot rm NAME`",
        ),
        "conflict" if e.message.contains("active sandbox") => Some(
            "destroy the sandboxes made from it first (`hearth sandbox list`, `hearth sandbox rm ID`)",
        ),
        "unavailable" if e.message.contains("retry") => {
            Some("the sandbox is still paused with its state: run `hearth sandbox resume ID` again")
        }
        "capacity_exceeded" => Some(
            "no host can hold this sandbox now: ask for a smaller one \
             (--vcpus, --memory-mb, --disk-size-mb) or retry once other sandboxes end",
        ),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &str) -> ApiError {
        ApiError {
            status: 429,
            code: code.into(),
            message: "team quota: at most 5 concurrent sandboxes".into(),
        }
    }

    #[test]
    fn quota_and_capacity_errors_say_what_to_do() {
        assert!(hint(&err("quota_exceeded"))
            .unwrap()
            .contains("hearth sandbox rm"));
        assert!(hint(&err("capacity_exceeded")).unwrap().contains("smaller"));
        assert!(hint(&err("not_found")).is_none());
        assert_eq!(
            err("quota_exceeded").to_string(),
            "team quota: at most 5 concurrent sandboxes (quota_exceeded, HTTP 429)"
        );
    }
}

//! Agent-wide state shared by the HTTP endpoints and the Connect services: defaults and
//! the access token set by `POST /init`, and the table of running processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::process::ProcessTable;
use crate::users::{self, User, UserError};

/// Defaults applied to every new process and request (set through `POST /init`).
#[derive(Debug, Clone)]
pub struct Defaults {
    pub env: HashMap<String, String>,
    pub user: String,
    pub workdir: Option<PathBuf>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            env: HashMap::new(),
            user: "root".into(),
            workdir: None,
        }
    }
}

/// Shared state; cheap to clone.
#[derive(Clone, Default)]
pub struct AgentState {
    pub defaults: Arc<RwLock<Defaults>>,
    pub processes: ProcessTable,
    /// Kept apart from [`Defaults`], which is copied into every process start.
    access_token: Arc<RwLock<Option<String>>>,
}

impl AgentState {
    pub fn defaults(&self) -> Defaults {
        self.defaults
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The access token, `None` until the first `POST /init`.
    pub fn access_token(&self) -> Option<String> {
        self.access_token
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `f` on the access token under its write lock (check-and-set in one step).
    pub fn with_access_token<T>(&self, f: impl FnOnce(&mut Option<String>) -> T) -> T {
        f(&mut self.access_token.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves the user for a request: explicit name, else the `/init` default.
    pub fn user(&self, name: Option<&str>) -> Result<User, UserError> {
        match name.filter(|n| !n.is_empty()) {
            Some(n) => users::lookup(n),
            None => users::lookup(&self.defaults().user),
        }
    }
}

/// Resolves a request path: absolute paths stay, `~` and relative ones are taken from
/// the user's home directory.
pub fn resolve_path(user: &User, path: &str) -> PathBuf {
    if let Some(rest) = path.strip_prefix("~/") {
        return user.home.join(rest);
    }
    if path == "~" || path.is_empty() {
        return user.home.clone();
    }
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        user.home.join(p)
    }
}

/// The user named in an `Authorization: Basic base64("user:")` header, as E2B SDKs send it.
pub fn user_from_basic_auth(value: Option<&str>) -> Option<String> {
    use base64::Engine as _;
    let v = value?.trim();
    let encoded = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let name = text.split(':').next()?.to_owned();
    (!name.is_empty()).then_some(name)
}

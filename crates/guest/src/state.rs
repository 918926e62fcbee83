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

/// Where a template names the guest's defaults (e.g. `{"default_user": "user"}` in the
/// `python` template, whose commands run as `user` unless a request names another, as
/// E2B's SDKs expect). Read once at boot; `/init` may still change them.
pub const IMAGE_DEFAULTS: &str = "/etc/hearth/guest.json";
/// Largest defaults file read.
const MAX_IMAGE_DEFAULTS: u64 = 4096;

impl Defaults {
    /// The defaults a template's `path` names, over the built-in ones; a missing,
    /// oversized or malformed file, or a user that does not exist, leaves them as
    /// they are (and says why on the console).
    pub fn from_image(path: &Path) -> Defaults {
        let mut d = Defaults::default();
        let Ok(meta) = std::fs::metadata(path) else {
            return d;
        };
        if meta.len() > MAX_IMAGE_DEFAULTS {
            tracing::warn!(path = %path.display(), "image defaults file too large; ignored");
            return d;
        }
        let parsed: Result<serde_json::Value, String> = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(v) => {
                if let Some(u) = v["default_user"].as_str() {
                    match users::lookup(u) {
                        Ok(_) => d.user = u.to_owned(),
                        Err(e) => {
                            tracing::warn!(user = u, error = %e, "image default user ignored")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "image defaults ignored"),
        }
        d
    }
}

/// Shared state; cheap to clone.
#[derive(Clone, Default)]
pub struct AgentState {
    pub defaults: Arc<RwLock<Defaults>>,
    pub processes: ProcessTable,
    /// Directory watches (`filesystem.Filesystem` watch RPCs).
    pub watchers: crate::watch::Watchers,
    /// Kept apart from [`Defaults`], which is copied into every process start.
    access_token: Arc<RwLock<Option<String>>>,
}

impl AgentState {
    /// State whose defaults are `defaults` (e.g. [`Defaults::from_image`]).
    pub fn with_defaults(defaults: Defaults) -> Self {
        Self {
            defaults: Arc::new(RwLock::new(defaults)),
            ..Self::default()
        }
    }

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

#[cfg(test)]
mod image_defaults_tests {
    use super::*;

    #[test]
    fn image_defaults_name_an_existing_user_or_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("guest.json");
        assert_eq!(Defaults::from_image(&p).user, "root", "no file");
        std::fs::write(&p, r#"{"default_user": "root"}"#).unwrap();
        assert_eq!(Defaults::from_image(&p).user, "root");
        // The host's own passwd stands in for the image's here.
        std::fs::write(&p, r#"{"default_user": "nobody"}"#).unwrap();
        assert_eq!(Defaults::from_image(&p).user, "nobody");
        std::fs::write(&p, r#"{"default_user": "no-such-user-here"}"#).unwrap();
        assert_eq!(Defaults::from_image(&p).user, "root", "unknown user");
        std::fs::write(&p, "not json").unwrap();
        assert_eq!(Defaults::from_image(&p).user, "root", "garbage");
        std::fs::write(&p, vec![b' '; 10_000]).unwrap();
        assert_eq!(Defaults::from_image(&p).user, "root", "too large");
    }
}

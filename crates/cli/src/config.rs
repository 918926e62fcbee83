//! Where the CLI finds the control plane and its API key.
//!
//! Order: `--url`/`--api-key` flags, then `HEARTH_URL`/`HEARTH_API_KEY`, then the
//! credentials file that `hearth up` writes on first start
//! (`~/.config/hearth/credentials.json`, mode 0600).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const DEFAULT_URL: &str = "http://127.0.0.1:7420";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub api_key: String,
}

pub fn credentials_path() -> PathBuf {
    if let Ok(p) = std::env::var("HEARTH_CREDENTIALS") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    Path::new(&home).join(".config/hearth/credentials.json")
}

pub fn load_credentials() -> Option<Credentials> {
    let raw = std::fs::read(credentials_path()).ok()?;
    serde_json::from_slice(&raw).ok()
}

/// Write the credentials file with mode 0600 (created that way, never world-readable).
pub fn store_credentials(creds: &Credentials) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = credentials_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(creds)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Resolve the URL and key a client command should use.
pub fn resolve(url: Option<String>, api_key: Option<String>) -> Result<Credentials> {
    let stored = load_credentials();
    let url = url
        .or_else(|| stored.as_ref().map(|c| c.url.clone()))
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let api_key = api_key
        .or_else(|| stored.map(|c| c.api_key))
        .with_context(|| {
            format!(
                "no API key: pass --api-key, set HEARTH_API_KEY, or run `hearth up` on this machine (it writes {})",
                credentials_path().display()
            )
        })?;
    Ok(Credentials {
        url: url.trim_end_matches('/').to_string(),
        api_key,
    })
}

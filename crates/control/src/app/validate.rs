//! Input rules that are not already in `hearth_types`: env and metadata maps, exec
//! commands, users, guest paths. Every error names the offending field.

use std::collections::BTreeMap;

use super::AppError;

pub const MAX_ENV_VARS: usize = 128;
pub const MAX_ENV_KEY: usize = 256;
pub const MAX_ENV_VALUE: usize = 32 * 1024;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY: usize = 64;
pub const MAX_METADATA_VALUE: usize = 1024;
pub const MAX_CMD_ARGS: usize = 1024;
pub const MAX_CMD_BYTES: usize = 128 * 1024;
pub const MAX_PATH_LEN: usize = 4096;
/// Longest name of one path component (Linux NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
pub const MAX_STDIN_BYTES: usize = 1024 * 1024;
pub const DEFAULT_EXEC_TIMEOUT_S: u32 = 60;
pub const MAX_EXEC_TIMEOUT_S: u32 = 3600;

fn bad(msg: impl Into<String>) -> AppError {
    AppError::InvalidArgument(msg.into())
}

/// Environment variables: POSIX-ish names, bounded sizes, no NUL.
pub fn env(field: &str, env: &BTreeMap<String, String>) -> Result<(), AppError> {
    if env.len() > MAX_ENV_VARS {
        return Err(bad(format!(
            "{field} may have at most {MAX_ENV_VARS} entries, got {}",
            env.len()
        )));
    }
    for (k, v) in env {
        let valid_name = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name || k.len() > MAX_ENV_KEY {
            return Err(bad(format!(
                "{field} key {:?} must be 1 to {MAX_ENV_KEY} letters, digits or '_', not starting with a digit",
                truncate(k)
            )));
        }
        if v.len() > MAX_ENV_VALUE {
            return Err(bad(format!(
                "{field} value of {k} is longer than {MAX_ENV_VALUE} bytes"
            )));
        }
        if v.contains('\0') {
            return Err(bad(format!("{field} value of {k} contains a NUL byte")));
        }
    }
    Ok(())
}

/// Free-form metadata: bounded number and sizes.
pub fn metadata(md: &BTreeMap<String, String>) -> Result<(), AppError> {
    if md.len() > MAX_METADATA_ENTRIES {
        return Err(bad(format!(
            "metadata may have at most {MAX_METADATA_ENTRIES} entries, got {}",
            md.len()
        )));
    }
    for (k, v) in md {
        if k.is_empty() || k.len() > MAX_METADATA_KEY {
            return Err(bad(format!(
                "metadata key {:?} must be 1 to {MAX_METADATA_KEY} bytes",
                truncate(k)
            )));
        }
        if v.len() > MAX_METADATA_VALUE {
            return Err(bad(format!(
                "metadata value of {k:?} is longer than {MAX_METADATA_VALUE} bytes"
            )));
        }
    }
    Ok(())
}

/// An exec command: non-empty, bounded, no NUL.
pub fn cmd(cmd: &[String]) -> Result<(), AppError> {
    let Some(first) = cmd.first() else {
        return Err(bad("cmd must not be empty"));
    };
    if first.is_empty() {
        return Err(bad("cmd[0] must not be empty"));
    }
    if cmd.len() > MAX_CMD_ARGS {
        return Err(bad(format!("cmd may have at most {MAX_CMD_ARGS} elements")));
    }
    if cmd.iter().map(String::len).sum::<usize>() > MAX_CMD_BYTES {
        return Err(bad(format!("cmd is longer than {MAX_CMD_BYTES} bytes")));
    }
    if cmd.iter().any(|a| a.contains('\0')) {
        return Err(bad("cmd contains a NUL byte"));
    }
    Ok(())
}

/// A Unix user name in the guest.
pub fn user(user: &str) -> Result<(), AppError> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "user {:?} must be 1 to 32 lowercase letters, digits, '_' or '-'",
            truncate(user)
        )))
    }
}

/// An absolute path in the guest.
pub fn guest_path(field: &str, path: &str) -> Result<(), AppError> {
    if !path.starts_with('/') {
        return Err(bad(format!(
            "{field} must be an absolute path, got {:?}",
            truncate(path)
        )));
    }
    if path.contains('\0') {
        return Err(bad(format!("{field} contains a NUL byte")));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(bad(format!("{field} is longer than {MAX_PATH_LEN} bytes")));
    }
    if let Some(long) = path.split('/').find(|c| c.len() > MAX_NAME_LEN) {
        return Err(bad(format!(
            "{field} has a name longer than {MAX_NAME_LEN} bytes ({} bytes: {:?}…)",
            long.len(),
            truncate(long)
        )));
    }
    Ok(())
}

/// Exec timeout: default 60 s, 1 to 3600; an out-of-range value is quoted as sent.
pub fn exec_timeout(t: Option<i64>) -> Result<u32, AppError> {
    hearth_types::check_range(
        "timeout_s",
        t,
        DEFAULT_EXEC_TIMEOUT_S,
        1,
        MAX_EXEC_TIMEOUT_S,
    )
    .map_err(|e| bad(e.to_string()))
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(cmd(&[]).is_err());
        assert!(cmd(&["".into()]).is_err());
        assert!(cmd(&["a\0".into()]).is_err());
        assert!(cmd(&["ls".into()]).is_ok());
        assert!(guest_path("path", "rel").is_err());
        assert!(guest_path("path", "/a\0b").is_err());
        assert!(guest_path("path", &format!("/{}", "a".repeat(5000))).is_err());
        assert!(guest_path("path", "/tmp/x").is_ok());
        assert!(guest_path("path", &format!("/tmp/{}", "a".repeat(255))).is_ok());
        let e = guest_path("cwd", &format!("/tmp/{}/x", "a".repeat(256)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cwd has a name longer than 255 bytes (256 bytes"),
            "{e}"
        );
        assert!(user("root").is_ok());
        assert!(user("Root").is_err());
        assert!(user("../x").is_err());
        let e = BTreeMap::from([("1A".to_string(), "x".to_string())]);
        assert!(env("env", &e).is_err());
        let e = BTreeMap::from([("A=B".to_string(), "x".to_string())]);
        assert!(env("env", &e).is_err());
        assert_eq!(exec_timeout(None).unwrap(), 60);
        assert!(exec_timeout(Some(0)).is_err());
        assert!(exec_timeout(Some(3601)).is_err());
        let e = exec_timeout(Some(-1)).unwrap_err().to_string();
        assert!(e.ends_with("got -1"), "{e}");
    }
}

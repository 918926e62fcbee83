//! Looks up users and groups in /etc/passwd and /etc/group (no NSS: the guest is static).

use std::path::PathBuf;

/// A local account a request runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: String,
}

/// Failure to resolve a user name.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("unknown user {name:?}")]
    Unknown { name: String },
}

fn passwd_entries() -> Vec<User> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(User {
                name: f[0].to_owned(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: PathBuf::from(f[5]),
                shell: f[6].to_owned(),
            })
        })
        .collect()
}

/// Resolves a user by name; `root` always resolves, even without /etc/passwd.
pub fn lookup(name: &str) -> Result<User, UserError> {
    if let Some(u) = passwd_entries().into_iter().find(|u| u.name == name) {
        return Ok(u);
    }
    if name == "root" {
        return Ok(User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: PathBuf::from("/root"),
            shell: "/bin/sh".into(),
        });
    }
    Err(UserError::Unknown {
        name: name.to_owned(),
    })
}

/// Name of the user with this uid, or the number as text.
pub fn user_name(uid: u32) -> String {
    passwd_entries()
        .into_iter()
        .find(|u| u.uid == uid)
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// Name of the group with this gid, or the number as text.
pub fn group_name(gid: u32) -> String {
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 3 && f[2].parse::<u32>().ok() == Some(gid)).then(|| f[0].to_owned())
        })
        .unwrap_or_else(|| gid.to_string())
}

/// The groups `user` belongs to: its primary group first, then every group of
/// /etc/group that lists it as a member (what `initgroups` would give it).
pub fn groups_of(user: &User) -> Vec<u32> {
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let mut groups = vec![user.gid];
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let (Some(gid), Some(members)) = (f.get(2), f.get(3)) else {
            continue;
        };
        let Ok(gid) = gid.parse::<u32>() else {
            continue;
        };
        if members.split(',').any(|m| m.trim() == user.name) && !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

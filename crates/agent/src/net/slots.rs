//! Host-wide network slot claims: `/run/hearth/slots/<n>` created with O_EXCL.
//!
//! Every agent on the host (and every test running in parallel) claims from the
//! same directory, so two sandboxes never share addresses. A claim file holds the
//! sandbox ID and its run directory; release checks the ID so a slot re-claimed
//! by someone else is never freed by mistake. Claim files are 0600 (root only).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hearth_types::SandboxId;

use super::MAX_SLOT;

/// Default host-wide slot directory.
pub const DEFAULT_SLOTS_DIR: &str = "/run/hearth/slots";

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("all {max} network slots in {dir} are taken")]
    Exhausted { dir: PathBuf, max: u32 },
    #[error("i/o on slot file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who holds a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotOwner {
    pub sandbox_id: String,
    pub run_dir: PathBuf,
}

/// The slot directory.
#[derive(Debug, Clone)]
pub struct Slots {
    dir: PathBuf,
}

impl Slots {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, slot: u32) -> PathBuf {
        self.dir.join(slot.to_string())
    }

    /// Claim the lowest free slot for `id`.
    pub fn claim(&self, id: &SandboxId, run_dir: &Path) -> Result<u32, SlotError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| SlotError::Io {
            path: self.dir.clone(),
            source,
        })?;
        for slot in 1..=MAX_SLOT {
            let path = self.path(slot);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut f) => {
                    let body = format!("{id}\n{}\n", run_dir.display());
                    if let Err(source) = f.write_all(body.as_bytes()) {
                        let _ = std::fs::remove_file(&path);
                        return Err(SlotError::Io { path, source });
                    }
                    return Ok(slot);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(SlotError::Io { path, source }),
            }
        }
        Err(SlotError::Exhausted {
            dir: self.dir.clone(),
            max: MAX_SLOT,
        })
    }

    /// Who holds `slot`, if anyone.
    pub fn owner(&self, slot: u32) -> Option<SlotOwner> {
        let body = std::fs::read_to_string(self.path(slot)).ok()?;
        let mut lines = body.lines();
        Some(SlotOwner {
            sandbox_id: lines.next()?.to_owned(),
            run_dir: PathBuf::from(lines.next().unwrap_or_default()),
        })
    }

    /// Release `slot` if `id` holds it. Returns whether a claim was removed.
    pub fn release(&self, slot: u32, id: &SandboxId) -> Result<bool, SlotError> {
        match self.owner(slot) {
            Some(o) if o.sandbox_id == id.as_str() => {
                let path = self.path(slot);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(source) => Err(SlotError::Io { path, source }),
                }
            }
            _ => Ok(false),
        }
    }

    /// Every claim whose recorded run directory lies under `run_root`.
    pub fn claims_under(&self, run_root: &Path) -> Vec<(u32, SlotOwner)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|slot| Some((slot, self.owner(slot)?)))
            .filter(|(_, o)| o.run_dir.starts_with(run_root))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_and_released_only_by_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::new(dir.path().join("slots"));
        let a = SandboxId::generate();
        let b = SandboxId::generate();
        let sa = slots.claim(&a, Path::new("/r/a")).unwrap();
        let sb = slots.claim(&b, Path::new("/r/b")).unwrap();
        assert_eq!((sa, sb), (1, 2));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(slots.path(sa))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(slots.owner(sa).unwrap().sandbox_id, a.as_str());
        assert!(!slots.release(sa, &b).unwrap());
        assert!(slots.release(sa, &a).unwrap());
        assert!(!slots.release(sa, &a).unwrap());
        // The freed slot is reused first.
        assert_eq!(slots.claim(&a, Path::new("/r/a")).unwrap(), 1);
        let under = slots.claims_under(Path::new("/r"));
        assert_eq!(under.len(), 2);
        assert!(slots.claims_under(Path::new("/other")).is_empty());
    }

    #[test]
    fn parallel_claims_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::new(dir.path());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = slots.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|_| s.claim(&SandboxId::generate(), Path::new("/r")).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u32> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 160);
    }
}

//! The host's template store: `<images>/templates/<name>/`.
//!
//! A template is a directory with `rootfs.ext4` (a raw, sparse ext4 image) and
//! `template.json` ([`TemplateMeta`]). A *warm* template also carries the saved
//! VM: `vmstate` (device state, and memory when [`SavedState::memory_included`]),
//! `memory` (guest memory, mapped private by every sandbox restored from it, so
//! they share its unchanged pages) and the root-only `warm.json` ([`WarmMeta`]:
//! the shape it restores into and the access token its guest holds).
//! Built-in templates come from `scripts/build-images.sh`; the others are made
//! by snapshots and forks (fork points are `hidden` and removed once unused).
//!
//! New templates are built in `.tmp-<name>-<n>` and renamed into place (never
//! over an existing one); deletion renames to `.del-<name>-<n>` first. A crash
//! leaves only such directories, which [`Store::sweep`] removes: a template is
//! either complete or absent.

use std::path::{Path, PathBuf};

use hearth_types::TemplateName;
use serde::{Deserialize, Serialize};

use crate::state::AccessToken;
use crate::vmm::SavedState;

pub const ROOTFS: &str = "rootfs.ext4";
pub const META: &str = "template.json";
pub const WARM_META: &str = "warm.json";
pub const VMSTATE: &str = "vmstate";
pub const MEMORY: &str = "memory";

/// `template.json` (world-readable; the fields `scripts/build-images.sh` writes
/// are a subset).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TemplateMeta {
    pub name: String,
    /// Apparent size of `rootfs.ext4` when written.
    pub size_bytes: u64,
    /// The sandbox it was made from (`None` for built-ins).
    pub source_sandbox_id: Option<String>,
    pub created_at_unix_ms: i64,
    /// A fork point: not listed, removed once no sandbox depends on it.
    pub hidden: bool,
    /// The built-in template this one is the warm variant of ([`warm_variant`]):
    /// not listed; a create from that built-in restores from it.
    pub warm_of: Option<String>,
}

/// The name of built-in template `name`'s warm variant (its booted, idle VM
/// saved with the default shape).
pub fn warm_variant(name: &TemplateName) -> Option<TemplateName> {
    format!("warm-{name}").parse().ok()
}

/// `warm.json` (root-only: it holds the token the saved guest accepts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmMeta {
    pub saved: SavedState,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// The disk size the saved guest knows; a restored sandbox gets exactly it.
    pub disk_size_mb: u32,
    pub access_token: AccessToken,
}

/// A template as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateEntry {
    pub name: TemplateName,
    pub meta: TemplateMeta,
    pub warm: Option<WarmMeta>,
    pub allocated_bytes: u64,
    pub apparent_bytes: u64,
    /// Apparent size of the disk image, MiB (rounded up).
    pub disk_size_mb: u32,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {0} already exists on this host")]
    Exists(TemplateName),
    #[error("template {0} does not exist on this host")]
    NotFound(TemplateName),
    #[error("template {0} is built in and cannot be deleted")]
    BuiltIn(TemplateName),
    #[error("i/o on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed on {path}: {stderr}")]
    Tool {
        program: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("{path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The template directory of a host.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self, name: &TemplateName) -> PathBuf {
        self.dir.join(name.as_str())
    }

    pub fn rootfs(&self, name: &TemplateName) -> PathBuf {
        self.dir(name).join(ROOTFS)
    }

    pub fn exists(&self, name: &TemplateName) -> bool {
        self.rootfs(name).is_file()
    }

    /// The template's metadata; built-ins without a `template.json` get defaults.
    pub fn meta(&self, name: &TemplateName) -> TemplateMeta {
        std::fs::read(self.dir(name).join(META))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The saved VM of a warm template, when it is complete.
    pub fn warm(&self, name: &TemplateName) -> Option<WarmMeta> {
        let dir = self.dir(name);
        let warm: WarmMeta =
            serde_json::from_slice(&std::fs::read(dir.join(WARM_META)).ok()?).ok()?;
        let complete = dir.join(VMSTATE).is_file()
            && (warm.saved.memory_included || dir.join(MEMORY).is_file());
        complete.then_some(warm)
    }

    /// Every complete template (hidden ones with `all`), sorted by name.
    pub fn list(&self, all: bool) -> Vec<TemplateEntry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v: Vec<TemplateEntry> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<TemplateName>().ok())
            .filter(|n| self.exists(n))
            .map(|name| self.entry(name))
            .filter(|e| all || (!e.meta.hidden && e.meta.warm_of.is_none()))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn entry(&self, name: TemplateName) -> TemplateEntry {
        let dir = self.dir(&name);
        let (mut allocated, mut apparent) = (0, 0);
        for f in [ROOTFS, VMSTATE, MEMORY] {
            if let Ok(m) = std::fs::metadata(dir.join(f)) {
                use std::os::unix::fs::MetadataExt;
                allocated += m.blocks() * 512;
                apparent += m.len();
            }
        }
        let disk = std::fs::metadata(dir.join(ROOTFS)).map_or(0, |m| m.len());
        TemplateEntry {
            meta: self.meta(&name),
            warm: self.warm(&name),
            allocated_bytes: allocated,
            apparent_bytes: apparent,
            disk_size_mb: u32::try_from(disk.div_ceil(1 << 20)).unwrap_or(u32::MAX),
            name,
        }
    }

    /// A fresh, private build directory for template `name`.
    pub fn begin(&self, name: &TemplateName) -> Result<PathBuf, TemplateError> {
        if self.dir(name).exists() {
            return Err(TemplateError::Exists(name.clone()));
        }
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self
            .dir
            .join(format!(".tmp-{name}-{}", crate::state::now_unix_ms()));
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        Ok(tmp)
    }

    /// Make the build in `tmp` the template `name`: files and directory synced,
    /// then one rename that never replaces an existing template.
    pub fn commit(&self, tmp: &Path, name: &TemplateName) -> Result<(), TemplateError> {
        use std::os::unix::fs::PermissionsExt;
        for e in std::fs::read_dir(tmp).map_err(io(tmp))? {
            let p = e.map_err(io(tmp))?.path();
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io(&p))?;
        }
        // QEMU opens a disk's backing image by path as the VM's own uid.
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).map_err(io(tmp))?;
        let dest = self.dir(name);
        rename_noreplace(tmp, &dest).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TemplateError::Exists(name.clone())
            } else {
                TemplateError::Io {
                    path: dest.clone(),
                    source: e,
                }
            }
        })?;
        std::fs::File::open(&self.dir)
            .and_then(|f| f.sync_all())
            .map_err(io(&self.dir))
    }

    /// Remove template `name` (the caller checked it is unused). Built-ins (no
    /// `source_sandbox_id`) are refused.
    pub fn delete(&self, name: &TemplateName) -> Result<(), TemplateError> {
        if !self.exists(name) {
            return Err(TemplateError::NotFound(name.clone()));
        }
        let meta = self.meta(name);
        if meta.source_sandbox_id.is_none() && meta.warm_of.is_none() {
            return Err(TemplateError::BuiltIn(name.clone()));
        }
        let dir = self.dir(name);
        let del = self
            .dir
            .join(format!(".del-{name}-{}", crate::state::now_unix_ms()));
        std::fs::rename(&dir, &del).map_err(io(&dir))?;
        std::fs::remove_dir_all(&del).map_err(io(&del))
    }

    /// Remove what crashed builds and deletions left (`.tmp-*`, `.del-*`).
    pub fn sweep(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") || name.starts_with(".del-") {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(dir = %e.path().display(), error = %err, "could not remove a template leftover");
                } else {
                    removed.push(name);
                }
            }
        }
        removed
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Write `value` as JSON to `path` with `mode`.
pub fn write_json(path: &Path, value: &impl Serialize, mode: u32) -> Result<(), TemplateError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| TemplateError::Parse {
        path: path.to_owned(),
        source,
    })?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(&bytes))
        .map_err(io(path))
}

async fn tool(
    program: &'static str,
    args: &[&std::ffi::OsStr],
    path: &Path,
) -> Result<std::process::ExitStatus, TemplateError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(io(path))?;
    if out.status.success() {
        return Ok(out.status);
    }
    Err(TemplateError::Tool {
        program,
        path: path.to_owned(),
        stderr: crate::vmm::escape_guest_text(
            String::from_utf8_lossy(&out.stderr).trim().as_bytes(),
        ),
    })
}

/// Copy `src` to `dest` keeping holes (guest memory is mostly never touched).
pub async fn copy_sparse(src: &Path, dest: &Path) -> Result<(), TemplateError> {
    tool(
        "cp",
        &[
            "--sparse=always".as_ref(),
            "--reflink=auto".as_ref(),
            src.as_os_str(),
            dest.as_os_str(),
        ],
        dest,
    )
    .await
    .map(drop)
}

/// Flatten `disk` (an overlay and its backing chain, or a raw image) into the
/// raw sparse image `dest`. `-U`: the disk's VM (frozen) still holds its lock.
pub async fn flatten(
    disk: &Path,
    format: crate::vmm::DiskFormat,
    dest: &Path,
) -> Result<(), TemplateError> {
    tool(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-U".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.as_str().as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            "-S".as_ref(),
            "4k".as_ref(),
            disk.as_os_str(),
            dest.as_os_str(),
        ],
        dest,
    )
    .await
    .map(drop)
}

/// Check and shrink an ext4 image to its minimum (the guest grows it back to
/// its sandbox's disk size at boot). A snapshot taken without the guest's
/// cooperation is crash-consistent: e2fsck replays its journal first.
pub async fn shrink(image: &Path) -> Result<(), TemplateError> {
    let status = tokio::process::Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(image)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .map_err(io(image))?;
    // 0: clean, 1: errors corrected; anything else means it is not usable.
    if !matches!(status.status.code(), Some(0 | 1)) {
        return Err(TemplateError::Tool {
            program: "e2fsck",
            path: image.to_owned(),
            stderr: crate::vmm::escape_guest_text(
                String::from_utf8_lossy(&status.stderr).trim().as_bytes(),
            ),
        });
    }
    tool("resize2fs", &["-M".as_ref(), image.as_os_str()], image)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TemplateName {
        s.parse().unwrap()
    }

    #[test]
    fn build_commit_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("templates"));
        let n = name("snap-one");
        let tmp = store.begin(&n).unwrap();
        std::fs::write(tmp.join(ROOTFS), vec![0u8; 4096]).unwrap();
        write_json(
            &tmp.join(META),
            &TemplateMeta {
                name: n.to_string(),
                source_sandbox_id: Some("sb-x".into()),
                ..Default::default()
            },
            0o644,
        )
        .unwrap();
        store.commit(&tmp, &n).unwrap();
        assert!(!tmp.exists());
        let list = store.list(false);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, n);
        assert!(list[0].warm.is_none());
        assert_eq!(list[0].apparent_bytes, 4096);
        // Never over an existing one.
        assert!(matches!(store.begin(&n), Err(TemplateError::Exists(_))));
        let tmp2 = store.dir.join(".tmp-snap-one-2");
        std::fs::create_dir(&tmp2).unwrap();
        std::fs::write(tmp2.join(ROOTFS), b"x").unwrap();
        assert!(matches!(
            store.commit(&tmp2, &n),
            Err(TemplateError::Exists(_))
        ));
        assert_eq!(store.sweep(), [".tmp-snap-one-2"]);
        store.delete(&n).unwrap();
        assert!(store.list(true).is_empty());
        assert!(matches!(store.delete(&n), Err(TemplateError::NotFound(_))));
    }

    #[test]
    fn built_ins_are_not_deleted_and_hidden_ones_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().to_owned());
        let b = name("minimal");
        std::fs::create_dir_all(store.dir(&b)).unwrap();
        std::fs::write(store.rootfs(&b), b"r").unwrap();
        std::fs::write(
            store.dir(&b).join(META),
            br#"{"name":"minimal","kernel_release":"6.1","size_bytes":1}"#,
        )
        .unwrap();
        assert!(matches!(store.delete(&b), Err(TemplateError::BuiltIn(_))));
        let h = name("fork-x");
        std::fs::create_dir_all(store.dir(&h)).unwrap();
        std::fs::write(store.rootfs(&h), b"r").unwrap();
        std::fs::write(
            store.dir(&h).join(META),
            br#"{"hidden":true,"source_sandbox_id":"sb-1"}"#,
        )
        .unwrap();
        assert_eq!(store.list(false).len(), 1);
        assert_eq!(store.list(true).len(), 2);
    }
}

//! Per-sandbox copy-on-write root disks.
//!
//! Owns the [`DiskProvisioner`] trait and its `qcow2` (QEMU overlay backed by the
//! template's raw image) and `copy` (reflink where the filesystem has it, else a
//! sparse copy) implementations. Creating a disk never costs time proportional to
//! the image size on the qcow2 path. Base images are never written.
//! (dm-snapshot needs device-mapper, which these hosts lack.)

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vmm::DiskFormat;

/// Which provisioner to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskKind {
    Qcow2,
    Copy,
}

impl std::str::FromStr for DiskKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qcow2" => Ok(DiskKind::Qcow2),
            "copy" => Ok(DiskKind::Copy),
            other => Err(format!("unknown disk kind {other:?} (qcow2, copy)")),
        }
    }
}

/// A provisioned root disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub path: PathBuf,
    pub format: DiskFormat,
}

/// Errors creating or removing disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("base image {path} is unreadable")]
    Base {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not run {program}")]
    Exec {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed for {dest}: {stderr}")]
    Tool {
        program: &'static str,
        dest: PathBuf,
        stderr: String,
    },
    #[error("i/o on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates and removes per-sandbox root disks.
#[async_trait::async_trait]
pub trait DiskProvisioner: Send + Sync + 'static {
    fn kind(&self) -> DiskKind;
    /// Create a disk at `dest` (a path without extension; the provisioner may add
    /// one) backed by `base`, at least `size_mb` large.
    async fn create(&self, base: &Path, dest: &Path, size_mb: u32) -> Result<Disk, DiskError>;
    /// Remove a disk; a missing file is not an error.
    async fn remove(&self, disk: &Path) -> Result<(), DiskError> {
        match tokio::fs::remove_file(disk).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DiskError::Io {
                path: disk.to_owned(),
                source,
            }),
        }
    }
}

/// The provisioner for `kind`.
pub fn provisioner(kind: DiskKind) -> std::sync::Arc<dyn DiskProvisioner> {
    match kind {
        DiskKind::Qcow2 => std::sync::Arc::new(Qcow2Provisioner),
        DiskKind::Copy => std::sync::Arc::new(CopyProvisioner),
    }
}

async fn size_bytes(base: &Path, size_mb: u32) -> Result<u64, DiskError> {
    let meta = tokio::fs::metadata(base)
        .await
        .map_err(|source| DiskError::Base {
            path: base.to_owned(),
            source,
        })?;
    Ok(meta.len().max(u64::from(size_mb) * 1024 * 1024))
}

async fn run(
    program: &'static str,
    args: &[&std::ffi::OsStr],
    dest: &Path,
) -> Result<(), DiskError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| DiskError::Exec { program, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DiskError::Tool {
            program,
            dest: dest.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// `qemu-img create -f qcow2 -F raw -b <base>`: O(1) in the image size.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Provisioner;

#[async_trait::async_trait]
impl DiskProvisioner for Qcow2Provisioner {
    fn kind(&self) -> DiskKind {
        DiskKind::Qcow2
    }

    async fn create(&self, base: &Path, dest: &Path, size_mb: u32) -> Result<Disk, DiskError> {
        let size = size_bytes(base, size_mb).await?;
        let path = dest.with_extension("qcow2");
        let size_arg = size.to_string();
        let res = run(
            "qemu-img",
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                "raw".as_ref(),
                "-b".as_ref(),
                base.as_os_str(),
                path.as_os_str(),
                size_arg.as_ref(),
            ],
            &path,
        )
        .await;
        if let Err(e) = res {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Disk {
            path,
            format: DiskFormat::Qcow2,
        })
    }
}

/// `cp --reflink=auto --sparse=always`, then grown (sparsely) to the requested size.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyProvisioner;

#[async_trait::async_trait]
impl DiskProvisioner for CopyProvisioner {
    fn kind(&self) -> DiskKind {
        DiskKind::Copy
    }

    async fn create(&self, base: &Path, dest: &Path, size_mb: u32) -> Result<Disk, DiskError> {
        let size = size_bytes(base, size_mb).await?;
        let path = dest.with_extension("raw");
        let res = async {
            run(
                "cp",
                &[
                    "--reflink=auto".as_ref(),
                    "--sparse=always".as_ref(),
                    base.as_os_str(),
                    path.as_os_str(),
                ],
                &path,
            )
            .await?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(size).map(|()| f));
            f.map(drop).map_err(|source| DiskError::Io {
                path: path.clone(),
                source,
            })
        }
        .await;
        if let Err(e) = res {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Disk {
            path,
            format: DiskFormat::Raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path, len: u64) -> PathBuf {
        let p = dir.join("base.ext4");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        std::io::Write::write_all(&mut &f, b"hearth-base").unwrap();
        p
    }

    #[tokio::test]
    async fn qcow2_overlay_is_small_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 64 << 20);
        let p = Qcow2Provisioner;
        let d = p.create(&b, &dir.path().join("disk"), 256).await.unwrap();
        assert_eq!(d.format, DiskFormat::Qcow2);
        // An overlay does not copy the base.
        assert!(std::fs::metadata(&d.path).unwrap().len() < 1 << 20);
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(&d.path)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual-size"], 256u64 << 20);
        assert_eq!(v["backing-filename-format"], "raw");
        p.remove(&d.path).await.unwrap();
        assert!(!d.path.exists());
        p.remove(&d.path).await.unwrap();
        // The base is untouched.
        assert_eq!(std::fs::metadata(&b).unwrap().len(), 64 << 20);
    }

    #[tokio::test]
    async fn copy_is_sparse_and_grown() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path(), 8 << 20);
        let p = CopyProvisioner;
        let d = p.create(&b, &dir.path().join("disk"), 64).await.unwrap();
        assert_eq!(d.format, DiskFormat::Raw);
        assert_eq!(std::fs::metadata(&d.path).unwrap().len(), 64 << 20);
        let head = std::fs::read(&d.path).unwrap();
        assert_eq!(&head[..11], b"hearth-base");
        p.remove(&d.path).await.unwrap();
        assert!(!d.path.exists());
    }

    #[tokio::test]
    async fn missing_base_is_a_base_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qcow2Provisioner
            .create(&dir.path().join("nope"), &dir.path().join("disk"), 64)
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::Base { .. }), "{err}");
    }
}

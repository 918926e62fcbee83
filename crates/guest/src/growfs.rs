//! Grows the root ext4 filesystem online to fill its block device.
//!
//! The host hands every sandbox a disk of `disk_size_mb` whose first bytes are the
//! template's small ext4 image; the filesystem inside only becomes that large once
//! PID 1 asks the kernel to grow it (`EXT4_IOC_RESIZE_FS` on the mounted root).
//! This module owns that one step. It never shrinks, never touches another
//! filesystem, and its failure must not stop the boot: the caller logs and goes on.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// Offset of the ext4 superblock on its device.
const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;

/// Why the root filesystem could not be grown.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the size of {device}")]
    DeviceSize {
        device: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read the superblock of {device}")]
    ReadSuperblock {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{device} does not hold an ext4 filesystem")]
    NotExt4 { device: PathBuf },
    #[error("the kernel refused to grow {mount} from {from} to {to} blocks")]
    Resize {
        mount: PathBuf,
        from: u64,
        to: u64,
        #[source]
        source: nix::Error,
    },
}

/// What [`grow`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// The device holds no whole block beyond the filesystem.
    AlreadyFull { blocks: u64, block_size: u64 },
    /// The filesystem now spans `to` blocks (the kernel may leave off a tail too
    /// small for a block group).
    Grown { from: u64, to: u64, block_size: u64 },
}

/// Block count and block size read from an ext4 superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub blocks: u64,
    pub block_size: u64,
}

/// Parses the 1024-byte ext4 superblock; `None` if it is not one.
pub fn parse_superblock(sb: &[u8; 1024]) -> Option<Geometry> {
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16_at(0x38) != EXT4_MAGIC {
        return None;
    }
    let log = u32_at(0x18);
    if log > 6 {
        return None;
    }
    let mut blocks = u64::from(u32_at(0x04));
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    Some(Geometry {
        blocks,
        block_size: 1024 << log,
    })
}

/// Whole filesystem blocks that fit on a device of `device_bytes`.
pub fn device_blocks(device_bytes: u64, block_size: u64) -> u64 {
    device_bytes / block_size.max(1)
}

/// Grows the ext4 filesystem on `device`, mounted read-write at `mount`, to the
/// size of the device. Reads the filesystem's own block count from the superblock
/// (statfs's `f_blocks` leaves out the metadata, so it cannot tell "already full").
pub fn grow(device: &Path, mount: &Path) -> Result<Growth, GrowError> {
    let dev = File::open(device).map_err(|source| GrowError::Open {
        path: device.to_owned(),
        source,
    })?;
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, valid for the call.
    unsafe { blk_get_size64(dev.as_raw_fd(), &mut size) }.map_err(|source| {
        GrowError::DeviceSize {
            device: device.to_owned(),
            source,
        }
    })?;
    let mut sb = [0u8; 1024];
    dev.read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
        .map_err(|source| GrowError::ReadSuperblock {
            device: device.to_owned(),
            source,
        })?;
    let geo = parse_superblock(&sb).ok_or_else(|| GrowError::NotExt4 {
        device: device.to_owned(),
    })?;
    let target = device_blocks(size, geo.block_size);
    if target <= geo.blocks {
        return Ok(Growth::AlreadyFull {
            blocks: geo.blocks,
            block_size: geo.block_size,
        });
    }
    let root = File::open(mount).map_err(|source| GrowError::Open {
        path: mount.to_owned(),
        source,
    })?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, valid for the call.
    unsafe { ext4_resize_fs(root.as_raw_fd(), &target) }.map_err(|source| GrowError::Resize {
        mount: mount.to_owned(),
        from: geo.blocks,
        to: target,
        source,
    })?;
    // The kernel trims a last group too small to hold its own metadata; report
    // what it actually did.
    let mut after = geo;
    let mut sb = [0u8; 1024];
    if dev.read_exact_at(&mut sb, SUPERBLOCK_OFFSET).is_ok() {
        after = parse_superblock(&sb).unwrap_or(after);
    }
    Ok(Growth::Grown {
        from: geo.blocks,
        to: if after.blocks > geo.blocks {
            after.blocks
        } else {
            target
        },
        block_size: geo.block_size,
    })
}

/// Reads `/proc/self/mounts` style text and says whether `mount` is ext4.
pub fn is_ext4_mount(mounts: &str, mount: &str) -> bool {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.nth(1)?, f.next()?))
        })
        .rev()
        .find(|(m, _)| *m == mount)
        .is_some_and(|(_, t)| t == "ext4")
}

/// PID 1's step: grow `/` on the `root=` device if it is ext4, logging the outcome
/// on the console. Never fails the boot.
pub fn grow_root(device: &str) {
    let mut mounts = String::new();
    let is_ext4 = File::open("/proc/self/mounts")
        .and_then(|mut f| f.read_to_string(&mut mounts))
        .map(|_| is_ext4_mount(&mounts, "/"))
        .unwrap_or(false);
    if !is_ext4 {
        return;
    }
    let started = std::time::Instant::now();
    match grow(Path::new(device), Path::new("/")) {
        Ok(Growth::AlreadyFull { .. }) => {}
        Ok(Growth::Grown {
            from,
            to,
            block_size,
        }) => crate::init::console(&format!(
            "hearth-guest: grew / from {} to {} MiB in {} ms",
            (from * block_size) >> 20,
            (to * block_size) >> 20,
            started.elapsed().as_millis()
        )),
        Err(e) => {
            let mut msg = format!("hearth-guest: cannot grow /: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            crate::init::console(&msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(blocks: u64, log: u32, bit64: bool) -> [u8; 1024] {
        let mut sb = [0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&log.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        if bit64 {
            sb[0x60..0x64].copy_from_slice(&INCOMPAT_64BIT.to_le_bytes());
            sb[0x150..0x154].copy_from_slice(&((blocks >> 32) as u32).to_le_bytes());
        }
        sb
    }

    #[test]
    fn superblock_geometry() {
        assert_eq!(
            parse_superblock(&superblock(16384, 2, true)),
            Some(Geometry {
                blocks: 16384,
                block_size: 4096
            })
        );
        let big = (5u64 << 32) + 7;
        assert_eq!(
            parse_superblock(&superblock(big, 2, true)).unwrap().blocks,
            big
        );
        // Without the 64bit feature the high word is not part of the count.
        let mut sb = superblock(100, 0, false);
        sb[0x150] = 1;
        assert_eq!(
            parse_superblock(&sb),
            Some(Geometry {
                blocks: 100,
                block_size: 1024
            })
        );
        assert_eq!(parse_superblock(&[0u8; 1024]), None);
    }

    #[test]
    fn device_blocks_round_down() {
        assert_eq!(device_blocks(1 << 30, 4096), 262_144);
        assert_eq!(device_blocks((1 << 30) + 4095, 4096), 262_144);
        assert_eq!(device_blocks(4095, 4096), 0);
    }

    #[test]
    fn ext4_mount_lookup_takes_the_last_mount() {
        let mounts =
            "rootfs / rootfs rw 0 0\n/dev/vda / ext4 rw,relatime 0 0\nproc /proc proc rw 0 0\n";
        assert!(is_ext4_mount(mounts, "/"));
        assert!(!is_ext4_mount(mounts, "/proc"));
        assert!(!is_ext4_mount("rootfs / rootfs rw 0 0\n", "/"));
    }

    /// A real mkfs'd image: the parser reads what mkfs wrote, and `grow` on a file
    /// (not a block device) fails cleanly instead of resizing anything.
    #[test]
    fn reads_a_real_ext4_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.ext4");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-T", "default"])
            .arg(&img)
            .status();
        let Ok(status) = ok else {
            eprintln!("SKIPPING reads_a_real_ext4_image: no mkfs.ext4");
            return;
        };
        assert!(status.success());
        let mut sb = [0u8; 1024];
        File::open(&img)
            .unwrap()
            .read_exact_at(&mut sb, SUPERBLOCK_OFFSET)
            .unwrap();
        assert_eq!(
            parse_superblock(&sb),
            Some(Geometry {
                blocks: 8192,
                block_size: 4096
            })
        );
        let err = grow(&img, dir.path()).unwrap_err();
        assert!(matches!(err, GrowError::DeviceSize { .. }), "{err}");
    }
}

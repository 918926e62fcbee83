//! A VM's serial console, bounded: the VMM exposes it as a Unix socket
//! (`console.sock`), and [`follow`] copies what the guest writes into
//! `console.log`, rotating it to `console.log.1` at a cap, so the console never
//! takes more than twice the cap on disk and a fixed buffer in memory.
//!
//! Readers take only the end of the log ([`read_tail`]): guest text is never read
//! whole, and it is escaped ([`super::escape_guest_text`]) before it reaches a log
//! line or an error message. This module does not start or stop VMs.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

use super::VmHandle;

/// Default cap of `console.log` (and of `console.log.1`).
pub const DEFAULT_CONSOLE_CAP: u64 = 1 << 20;
/// The live console log inside a run directory.
pub const CONSOLE_LOG: &str = "console.log";
/// The rotated console log.
pub const CONSOLE_LOG_OLD: &str = "console.log.1";
/// The console socket the VMM serves.
pub const CONSOLE_SOCKET: &str = "console.sock";

/// A size-capped, rotating log file.
#[derive(Debug)]
struct CappedLog {
    path: PathBuf,
    old: PathBuf,
    cap: u64,
    file: std::fs::File,
    size: u64,
}

fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl CappedLog {
    fn open(path: PathBuf, cap: u64) -> std::io::Result<Self> {
        let file = open_log(&path)?;
        let size = file.metadata()?.len();
        let old = path.with_file_name(CONSOLE_LOG_OLD);
        Ok(Self {
            path,
            old,
            cap: cap.max(1),
            file,
            size,
        })
    }

    fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        while !data.is_empty() {
            if self.size >= self.cap {
                std::fs::rename(&self.path, &self.old)?;
                self.file = open_log(&self.path)?;
                self.size = 0;
            }
            let room = usize::try_from(self.cap - self.size).unwrap_or(usize::MAX);
            let n = data.len().min(room);
            self.file.write_all(&data[..n])?;
            self.size += n as u64;
            data = &data[n..];
        }
        Ok(())
    }
}

/// Copy the console of `vm` from `socket` into `log` (capped at `cap` bytes, one
/// rotation) until the VM exits. Connects as soon as the VMM serves the socket;
/// after an agent restart it reconnects to the same socket and appends.
///
/// The log is opened before this returns the future, so the file exists by the
/// time the caller goes on (a run directory removed right after never races a
/// late create of `console.log`).
pub fn follow(
    socket: PathBuf,
    log: PathBuf,
    cap: u64,
    vm: VmHandle,
) -> impl std::future::Future<Output = ()> + Send {
    let out = CappedLog::open(log, cap);
    async move {
        match out {
            Ok(out) => copy_console(socket, out, vm).await,
            Err(e) => warn!(error = %e, "cannot open the console log; the console is not recorded"),
        }
    }
}

async fn copy_console(socket: PathBuf, mut out: CappedLog, vm: VmHandle) {
    let mut stream = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(_) if vm.is_alive() => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => {
                debug!(error = %e, "VM gone before its console could be followed");
                return;
            }
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if let Err(e) = out.write(&buf[..n]) {
                    warn!(error = %e, "console log write failed; dropping console output");
                    // Keep draining so the guest's serial port never blocks on us.
                }
            }
            Err(e) => {
                debug!(error = %e, "console socket closed");
                return;
            }
        }
    }
}

/// The last `max` bytes written to the console of the VM whose run directory is
/// `run_dir` (reaching into `console.log.1` when `console.log` is shorter),
/// escaped for logs. Reads at most `max` bytes from disk.
pub fn read_tail(run_dir: &Path, max: usize) -> String {
    super::escape_guest_text(trim_ascii(&read_tail_raw(run_dir, max)))
}

/// [`read_tail`] before escaping: raw guest bytes, for callers that escape per line.
pub fn read_tail_raw(run_dir: &Path, max: usize) -> Vec<u8> {
    let cur = tail_bytes(&run_dir.join(CONSOLE_LOG), max);
    let mut bytes = if cur.len() < max {
        let mut v = tail_bytes(&run_dir.join(CONSOLE_LOG_OLD), max - cur.len());
        v.extend_from_slice(&cur);
        v
    } else {
        cur
    };
    // When the text was cut, start at a line boundary if there is one near the start.
    if bytes.len() >= max {
        if let Some(i) = bytes.iter().take(200).position(|b| *b == b'\n') {
            bytes.drain(..=i);
        }
    }
    bytes
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end.max(start)]
}

/// The last `max` bytes of the file at `path` (empty when it cannot be read).
pub fn tail_bytes(path: &Path, max: usize) -> Vec<u8> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut v = Vec::with_capacity(max.min(64 * 1024));
    let _ = f.take(max as u64).read_to_end(&mut v);
    v
}

/// Whether the console output since the last rotation contains `needle`, looking
/// only at the last `window` bytes.
pub fn tail_contains(run_dir: &Path, needle: &str, window: usize) -> bool {
    let b = tail_bytes(&run_dir.join(CONSOLE_LOG), window);
    b.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_log_rotates_once_and_stays_under_twice_the_cap() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join(CONSOLE_LOG);
        let mut log = CappedLog::open(p.clone(), 1000).unwrap();
        for i in 0..100u32 {
            log.write(format!("line {i:04} ..............................\n").as_bytes())
                .unwrap();
        }
        let cur = std::fs::metadata(&p).unwrap().len();
        let old = std::fs::metadata(t.path().join(CONSOLE_LOG_OLD))
            .unwrap()
            .len();
        assert!(cur <= 1000 && old == 1000, "{cur} {old}");
        let tail = read_tail(t.path(), 200);
        assert!(
            tail.ends_with("line 0099 .............................."),
            "{tail}"
        );
        assert!(!tail.contains('\n'));
        // Reopening (agent restart) appends and keeps the cap.
        let mut again = CappedLog::open(p.clone(), 1000).unwrap();
        again.write(&[b'x'; 5000]).unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() <= 1000);
    }

    #[test]
    fn tail_reaches_into_the_rotated_log_and_escapes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(CONSOLE_LOG_OLD), b"old part\n").unwrap();
        std::fs::write(t.path().join(CONSOLE_LOG), b"\x1b[31mred\xff\n").unwrap();
        let tail = read_tail(t.path(), 1000);
        assert_eq!(tail, "old part\\n\\x1b[31mred\\xff");
        assert!(tail_contains(t.path(), "red", 100));
        assert!(!tail_contains(t.path(), "old", 100));
    }
}

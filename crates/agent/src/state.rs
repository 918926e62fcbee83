//! The sandbox record: the validated spec, the lifecycle state, and the versioned
//! `state.json` each sandbox keeps in its run directory so that a restarted agent
//! can re-adopt or clean up what it left behind.
//!
//! Owns the file format (with `format_version` and a checksum of the payload) and
//! its atomic write. It performs no other I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fnv::fnv64;
use hearth_types::{SandboxId, TemplateName};
use serde::{Deserialize, Serialize};

use crate::disk::Disk;
use crate::net::SandboxNet;
use crate::vmm::{Memory, SavedState};

/// Version of the `state.json` layout this agent reads and writes.
pub const STATE_FORMAT_VERSION: u32 = 1;
/// Name of the state file inside a sandbox's run directory.
pub const STATE_FILE: &str = "state.json";

/// A validated sandbox request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    pub sandbox_id: SandboxId,
    pub template: TemplateName,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    /// Unix ms after which the reaper destroys the sandbox; 0 = never.
    pub expires_at_unix_ms: i64,
    pub env: BTreeMap<String, String>,
    pub team_id: String,
}

/// Lifecycle state: the one table shared with the control plane.
pub use hearth_types::SandboxState;

/// The per-sandbox secret the host agent sends the guest agent in envd's
/// `X-Access-Token` header: 32 random bytes, hex. Generated at create, given to the
/// guest at `/init`, never shown to the control plane. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccessToken(String);

impl AccessToken {
    /// A fresh token from the kernel's CSPRNG (getrandom(2)).
    pub fn generate() -> std::io::Result<Self> {
        let mut buf = [0u8; 32];
        let mut filled = 0;
        while filled < buf.len() {
            // SAFETY: writes at most `buf.len() - filled` bytes into our own buffer.
            let n = unsafe {
                libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            filled += n as usize;
        }
        Ok(Self(buf.iter().map(|b| format!("{b:02x}")).collect()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// What the agent knows about one sandbox; persisted as `state.json` (mode 0600:
/// it holds the sandbox's env vars and access token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub spec: SandboxSpec,
    /// Sent as `X-Access-Token` on every call to the guest agent but `/health`.
    /// `None` only in state files written before tokens existed.
    #[serde(default)]
    pub access_token: Option<AccessToken>,
    pub state: SandboxState,
    pub run_dir: PathBuf,
    pub slot: Option<u32>,
    pub net: Option<SandboxNet>,
    pub disk: Option<Disk>,
    pub pid: Option<u32>,
    pub guest_address: Option<SocketAddr>,
    pub started_at_unix_ms: i64,
    pub boot_ms: u32,
    pub error: Option<String>,
    /// The guest memory the VM maps (its own shared file, or a base mapped
    /// private). `Anonymous` in state files written before memory files.
    #[serde(default = "anonymous")]
    pub memory: Memory,
    /// Set while paused (and while a resume is under way): what was saved into
    /// [`VMSTATE_FILE`].
    #[serde(default)]
    pub paused: Option<Paused>,
    /// The token a resume is handing the guest: kept until the guest took it, so
    /// a restarted agent can finish the rotation.
    #[serde(default)]
    pub next_access_token: Option<AccessToken>,
    /// Started by restoring a warm template's memory rather than by booting.
    #[serde(default)]
    pub restored: bool,
    /// The template its disk (and memory) come from when that is not
    /// `spec.template` (a fork point); the template may not go while it is used.
    #[serde(default)]
    pub base: Option<TemplateName>,
    /// The ID its host resources (VM name, cgroup, network namespace, slot claim)
    /// were taken under when that is not its own: a sandbox given a pooled VM.
    #[serde(default)]
    pub vm_id: Option<SandboxId>,
    /// A restored, frozen VM kept ready for a create ([`crate::pool`]): not listed.
    #[serde(default)]
    pub pooled: bool,
}

fn anonymous() -> Memory {
    Memory::Anonymous
}

/// A paused sandbox's saved VM: device state (and memory, when it was not in a
/// shared file) in `<run_dir>/vmstate`, memory otherwise in `<run_dir>/memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub saved: SavedState,
    pub paused_at_unix_ms: i64,
}

/// The saved device state of a paused sandbox, inside its run directory.
pub const VMSTATE_FILE: &str = "vmstate";
/// A paused sandbox's own guest memory file, inside its run directory.
pub const MEMORY_FILE: &str = "memory";

impl SandboxRecord {
    pub fn new(spec: SandboxSpec, run_dir: PathBuf, access_token: Option<AccessToken>) -> Self {
        Self {
            spec,
            access_token,
            state: SandboxState::Starting,
            run_dir,
            slot: None,
            net: None,
            disk: None,
            pid: None,
            guest_address: None,
            started_at_unix_ms: now_unix_ms(),
            boot_ms: 0,
            error: None,
            memory: Memory::Anonymous,
            paused: None,
            next_access_token: None,
            restored: false,
            base: None,
            vm_id: None,
            pooled: false,
        }
    }

    /// The ID its host resources are named by ([`SandboxRecord::vm_id`], else its own).
    pub fn resource_id(&self) -> &SandboxId {
        self.vm_id.as_ref().unwrap_or(&self.spec.sandbox_id)
    }

    /// Whether the reaper should destroy it at `now`.
    pub fn expired(&self, now_unix_ms: i64) -> bool {
        self.spec.expires_at_unix_ms != 0 && self.spec.expires_at_unix_ms <= now_unix_ms
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format_version: u32,
    /// FNV-1a 64 of the compact JSON of `record`, hex.
    checksum: String,
    record: serde_json::Value,
}

/// Errors reading or writing `state.json`.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("i/o on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid state file")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format version {found}, this agent reads {STATE_FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} failed its checksum")]
    Checksum { path: PathBuf },
}

/// Serialize `record` into the versioned, checksummed envelope.
pub fn encode(record: &SandboxRecord) -> Result<Vec<u8>, serde_json::Error> {
    let value = serde_json::to_value(record)?;
    let checksum = format!("{:016x}", fnv64(value.to_string().as_bytes()));
    serde_json::to_vec_pretty(&Envelope {
        format_version: STATE_FORMAT_VERSION,
        checksum,
        record: value,
    })
}

/// Parse and verify an envelope; `path` is only for error messages.
pub fn decode(bytes: &[u8], path: &Path) -> Result<SandboxRecord, StateError> {
    let parse = |source| StateError::Parse {
        path: path.to_owned(),
        source,
    };
    let env: Envelope = serde_json::from_slice(bytes).map_err(parse)?;
    if env.format_version != STATE_FORMAT_VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: env.format_version,
        });
    }
    if format!("{:016x}", fnv64(env.record.to_string().as_bytes())) != env.checksum {
        return Err(StateError::Checksum {
            path: path.to_owned(),
        });
    }
    serde_json::from_value(env.record).map_err(parse)
}

/// Write `<run_dir>/state.json` atomically (temp file + rename), mode 0600: it
/// holds env vars and the access token, readable by root only.
pub fn save(record: &SandboxRecord) -> Result<(), StateError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = record.run_dir.join(STATE_FILE);
    let tmp = record.run_dir.join(".state.json.tmp");
    let bytes = encode(record).map_err(|source| StateError::Parse {
        path: path.clone(),
        source,
    })?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // A temp file left by an older agent keeps its mode: set it explicitly.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&bytes)?;
        drop(f);
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|source| StateError::Io { path, source })
}

/// Read `<run_dir>/state.json`.
pub fn load(run_dir: &Path) -> Result<SandboxRecord, StateError> {
    let path = run_dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|source| StateError::Io {
        path: path.clone(),
        source,
    })?;
    decode(&bytes, &path)
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A dependency-free checksum: enough to catch torn or hand-edited files.
mod fnv {
    pub fn fnv64(bytes: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::DiskFormat;

    fn record(dir: &Path) -> SandboxRecord {
        let id: SandboxId = "sb-abcdefghijklmnop".parse().unwrap();
        let mut r = SandboxRecord::new(
            SandboxSpec {
                sandbox_id: id.clone(),
                template: "minimal".parse().unwrap(),
                vcpus: 1,
                memory_mb: 256,
                disk_size_mb: 1024,
                expires_at_unix_ms: 5,
                env: [("A".to_owned(), "b".to_owned())].into(),
                team_id: "t".into(),
            },
            dir.to_owned(),
            Some(AccessToken::generate().unwrap()),
        );
        r.slot = Some(3);
        r.net = SandboxNet::planned(3, &id);
        r.disk = Some(Disk {
            path: dir.join("disk.qcow2"),
            format: DiskFormat::Qcow2,
        });
        r.pid = Some(1234);
        r.guest_address = r.net.as_ref().map(|n| n.guest_address);
        r.state = SandboxState::Running;
        r
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let r = record(dir.path());
        save(&r).unwrap();
        assert_eq!(load(dir.path()).unwrap(), r);
        let raw: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        assert_eq!(raw["format_version"], STATE_FORMAT_VERSION);
        assert_eq!(raw["record"]["pid"], 1234);
        assert!(r.expired(5) && !r.expired(4));
    }

    #[test]
    fn state_file_is_root_only_and_keeps_the_token() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let r = record(dir.path());
        save(&r).unwrap();
        let mode = std::fs::metadata(dir.path().join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = r.access_token.clone().unwrap();
        assert_eq!(token.as_str().len(), 64);
        assert!(token.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(AccessToken::generate().unwrap(), token);
        assert!(!format!("{r:?}").contains(token.as_str()));
        assert_eq!(load(dir.path()).unwrap().access_token, Some(token));
    }

    #[test]
    fn state_files_without_a_token_still_load() {
        let r = record(Path::new("/x"));
        let mut v: serde_json::Value = serde_json::from_slice(&encode(&r).unwrap()).unwrap();
        v["record"].as_object_mut().unwrap().remove("access_token");
        v["checksum"] = format!("{:016x}", fnv64(v["record"].to_string().as_bytes())).into();
        let back = decode(&serde_json::to_vec(&v).unwrap(), Path::new("s")).unwrap();
        assert_eq!(back.access_token, None);
    }

    #[test]
    fn other_versions_and_tampering_are_rejected() {
        let p = Path::new("state.json");
        let r = record(Path::new("/x"));
        let mut v: serde_json::Value = serde_json::from_slice(&encode(&r).unwrap()).unwrap();
        v["format_version"] = 2.into();
        let err = decode(&serde_json::to_vec(&v).unwrap(), p).unwrap_err();
        assert!(matches!(err, StateError::Version { found: 2, .. }), "{err}");
        v["format_version"] = STATE_FORMAT_VERSION.into();
        v["record"]["pid"] = 99.into();
        let err = decode(&serde_json::to_vec(&v).unwrap(), p).unwrap_err();
        assert!(matches!(err, StateError::Checksum { .. }), "{err}");
        assert!(matches!(
            decode(b"{", p).unwrap_err(),
            StateError::Parse { .. }
        ));
    }
}

//! The agent's enrolled identity: its host ID, private key, the certificate the
//! control plane issued for it and the deployment CA's certificate, kept in one
//! directory (0700, files 0600, each written whole then renamed into place).
//!
//! Made once at enrollment (`hearth agent --enroll-token`, see the CLI); loaded at
//! every later start, when it turns into the TLS config of the agent's listener
//! ([`Identity::server_config`]: only clients with a certificate from that CA naming
//! the control plane get in). This module does no network I/O.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hearth_types::HostId;

/// The enrolled identity.
#[derive(Clone)]
pub struct Identity {
    pub host_id: HostId,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds an invalid host ID")]
    BadHostId { path: PathBuf },
    #[error("{path} is incomplete: enroll again (hearth agent --enroll-token)")]
    Incomplete { path: PathBuf },
    #[error("the stored certificate or key is unusable")]
    Tls(#[source] hearth_pki::PkiError),
}

const FILES: [&str; 4] = ["host-id", "key.pem", "cert.pem", "ca.pem"];

/// Where the identity lives under the agent's data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("agent-identity")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Identity {
    /// The identity stored in `dir`; `None` when there is none (never enrolled).
    pub fn load(dir: &Path) -> Result<Option<Self>, IdentityError> {
        let present: Vec<bool> = FILES.iter().map(|f| dir.join(f).is_file()).collect();
        if present.iter().all(|p| !p) {
            return Ok(None);
        }
        if !present.iter().all(|p| *p) {
            return Err(IdentityError::Incomplete {
                path: dir.to_owned(),
            });
        }
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(io(&p))
        };
        let id_path = dir.join("host-id");
        let host_id = read("host-id")?
            .trim()
            .parse()
            .map_err(|_| IdentityError::BadHostId { path: id_path })?;
        Ok(Some(Self {
            host_id,
            key_pem: read("key.pem")?,
            cert_pem: read("cert.pem")?,
            ca_pem: read("ca.pem")?,
        }))
    }

    /// Write the identity to `dir` (made 0700; files 0600).
    pub fn store(&self, dir: &Path) -> Result<(), IdentityError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let id = format!("{}\n", self.host_id);
        for (name, body) in [
            ("key.pem", self.key_pem.as_str()),
            ("cert.pem", self.cert_pem.as_str()),
            ("ca.pem", self.ca_pem.as_str()),
            // Last: its presence with the others marks a complete identity.
            ("host-id", id.as_str()),
        ] {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(body.as_bytes()).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }

    /// The listener's TLS config: this certificate; clients must present one from
    /// the CA naming the control plane.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, IdentityError> {
        hearth_pki::agent_server_config(&self.ca_pem, &self.cert_pem, &self.key_pem)
            .map_err(IdentityError::Tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_private_and_loaded_back() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir(tmp.path());
        assert!(Identity::load(&d).unwrap().is_none());
        let ca = hearth_pki::Ca::generate().unwrap();
        let key = hearth_pki::HostKey::generate().unwrap();
        let host_id = HostId::generate();
        let (cert_pem, _) = ca.sign_host_csr(&key.csr_pem, &host_id).unwrap();
        let id = Identity {
            host_id: host_id.clone(),
            key_pem: key.key_pem,
            cert_pem,
            ca_pem: ca.ca_cert_pem.clone(),
        };
        id.store(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        for f in FILES {
            assert_eq!(mode(&d.join(f)), 0o600, "{f}");
        }
        let back = Identity::load(&d).unwrap().unwrap();
        assert_eq!(back.host_id, host_id);
        back.server_config().unwrap();
        // A half-written identity is an error, not "never enrolled".
        std::fs::remove_file(d.join("cert.pem")).unwrap();
        assert!(matches!(
            Identity::load(&d),
            Err(IdentityError::Incomplete { .. })
        ));
    }
}

//! Runs filesystem work with a user's permissions, so the kernel does the checks
//! (including every directory searched while following symlinks).
//!
//! Each call gets a fresh OS thread that switches only its *own* credentials (fsuid,
//! fsgid and supplementary groups, via the raw syscalls: glibc's wrappers would change
//! every thread of the agent), runs the work and ends. Dropping the fs uid from 0 also
//! drops the thread's filesystem capabilities (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, ...).
//! Open files are handed back as descriptors and used from async code afterwards.

use crate::fs::FsError;
use crate::users::{self, User};

/// Credentials a worker thread switches to.
#[derive(Debug, Clone)]
struct Switch {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

impl Switch {
    /// `None` when nothing needs switching: the user is root, or the agent is not root
    /// (then it has no more rights than the kernel gives it anyway).
    fn for_user(user: &User) -> Option<Self> {
        if user.uid == 0 || !nix::unistd::geteuid().is_root() {
            return None;
        }
        Some(Switch {
            uid: user.uid,
            gid: user.gid,
            groups: users::groups_of(user),
        })
    }

    /// Switches the calling thread. Only call on a thread that ends after its work.
    fn apply(&self) -> Result<(), FsError> {
        let fail = |what: &'static str| FsError::Credentials {
            what,
            source: std::io::Error::last_os_error(),
        };
        // SAFETY: the kernel reads `groups.len()` gids from a pointer valid for the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()) };
        if rc != 0 {
            return Err(fail("setgroups"));
        }
        // setfsuid/setfsgid return the previous id and report no errors: ask again
        // with an invalid id (which changes nothing) to see what is in force.
        // SAFETY: plain integer syscalls.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, self.gid);
            if libc::syscall(libc::SYS_setfsgid, u32::MAX) != i64::from(self.gid) {
                return Err(fail("setfsgid"));
            }
            libc::syscall(libc::SYS_setfsuid, self.uid);
            if libc::syscall(libc::SYS_setfsuid, u32::MAX) != i64::from(self.uid) {
                return Err(fail("setfsuid"));
            }
        }
        Ok(())
    }
}

/// Runs `work` on a new thread that acts on the filesystem as `user`.
pub async fn run_as<T, F>(user: &User, work: F) -> Result<T, FsError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, FsError> + Send + 'static,
{
    let switch = Switch::for_user(user);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fs-as-user".into())
        .spawn(move || {
            let result = match &switch {
                Some(s) => s.apply().and_then(|()| work()),
                None => work(),
            };
            // The requester may have gone away; the thread ends either way.
            let _ = tx.send(result);
        })
        .map_err(|source| FsError::Credentials {
            what: "cannot start a worker thread",
            source,
        })?;
    rx.await.map_err(|_| FsError::Credentials {
        what: "worker thread ended without an answer",
        source: std::io::Error::other("worker panicked"),
    })?
}

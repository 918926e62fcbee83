//! Process-wide child reaper.
//!
//! One thread reaps every exited child with `waitpid(-1)` (PID 1 inherits orphans, so
//! someone must) and hands the status to whoever registered for that pid. Spawning and
//! registering happen under the same lock the reaper holds while reaping, so a child can
//! never be reaped before its waiter exists. Nobody else in the process may call `wait*`
//! on specific children (so no `tokio::process`).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Default)]
struct Table {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
}

struct Reaper {
    table: Mutex<Table>,
    spawned: Condvar,
}

fn reaper() -> &'static Reaper {
    static R: OnceLock<Reaper> = OnceLock::new();
    R.get_or_init(|| {
        let r = Reaper {
            table: Mutex::new(Table::default()),
            spawned: Condvar::new(),
        };
        if let Err(e) = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_loop)
        {
            tracing::error!(error = %e, "cannot start the reaper thread");
        }
        r
    })
}

fn lock() -> MutexGuard<'static, Table> {
    reaper().table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the reaper if it is not running yet.
pub fn start() {
    let _ = reaper();
}

/// Runs `spawn` (which must start exactly one child and return its pid) under the reaper
/// lock and registers a waiter for that pid. Returns the spawn result and the exit receiver.
pub fn spawn_and_watch<T>(
    spawn: impl FnOnce() -> std::io::Result<(i32, T)>,
) -> std::io::Result<(T, oneshot::Receiver<Exit>)> {
    let mut table = lock();
    let (pid, value) = spawn()?;
    let (tx, rx) = oneshot::channel();
    table.waiters.insert(pid, tx);
    drop(table);
    reaper().spawned.notify_all();
    Ok((value, rx))
}

fn reap_loop() {
    loop {
        // Block (without reaping) until some child has exited.
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) => reap_all(),
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => {
                // No children: sleep until one is spawned (or re-check for orphans).
                let table = lock();
                let _ = reaper()
                    .spawned
                    .wait_timeout(table, Duration::from_millis(500));
            }
        }
    }
}

fn reap_all() {
    let mut table = lock();
    loop {
        let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        if let Some(tx) = table.waiters.remove(&pid.as_raw()) {
            let _ = tx.send(exit);
        }
    }
}

//! Directory watches for `filesystem.Filesystem` (`WatchDir`, and the polled
//! `CreateWatcher`/`GetWatcherEvents`/`RemoveWatcher` that E2B's sync SDK uses), on
//! inotify. One thread per watch waits on its inotify descriptor (with a short poll
//! timeout, so a removed watch ends promptly), turns events into envd's
//! `FilesystemEvent`s (names relative to the watched directory, as envd reports them)
//! and, for a recursive watch, adds every new subdirectory.
//!
//! Bounded: at most [`MAX_WATCHERS`] watches at once, [`MAX_DIRS`] directories per
//! watch, and [`MAX_QUEUED`] events waiting per watch; beyond that the oldest events
//! are dropped (the reader is told how many with a warning on the console). Who may
//! watch what is checked by the caller ([`crate::fs`]): the directory must be
//! listable by the requesting user.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hearth_proto::filesystem::{EventType, FilesystemEvent};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// Watches alive at once, over every user.
pub const MAX_WATCHERS: usize = 64;
/// Directories one recursive watch follows.
pub const MAX_DIRS: usize = 4096;
/// Events kept for a polled watch between two reads (oldest dropped beyond).
pub const MAX_QUEUED: usize = 4096;
/// How often a watch thread looks whether it was removed.
const POLL: Duration = Duration::from_millis(200);

/// Why a watch could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("too many directory watches ({MAX_WATCHERS}); remove some first")]
    TooMany,
    #[error("watcher {0} not found")]
    NotFound(String),
    #[error("inotify: {0}")]
    Inotify(#[from] nix::Error),
}

/// Where a watch's events go.
pub enum Sink {
    /// Kept until `GetWatcherEvents` takes them.
    Queue(Arc<Mutex<VecDeque<FilesystemEvent>>>),
    /// Sent on a stream (`WatchDir`); the watch ends when the receiver is dropped.
    Stream(tokio::sync::mpsc::Sender<FilesystemEvent>),
}

struct Watch {
    stop: Arc<AtomicBool>,
    queue: Option<Arc<Mutex<VecDeque<FilesystemEvent>>>>,
}

/// The live watches; cheap to clone.
#[derive(Clone, Default)]
pub struct Watchers {
    inner: Arc<Mutex<HashMap<String, Watch>>>,
}

impl Watchers {
    /// Start watching `root` (a directory the caller checked); returns the watch's ID.
    pub fn start(
        &self,
        root: PathBuf,
        recursive: bool,
        include_entry: bool,
        sink: Sink,
    ) -> Result<String, WatchError> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Streams whose reader went away have ended their threads; forget them.
        map.retain(|_, w| !w.stop.load(Ordering::SeqCst));
        if map.len() >= MAX_WATCHERS {
            return Err(WatchError::TooMany);
        }
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
        let mut dirs = Dirs::default();
        dirs.add(&inotify, &root, Path::new(""), recursive)?;
        let id = new_id();
        let stop = Arc::new(AtomicBool::new(false));
        let queue = match &sink {
            Sink::Queue(q) => Some(q.clone()),
            Sink::Stream(_) => None,
        };
        map.insert(
            id.clone(),
            Watch {
                stop: stop.clone(),
                queue,
            },
        );
        let job = Job {
            inotify,
            root,
            recursive,
            include_entry,
            dirs,
            sink,
            stop,
        };
        if let Err(e) = std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || job.run())
        {
            map.remove(&id);
            return Err(WatchError::Inotify(nix::Error::from_raw(
                e.raw_os_error().unwrap_or(libc::EAGAIN),
            )));
        }
        Ok(id)
    }

    /// The events of polled watch `id` since the last call.
    pub fn take(&self, id: &str) -> Result<Vec<FilesystemEvent>, WatchError> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let w = map
            .get(id)
            .filter(|w| w.queue.is_some())
            .ok_or_else(|| WatchError::NotFound(id.to_owned()))?;
        let q = w.queue.as_ref().map(Arc::clone).unwrap_or_default();
        drop(map);
        let mut q = q.lock().unwrap_or_else(|p| p.into_inner());
        Ok(q.drain(..).collect())
    }

    /// End watch `id`.
    pub fn remove(&self, id: &str) -> Result<(), WatchError> {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let w = map
            .remove(id)
            .ok_or_else(|| WatchError::NotFound(id.to_owned()))?;
        w.stop.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Watches alive (for tests and limits).
    pub fn len(&self) -> usize {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| !w.stop.load(Ordering::SeqCst));
        map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A fresh watcher ID: 20 random lowercase letters and digits (from the kernel's
/// random source; a counter and the clock when that cannot be read).
fn new_id() -> String {
    use std::io::Read;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut bytes = [0u8; 20];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = ((n ^ t) >> ((i % 8) * 8)) as u8 ^ (i as u8);
        }
    }
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// The directories a watch follows: inotify descriptor -> path relative to the root.
#[derive(Default)]
struct Dirs {
    by_wd: HashMap<WatchDescriptor, PathBuf>,
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_ONLYDIR
        | AddWatchFlags::IN_DONT_FOLLOW
}

impl Dirs {
    /// Watch `root/rel` (and, when `recursive`, the directories below it).
    fn add(
        &mut self,
        inotify: &Inotify,
        root: &Path,
        rel: &Path,
        recursive: bool,
    ) -> Result<(), WatchError> {
        let mut todo = vec![rel.to_path_buf()];
        while let Some(rel) = todo.pop() {
            if self.by_wd.len() >= MAX_DIRS {
                tracing::warn!(root = %root.display(), "watch follows {MAX_DIRS} directories; more are not watched");
                break;
            }
            let abs = root.join(&rel);
            let wd = match inotify.add_watch(&abs, flags()) {
                Ok(wd) => wd,
                // The root must be watchable; a subdirectory may vanish meanwhile.
                Err(e) if rel.as_os_str().is_empty() => return Err(e.into()),
                Err(_) => continue,
            };
            self.by_wd.insert(wd, rel.clone());
            if recursive {
                if let Ok(rd) = std::fs::read_dir(&abs) {
                    for e in rd.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            todo.push(rel.join(e.file_name()));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

struct Job {
    inotify: Inotify,
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    dirs: Dirs,
    sink: Sink,
    stop: Arc<AtomicBool>,
}

impl Job {
    fn run(mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            let ready = {
                let fd = self.inotify.as_fd();
                let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                nix::poll::poll(
                    &mut fds,
                    nix::poll::PollTimeout::from(POLL.as_millis() as u16),
                )
            };
            match ready {
                Ok(0) => {
                    if let Sink::Stream(tx) = &self.sink {
                        if tx.is_closed() {
                            break;
                        }
                    }
                    continue;
                }
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "watch: poll failed; the watch ends");
                    break;
                }
            }
            let events = match self.inotify.read_events() {
                Ok(ev) => ev,
                Err(nix::Error::EAGAIN) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "watch: reading inotify failed; the watch ends");
                    break;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    tracing::warn!(root = %self.root.display(), "watch: the kernel's event queue overflowed; events were lost");
                    continue;
                }
                let Some(dir) = self.dirs.by_wd.get(&ev.wd).cloned() else {
                    continue;
                };
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    self.dirs.by_wd.remove(&ev.wd);
                    continue;
                }
                let rel = match &ev.name {
                    Some(n) => dir.join(n),
                    None => dir.clone(),
                };
                if self.recursive
                    && ev.mask.contains(AddWatchFlags::IN_ISDIR)
                    && ev
                        .mask
                        .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                {
                    let _ = self.dirs.add(&self.inotify, &self.root, &rel, true);
                }
                let Some(kind) = kind(ev.mask) else { continue };
                if ev.name.is_none() && ev.mask.contains(AddWatchFlags::IN_DELETE_SELF) {
                    // The watched root itself went away: envd reports it and ends.
                    if !dir.as_os_str().is_empty() {
                        continue;
                    }
                }
                let name = rel.to_string_lossy().into_owned();
                let name = if name.is_empty() {
                    self.root
                        .file_name()
                        .map(OsStr::to_string_lossy)
                        .unwrap_or_default()
                        .into_owned()
                } else {
                    name
                };
                let mut fe = FilesystemEvent {
                    name,
                    r#type: kind.into(),
                    ..Default::default()
                };
                if self.include_entry && kind != EventType::EVENT_TYPE_REMOVE {
                    if let Ok(info) = crate::fs::entry_info(&self.root.join(&rel)) {
                        fe.entry = buffa::MessageField::some(info);
                    }
                }
                if !self.deliver(fe) {
                    return;
                }
            }
        }
    }

    /// Hand `fe` to the sink; `false` when the stream's reader is gone.
    fn deliver(&self, fe: FilesystemEvent) -> bool {
        match &self.sink {
            Sink::Queue(q) => {
                let mut q = q.lock().unwrap_or_else(|p| p.into_inner());
                if q.len() >= MAX_QUEUED {
                    q.pop_front();
                    tracing::warn!(root = %self.root.display(), "watch: {MAX_QUEUED} events unread; dropping the oldest");
                }
                q.push_back(fe);
                true
            }
            Sink::Stream(tx) => match tx.try_send(fe) {
                Ok(()) => true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(root = %self.root.display(), "watch: the reader is behind; an event was dropped");
                    true
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    self.stop.store(true, Ordering::SeqCst);
                    false
                }
            },
        }
    }
}

/// envd's event type for an inotify mask (`None`: not reported).
fn kind(mask: AddWatchFlags) -> Option<EventType> {
    if mask.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
        Some(EventType::EVENT_TYPE_CREATE)
    } else if mask.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
        Some(EventType::EVENT_TYPE_REMOVE)
    } else if mask.contains(AddWatchFlags::IN_MOVED_FROM) {
        Some(EventType::EVENT_TYPE_RENAME)
    } else if mask.contains(AddWatchFlags::IN_MODIFY) {
        Some(EventType::EVENT_TYPE_WRITE)
    } else if mask.contains(AddWatchFlags::IN_ATTRIB) {
        Some(EventType::EVENT_TYPE_CHMOD)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use buffa::Enumeration;

    /// Take events of `id` into `seen` until every name of `want` is among them.
    /// Collect events until `done` holds of them (5 s at most).
    fn wait_until(
        w: &Watchers,
        id: &str,
        seen: &mut Vec<FilesystemEvent>,
        what: &str,
        done: impl Fn(&[FilesystemEvent]) -> bool,
    ) {
        for _ in 0..100 {
            seen.extend(w.take(id).unwrap());
            if done(seen) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{what} not seen: {:?}",
            seen.iter().map(|e| (&e.name, e.r#type)).collect::<Vec<_>>()
        );
    }

    fn wait_for(w: &Watchers, id: &str, seen: &mut Vec<FilesystemEvent>, want: &[&str]) {
        wait_until(w, id, seen, &format!("{want:?}"), |seen| {
            want.iter().all(|n| seen.iter().any(|e| e.name == *n))
        });
    }

    #[test]
    fn a_recursive_watch_reports_relative_names_and_follows_new_dirs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("old")).unwrap();
        let w = Watchers::default();
        let q = Arc::new(Mutex::new(VecDeque::new()));
        let id = w
            .start(dir.path().to_path_buf(), true, true, Sink::Queue(q))
            .unwrap();
        std::fs::write(dir.path().join("top.txt"), "1").unwrap();
        std::fs::write(dir.path().join("old/in-old.txt"), "2").unwrap();
        std::fs::create_dir(dir.path().join("new")).unwrap();
        // Give the watch a moment to follow the new directory.
        let mut seen = Vec::new();
        wait_for(&w, &id, &mut seen, &["new"]);
        std::fs::write(dir.path().join("new/in-new.txt"), "3").unwrap();
        std::fs::remove_file(dir.path().join("top.txt")).unwrap();
        wait_for(&w, &id, &mut seen, &["old/in-old.txt", "new/in-new.txt"]);
        // top.txt was seen at its create already: wait for its removal itself.
        let removed = EventType::EVENT_TYPE_REMOVE.to_i32();
        wait_until(&w, &id, &mut seen, "top.txt removed", |seen| {
            seen.iter()
                .any(|e| e.name == "top.txt" && e.r#type.to_i32() == removed)
        });
        let top: Vec<i32> = seen
            .iter()
            .filter(|e| e.name == "top.txt")
            .map(|e| e.r#type.to_i32())
            .collect();
        assert!(top.contains(&EventType::EVENT_TYPE_CREATE.to_i32()));
        assert!(top.contains(&EventType::EVENT_TYPE_REMOVE.to_i32()));
        let created = seen.iter().find(|e| e.name == "old/in-old.txt").unwrap();
        assert!(created.entry.is_set(), "include_entry: {created:?}");
        w.remove(&id).unwrap();
        assert!(matches!(w.take(&id), Err(WatchError::NotFound(_))));
        assert!(matches!(w.remove(&id), Err(WatchError::NotFound(_))));
    }

    #[test]
    fn a_plain_watch_ignores_subdirectories_and_watches_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let w = Watchers::default();
        let q = Arc::new(Mutex::new(VecDeque::new()));
        let id = w
            .start(dir.path().to_path_buf(), false, false, Sink::Queue(q))
            .unwrap();
        std::fs::write(dir.path().join("sub/deep.txt"), "x").unwrap();
        std::fs::write(dir.path().join("flat.txt"), "x").unwrap();
        let mut seen = Vec::new();
        wait_for(&w, &id, &mut seen, &["flat.txt"]);
        assert!(seen.iter().all(|e| e.name != "sub/deep.txt"), "{seen:?}");
        assert!(matches!(
            w.start(
                dir.path().join("nope"),
                false,
                false,
                Sink::Queue(Default::default())
            ),
            Err(WatchError::Inotify(_))
        ));
        let mut ids = vec![id];
        while ids.len() < MAX_WATCHERS {
            ids.push(
                w.start(
                    dir.path().to_path_buf(),
                    false,
                    false,
                    Sink::Queue(Default::default()),
                )
                .unwrap(),
            );
        }
        assert!(matches!(
            w.start(
                dir.path().to_path_buf(),
                false,
                false,
                Sink::Queue(Default::default())
            ),
            Err(WatchError::TooMany)
        ));
        for id in ids {
            w.remove(&id).unwrap();
        }
        assert!(w.is_empty());
    }
}

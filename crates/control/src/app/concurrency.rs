//! Per-team caps on work that holds a connection open: exec streams (JSON exec and
//! WebSocket sessions) and file transfers (uploads and downloads). One team cannot
//! tie up the control plane's connections to hosts and guests however many API calls
//! it makes. A slot is taken before any host is called and given back when its
//! [`Permit`] is dropped, whatever ends the work (completion, error, cancellation).
//!
//! It counts in memory, per control-plane process: several control planes behind one
//! address each enforce the cap on their own share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hearth_types::TeamId;

/// What a permit is for; each kind has its own cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Exec,
    Transfer,
    /// `GET /v1/events` streams.
    Events,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Exec => "concurrent exec streams",
            Kind::Transfer => "concurrent file transfers",
            Kind::Events => "concurrent event streams",
        }
    }
}

/// Caps per team (from [`super::Policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCaps {
    pub exec_streams: u32,
    pub transfers: u32,
    pub event_streams: u32,
}

impl Default for StreamCaps {
    fn default() -> Self {
        Self {
            exec_streams: 64,
            transfers: 16,
            event_streams: 16,
        }
    }
}

impl StreamCaps {
    fn cap(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Exec => self.exec_streams,
            Kind::Transfer => self.transfers,
            Kind::Events => self.event_streams,
        }
    }
}

/// The live counts, shared by every request of the process.
#[derive(Debug, Default)]
pub struct Counters {
    inner: Arc<Mutex<HashMap<(TeamId, Kind), u32>>>,
}

/// One slot, released on drop.
#[derive(Debug)]
pub struct Permit {
    inner: Arc<Mutex<HashMap<(TeamId, Kind), u32>>>,
    key: (TeamId, Kind),
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

impl Counters {
    /// Take a slot of `kind` for `team`, or say which cap it would pass.
    pub fn acquire(&self, caps: &StreamCaps, team: TeamId, kind: Kind) -> Result<Permit, String> {
        let cap = caps.cap(kind);
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry((team, kind)).or_insert(0);
        if *n >= cap {
            return Err(format!(
                "team limit: at most {cap} {} (wait for one to end)",
                kind.what()
            ));
        }
        *n += 1;
        Ok(Permit {
            inner: self.inner.clone(),
            key: (team, kind),
        })
    }

    /// Slots of `kind` that `team` holds now.
    pub fn in_use(&self, team: TeamId, kind: Kind) -> u32 {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(team, kind)).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_team_and_kind_and_drop_releases() {
        let c = Counters::default();
        let caps = StreamCaps {
            exec_streams: 2,
            transfers: 1,
            event_streams: 1,
        };
        let (a, b) = (TeamId::generate(), TeamId::generate());
        let p1 = c.acquire(&caps, a, Kind::Exec).unwrap();
        let _p2 = c.acquire(&caps, a, Kind::Exec).unwrap();
        let err = c.acquire(&caps, a, Kind::Exec).unwrap_err();
        assert_eq!(
            err,
            "team limit: at most 2 concurrent exec streams (wait for one to end)"
        );
        // Another team and another kind are not affected.
        let _pb = c.acquire(&caps, b, Kind::Exec).unwrap();
        let _pt = c.acquire(&caps, a, Kind::Transfer).unwrap();
        assert!(c.acquire(&caps, a, Kind::Transfer).is_err());
        drop(p1);
        assert_eq!(c.in_use(a, Kind::Exec), 1);
        let _p3 = c.acquire(&caps, a, Kind::Exec).unwrap();
    }
}

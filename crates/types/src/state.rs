//! Sandbox lifecycle states and the one table of transitions between them,
//! shared by the host agent (its actors) and the control plane (its rows).
//!
//! ```text
//!  pending -> starting -> running <----> paused
//!                |        |   ^  \        ^  |
//!                |        v   |   v       |  v
//!                |     pausing-+  resuming-+  (pausing reverts to running,
//!                |                            resuming reverts to paused)
//!                v
//!  starting | running | paused | error -> stopping -> stopped
//!  any -> error
//! ```
//!
//! The control plane records `paused` before it asks the host to pause (and
//! reverts to `running` if the host fails), so it goes `running -> paused`
//! directly; the agent walks through `pausing`/`resuming` while the VMM works.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Recorded by the control plane, not yet sent to a host.
    Pending,
    /// The host is booting or restoring it.
    Starting,
    Running,
    /// vCPUs frozen, state being saved; becomes `paused` or back `running`.
    Pausing,
    /// No VM process: memory, device state and disk are kept on the host.
    Paused,
    /// Being restored from its pause; becomes `running` or back `paused`.
    Resuming,
    /// Being destroyed.
    Stopping,
    /// Gone (kept as a row for a while).
    Stopped,
    Error,
}

/// A state change the table does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {from} sandbox cannot become {to}")]
pub struct BadTransition {
    pub from: SandboxState,
    pub to: SandboxState,
}

/// A state string that is not one of [`SandboxState`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sandbox state {0:?}")]
pub struct UnknownState(pub String);

impl SandboxState {
    pub const ALL: [SandboxState; 9] = [
        Self::Pending,
        Self::Starting,
        Self::Running,
        Self::Pausing,
        Self::Paused,
        Self::Resuming,
        Self::Stopping,
        Self::Stopped,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Pausing => "pausing",
            Self::Paused => "paused",
            Self::Resuming => "resuming",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }

    /// The one transition table. Staying in the same state is not a transition.
    pub fn can_become(self, to: SandboxState) -> bool {
        use SandboxState::*;
        match (self, to) {
            (Stopped, _) => false,
            (_, Error) => self != Error,
            (Pending, Starting | Stopped) => true,
            (Starting, Running | Stopping | Stopped) => true,
            (Running, Pausing | Paused | Stopping | Stopped) => true,
            (Pausing, Paused | Running) => true,
            (Paused, Resuming | Running | Starting | Stopping | Stopped) => true,
            (Resuming, Running | Paused) => true,
            (Stopping, Stopped) => true,
            (Error, Stopping | Stopped) => true,
            _ => false,
        }
    }

    /// `Ok(to)` when [`SandboxState::can_become`] allows it.
    pub fn transition(self, to: SandboxState) -> Result<SandboxState, BadTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(BadTransition { from: self, to })
        }
    }

    /// Whether the sandbox may hold resources on a host (a VM, or a paused
    /// snapshot's files).
    pub fn is_active(self) -> bool {
        !matches!(self, Self::Stopped | Self::Error)
    }

    /// Whether a VM process runs (or is being started or saved) for it: what
    /// host memory and vCPU admission count.
    pub fn holds_vm(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Pausing | Self::Resuming | Self::Stopping
        )
    }

    /// Whether the transition is in progress (the owner is working on it).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Pending | Self::Starting | Self::Pausing | Self::Resuming | Self::Stopping
        )
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::SandboxState::*;
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in SandboxState::ALL {
            assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("frozen".parse::<SandboxState>().is_err());
    }

    #[test]
    fn the_table() {
        // The life of a paused and resumed sandbox.
        let path = [
            Pending, Starting, Running, Pausing, Paused, Resuming, Running, Stopping, Stopped,
        ];
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{} -> {}", w[0], w[1]);
        }
        // Reverts of failed pause and resume; the control plane's direct moves.
        for (a, b) in [
            (Pausing, Running),
            (Resuming, Paused),
            (Running, Paused),
            (Paused, Running),
        ] {
            assert!(a.can_become(b), "{a} -> {b}");
        }
        // Never.
        for (a, b) in [
            (Stopped, Running),
            (Stopped, Error),
            (Paused, Pausing),
            (Pausing, Resuming),
            (Resuming, Pausing),
            (Starting, Paused),
            (Error, Running),
            (Pending, Paused),
            (Stopping, Running),
        ] {
            assert!(!a.can_become(b), "{a} -> {b}");
            assert_eq!(a.transition(b), Err(BadTransition { from: a, to: b }));
        }
        for s in SandboxState::ALL {
            assert!(!s.can_become(s), "{s} -> {s}");
            if s != Stopped && s != Error {
                assert!(s.can_become(Error));
            }
        }
    }

    #[test]
    fn predicates() {
        assert!(Paused.is_active() && !Paused.holds_vm());
        assert!(Running.holds_vm() && Pausing.holds_vm() && Resuming.holds_vm());
        assert!(!Stopped.is_active() && !Error.is_active());
        assert!(Pausing.is_transient() && !Paused.is_transient());
    }
}

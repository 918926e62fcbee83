//! Fault injection at named steps of the lifecycle operations, for tests of the
//! failure and crash paths (pause, resume, snapshot, fork).
//!
//! Each step calls [`Faults::check`] with its name (e.g. `"pause:saved"`). With
//! nothing armed (production) that is a map lookup. A test arms a step with
//! [`Fault::Fail`] (the step returns an error, as if its tool had failed) or
//! [`Fault::Hang`] (the step never returns: the test then drops the agent with
//! `RunningAgent::abort`, which is what a `kill -9` of the agent does to its
//! tasks while its VMs live on), or [`Fault::Delay`] (the step waits, then goes on:
//! an operation that is slow on its host, for tests of what happens meanwhile).
//! `HEARTH_AGENT_FAULTS=step=fail,step=hang,step=kill,step=delay:MS` arms steps in a
//! separate agent process; `kill` SIGKILLs the agent itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What an armed step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Fail,
    Hang,
    /// SIGKILL this process (for agents run as their own process).
    Kill,
    /// Wait this long, then carry on.
    Delay(std::time::Duration),
}

/// Longest delay a step may be given (a test's, never a hang in disguise).
const MAX_DELAY_MS: u64 = 60_000;

/// The steps armed in this agent (shared by clones of the config).
#[derive(Debug, Clone, Default)]
pub struct Faults(Arc<Mutex<HashMap<String, Fault>>>);

/// An injected failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("fault injected at step {0}")]
pub struct Injected(pub String);

impl Faults {
    /// Parse `step=fail|hang|kill|delay:MS` pairs separated by commas.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let faults = Faults::default();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (step, action) = pair
                .split_once('=')
                .ok_or_else(|| format!("fault {pair:?} is not step=fail|hang|kill|delay:MS"))?;
            let action = match action.split_once(':') {
                None if action == "fail" => Fault::Fail,
                None if action == "hang" => Fault::Hang,
                None if action == "kill" => Fault::Kill,
                Some(("delay", ms)) => match ms.parse::<u64>() {
                    Ok(ms) if ms <= MAX_DELAY_MS => {
                        Fault::Delay(std::time::Duration::from_millis(ms))
                    }
                    _ => {
                        return Err(format!(
                        "fault delay {ms:?} is not a number of milliseconds up to {MAX_DELAY_MS}"
                    ))
                    }
                },
                _ => {
                    return Err(format!(
                        "unknown fault action {action:?} (fail, hang, kill, delay:MS)"
                    ))
                }
            };
            faults.arm(step, action);
        }
        Ok(faults)
    }

    /// Arm `step` (replacing what it had).
    pub fn arm(&self, step: &str, fault: Fault) {
        self.lock().insert(step.to_owned(), fault);
    }

    /// Disarm every step.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fault>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the step `step`: fails, hangs or kills when armed.
    pub async fn check(&self, step: &str) -> Result<(), Injected> {
        let armed = self.lock().get(step).copied();
        match armed {
            None => Ok(()),
            Some(Fault::Fail) => {
                tracing::warn!(step, "injected failure");
                Err(Injected(step.to_owned()))
            }
            Some(Fault::Hang) => {
                tracing::warn!(step, "injected hang");
                std::future::pending().await
            }
            Some(Fault::Delay(d)) => {
                tracing::warn!(step, ms = d.as_millis() as u64, "injected delay");
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Kill) => {
                tracing::warn!(step, "injected kill -9 of the agent");
                // SAFETY: kill(2) on our own pid; no memory is involved.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                std::future::pending().await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn armed_steps_fail_and_others_pass() {
        let f = Faults::parse("pause:saved=fail, resume:restored=hang").unwrap();
        assert!(f.check("pause:frozen").await.is_ok());
        assert_eq!(
            f.check("pause:saved").await.unwrap_err().to_string(),
            "fault injected at step pause:saved"
        );
        let hang = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            f.check("resume:restored"),
        );
        assert!(hang.await.is_err(), "a hang must not return");
        f.clear();
        assert!(f.check("pause:saved").await.is_ok());
        let f = Faults::parse("snapshot:start=delay:30").unwrap();
        let t = std::time::Instant::now();
        assert!(f.check("snapshot:start").await.is_ok());
        assert!(t.elapsed() >= std::time::Duration::from_millis(30));
        assert!(Faults::parse("x=delay:soon").is_err());
        assert!(Faults::parse("x=delay:600000").is_err());
        assert!(Faults::parse("x").is_err());
        assert!(Faults::parse("x=explode").is_err());
    }
}

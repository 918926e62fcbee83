//! Who may reach a port of a sandbox through the sandbox proxy, and the host that
//! serves it. The proxy's requests carry no API key (browsers and E2B's SDKs send
//! none to sandbox URLs): the sandbox ID names the sandbox, and its guest agent's port
//! needs the sandbox's envd access token when the sandbox is `secure` (the default).
//! Other ports are public to whoever knows the ID, as in E2B (a user's web app).
//! A paused sandbox created with auto-resume is resumed by the first request.

use std::sync::Arc;

use hearth_db::SandboxState;
use hearth_types::SandboxId;

use super::e2b_tokens::TokenKind;
use super::hosts::HostClient;
use super::{App, AppError};

/// The guest agent's port (envd's).
pub const ENVD_PORT: u16 = 49983;

/// Why the proxy refuses a request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No such sandbox, or it is gone (E2B's SDKs look for "was not found").
    #[error("The sandbox {0} was not found")]
    NotFound(SandboxId),
    #[error("missing or wrong X-Access-Token for sandbox {0}: use the envdAccessToken of its create or connect response")]
    Unauthorized(SandboxId),
    #[error("The sandbox {id} is {state}: {hint}")]
    NotRunning {
        id: SandboxId,
        state: SandboxState,
        hint: &'static str,
    },
    #[error(transparent)]
    App(#[from] AppError),
}

impl App {
    /// The host to send a request for `port` of `id` to, after checking the caller's
    /// `token` (its `X-Access-Token`) and resuming an auto-resume sandbox.
    pub async fn open_sandbox_port(
        self: &Arc<Self>,
        id: &SandboxId,
        port: u16,
        token: Option<&str>,
    ) -> Result<Arc<dyn HostClient>, ProxyError> {
        let row = self
            .db
            .get_sandbox_unscoped(id)
            .await
            .map_err(AppError::from)?
            .ok_or_else(|| ProxyError::NotFound(id.clone()))?;
        if port == ENVD_PORT && row.secure {
            let ok = match token {
                Some(t) => self.check_access_token(TokenKind::Envd, id, t).await?,
                None => false,
            };
            if !ok {
                return Err(ProxyError::Unauthorized(id.clone()));
            }
        }
        let row = match row.state {
            SandboxState::Running => row,
            SandboxState::Paused if row.auto_resume => {
                match self.resume_sandbox(row.team_id, id, None).await {
                    Ok(row) => row,
                    // Another request resumed it meanwhile.
                    Err(AppError::Conflict(_)) => self.get_sandbox(row.team_id, id).await?,
                    Err(e) => return Err(e.into()),
                }
            }
            SandboxState::Paused => {
                return Err(ProxyError::NotRunning {
                    id: id.clone(),
                    state: row.state,
                    hint: "resume it first (Sandbox.connect, or create it with auto-resume)",
                })
            }
            SandboxState::Stopped | SandboxState::Stopping | SandboxState::Error => {
                return Err(ProxyError::NotFound(id.clone()))
            }
            state => {
                return Err(ProxyError::NotRunning {
                    id: id.clone(),
                    state,
                    hint: "try again in a moment",
                })
            }
        };
        if row.state != SandboxState::Running {
            return Err(ProxyError::NotRunning {
                id: id.clone(),
                state: row.state,
                hint: "try again in a moment",
            });
        }
        Ok(self.host_of(&row)?)
    }
}

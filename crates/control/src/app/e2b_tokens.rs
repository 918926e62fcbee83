//! The per-sandbox secrets a client shows the sandbox proxy: the envd access token
//! (E2B's `envdAccessToken`, sent as `X-Access-Token` to the guest agent's port) and
//! the traffic access token (E2B's `trafficAccessToken`, for the sandbox's other
//! ports when they are not public).
//!
//! Each is an HMAC-SHA256 of the sandbox ID under a key made once per deployment and
//! kept in the database (`secrets`), so nothing per sandbox is stored, every control
//! plane on the database derives the same token, and a token stays valid across
//! pauses, resumes and control-plane restarts for the sandbox's whole life. It is not
//! the guest's own access token: the host agent swaps that in, and rotates it on
//! every resume, so a client never holds a secret the guest knows.

use base64::Engine;
use hearth_types::SandboxId;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::{App, AppError, AppResult};

/// Name of the key in the `secrets` table.
const KEY_NAME: &str = "sandbox-access-token-key";

/// What a token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// The guest agent's port (49983).
    Envd,
    /// Any other port of the sandbox.
    Traffic,
}

impl TokenKind {
    fn label(self) -> &'static [u8] {
        match self {
            TokenKind::Envd => b"hearth envd access token v1\0",
            TokenKind::Traffic => b"hearth traffic access token v1\0",
        }
    }
}

impl App {
    async fn token_key(&self) -> AppResult<&[u8]> {
        let key = self
            .token_key
            .get_or_try_init(|| async {
                self.db
                    .get_or_create_secret(KEY_NAME, || {
                        let mut k = vec![0u8; 32];
                        rand::thread_rng().fill_bytes(&mut k);
                        k
                    })
                    .await
            })
            .await?;
        if key.len() < 32 {
            return Err(AppError::Internal(format!(
                "the secret '{KEY_NAME}' in the database is too short"
            )));
        }
        Ok(key.as_slice())
    }

    fn mac(key: &[u8], kind: TokenKind, id: &SandboxId) -> AppResult<Hmac<Sha256>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key)
            .map_err(|e| AppError::Internal(format!("token key: {e}")))?;
        mac.update(kind.label());
        mac.update(id.as_str().as_bytes());
        Ok(mac)
    }

    /// The token of `kind` for sandbox `id`.
    pub async fn access_token(&self, kind: TokenKind, id: &SandboxId) -> AppResult<String> {
        let mac = Self::mac(self.token_key().await?, kind, id)?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    /// E2B's `envdAccessToken` of `id`.
    pub async fn envd_access_token(&self, id: &SandboxId) -> AppResult<String> {
        self.access_token(TokenKind::Envd, id).await
    }

    /// E2B's `trafficAccessToken` of `id`.
    pub async fn traffic_access_token(&self, id: &SandboxId) -> AppResult<String> {
        self.access_token(TokenKind::Traffic, id).await
    }

    /// Whether `presented` is the token of `kind` for `id` (compared in constant time).
    pub async fn check_access_token(
        &self,
        kind: TokenKind,
        id: &SandboxId,
        presented: &str,
    ) -> AppResult<bool> {
        let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(presented.trim())
        else {
            return Ok(false);
        };
        let mac = Self::mac(self.token_key().await?, kind, id)?;
        Ok(mac.verify_slice(&raw).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_db::Db;
    use hearth_types::SandboxLimits;

    async fn app(db: Db) -> App {
        App::new(db, vec![], SandboxLimits::default(), 1 << 20)
    }

    #[tokio::test]
    async fn tokens_are_stable_per_sandbox_and_kind_and_verify() {
        let db = Db::connect_in_memory().await.unwrap();
        let a = app(db.clone()).await;
        let id = SandboxId::generate();
        let other = SandboxId::generate();
        let t = a.envd_access_token(&id).await.unwrap();
        assert_eq!(t, a.envd_access_token(&id).await.unwrap());
        assert_ne!(t, a.envd_access_token(&other).await.unwrap());
        assert_ne!(t, a.traffic_access_token(&id).await.unwrap());
        assert!(a
            .check_access_token(TokenKind::Envd, &id, &t)
            .await
            .unwrap());
        assert!(!a
            .check_access_token(TokenKind::Traffic, &id, &t)
            .await
            .unwrap());
        assert!(!a
            .check_access_token(TokenKind::Envd, &other, &t)
            .await
            .unwrap());
        assert!(!a
            .check_access_token(TokenKind::Envd, &id, "")
            .await
            .unwrap());
        assert!(!a
            .check_access_token(TokenKind::Envd, &id, "%%%")
            .await
            .unwrap());
        let mut forged = t.clone();
        forged.replace_range(0..1, if t.starts_with('A') { "B" } else { "A" });
        assert!(!a
            .check_access_token(TokenKind::Envd, &id, &forged)
            .await
            .unwrap());
        // A second control plane on the same database derives the same token.
        let b = app(db).await;
        assert_eq!(b.envd_access_token(&id).await.unwrap(), t);
    }
}

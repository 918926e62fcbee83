//! `/v1/webhooks`: a team's webhooks (see `app::webhooks` for delivery and signing).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::{ApiJson, AppState, Caller};

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookRequest {
    /// An http or https URL, at most 2048 bytes; loopback, private and link-local
    /// addresses are refused unless the operator allows them.
    pub url: String,
    /// Action patterns: `*` (default), `sandbox.*`, or an action such as `sandbox.create`.
    pub events: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookInfo {
    /// `wh-` and 12 characters.
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    /// RFC 3339
    pub created_at: String,
    /// The last audit entry (event ID) delivered or skipped.
    pub cursor: i64,
    /// Failed deliveries in a row.
    pub failures: u32,
    pub last_error: Option<String>,
    /// RFC 3339
    pub last_delivery_at: Option<String>,
    /// RFC 3339; set after too many failures in a row: nothing more is sent.
    pub disabled_at: Option<String>,
}

impl From<hearth_db::Webhook> for WebhookInfo {
    fn from(w: hearth_db::Webhook) -> Self {
        WebhookInfo {
            id: w.id.to_string(),
            url: w.url,
            events: w.events,
            created_at: w.created_at.to_rfc3339(),
            cursor: w.cursor,
            failures: w.failures,
            last_error: w.last_error,
            last_delivery_at: w.last_delivery_at.map(|t| t.to_rfc3339()),
            disabled_at: w.disabled_at.map(|t| t.to_rfc3339()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedWebhook {
    pub webhook: WebhookInfo,
    /// Signs every delivery (`hearth-signature: v1=<hex HMAC-SHA256(secret,
    /// "<hearth-timestamp>.<body>")>`); shown once.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<WebhookInfo>,
}

#[utoipa::path(post, path = "/v1/webhooks", request_body = CreateWebhookRequest,
    responses((status = 201, body = CreatedWebhook, description = "Entries from now on are delivered."),
        (status = 400, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "The team has the most webhooks it may have.")),
    security(("api_key" = []), ("session" = [])))]
pub async fn create_webhook(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateWebhookRequest>,
) -> ApiResult<(StatusCode, Json<CreatedWebhook>)> {
    let (hook, secret) = s.app.create_webhook(&caller, &req.url, req.events).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedWebhook {
            webhook: hook.into(),
            secret,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/webhooks",
    responses((status = 200, body = WebhookList)),
    security(("api_key" = []), ("session" = [])))]
pub async fn list_webhooks(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<WebhookList>> {
    let hooks = s.app.list_webhooks(&caller).await?;
    Ok(Json(WebhookList {
        webhooks: hooks.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(delete, path = "/v1/webhooks/{webhook_id}", params(("webhook_id" = String, Path)),
    responses((status = 204, description = "Removed; nothing more is sent."),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = []), ("session" = [])))]
pub async fn delete_webhook(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.app.delete_webhook(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

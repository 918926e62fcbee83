//! The OpenAPI document, generated from the handlers' annotations.

use axum::Json;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ErrorBody, ErrorDetail};
use super::handlers;
use super::types::*;

struct Security;

impl Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "hearth", description = "Public REST API of the hearth control plane. \
        The WebSocket exec (GET /v1/sandboxes/{id}/exec/ws) is described in docs/contracts.md."),
    paths(
        handlers::health,
        handlers::create_sandbox,
        handlers::list_sandboxes,
        handlers::get_sandbox,
        handlers::delete_sandbox,
        handlers::exec,
        handlers::upload_file,
        handlers::download_file,
        handlers::list_templates,
    ),
    components(schemas(ErrorBody, ErrorDetail, Health, CreateSandboxRequest, Sandbox, SandboxList,
        ExecRequest, PtySize, ExecResponse, FileWritten, TemplateInfo, TemplateList)),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn spec_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

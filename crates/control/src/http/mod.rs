//! HTTP edge of the control plane: routing, auth, body limits, input parsing, and the
//! mapping of errors to responses. Handlers parse and validate, call `app`, and turn
//! the result into JSON; they hold no logic of their own.

mod docs;
pub mod e2b;
pub mod error;
mod handlers;
pub mod hosts;
pub mod openapi;
pub mod reject;
mod sandbox_proxy;
pub use hearth_serve as server;
pub mod types;
pub mod users;
pub mod webhooks;
mod ws;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hearth_db::Principal;

use crate::app::{App, AppError};
use error::ApiError;
pub use reject::ApiJson;

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) app: Arc<App>,
}

impl AppState {
    pub fn new(app: App) -> Self {
        Self { app: Arc::new(app) }
    }

    pub fn app(&self) -> &Arc<App> {
        &self.app
    }
}

/// The public REST API under `/v1`.
pub fn router(state: AppState) -> Router {
    router_with(state, &crate::Extensions::new())
}

/// The public REST API with a deployment's extra routes (see [`crate::extend`]); its
/// workers are started by [`crate::start_with`], not here. Panics when an extra route
/// takes a method and path the API serves (axum refuses overlapping routes).
pub fn router_with(state: AppState, ext: &crate::Extensions) -> Router {
    let (ext_authed, ext_public) = ext.routes();
    let authed = Router::new()
        .route(
            "/v1/sandboxes",
            get(handlers::list_sandboxes).post(handlers::create_sandbox),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(handlers::get_sandbox).delete(handlers::delete_sandbox),
        )
        .route(
            "/v1/sandboxes/{id}/exec",
            axum::routing::post(handlers::exec),
        )
        .route("/v1/sandboxes/{id}/exec/ws", get(ws::exec_ws))
        .route(
            "/v1/sandboxes/{id}/files",
            get(handlers::download_file).put(handlers::upload_file),
        )
        .route(
            "/v1/sandboxes/{id}/pause",
            axum::routing::post(handlers::pause_sandbox),
        )
        .route(
            "/v1/sandboxes/{id}/resume",
            axum::routing::post(handlers::resume_sandbox),
        )
        .route(
            "/v1/sandboxes/{id}/timeout",
            axum::routing::post(handlers::set_timeout),
        )
        .route(
            "/v1/sandboxes/{id}/snapshots",
            axum::routing::post(handlers::snapshot_sandbox),
        )
        .route(
            "/v1/sandboxes/{id}/fork",
            axum::routing::post(handlers::fork_sandbox),
        )
        .route(
            "/v1/sandboxes/{id}/processes",
            get(handlers::list_processes),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/connect",
            axum::routing::post(handlers::connect_process),
        )
        .route("/v1/sandboxes/{id}/metrics", get(handlers::sandbox_metrics))
        .route("/v1/templates", get(handlers::list_templates))
        .route(
            "/v1/keys",
            get(handlers::list_keys).post(handlers::create_key),
        )
        .route(
            "/v1/keys/{key_id}",
            axum::routing::delete(handlers::revoke_key),
        )
        .route(
            "/v1/admin/teams",
            get(handlers::admin_list_teams).post(handlers::admin_create_team),
        )
        .route(
            "/v1/admin/teams/{team_id}/keys",
            get(handlers::admin_list_team_keys).post(handlers::admin_create_team_key),
        )
        .route(
            "/v1/admin/keys/{key_id}",
            axum::routing::delete(handlers::admin_revoke_key),
        )
        .route("/v1/admin/templates", get(handlers::admin_list_templates))
        .route(
            "/v1/admin/hosts",
            get(hosts::admin_list_hosts).post(hosts::admin_create_host),
        )
        .route(
            "/v1/admin/hosts/{id}",
            get(hosts::admin_get_host).delete(hosts::admin_revoke_host),
        )
        .route(
            "/v1/admin/hosts/{id}/drain",
            axum::routing::post(hosts::admin_drain_host),
        )
        .route(
            "/v1/admin/hosts/{id}/undrain",
            axum::routing::post(hosts::admin_undrain_host),
        )
        .route("/v1/audit", get(handlers::list_audit))
        .route("/v1/events", get(handlers::events))
        .route(
            "/v1/templates/{name}",
            get(handlers::get_template).delete(handlers::delete_template),
        )
        .route(
            "/v1/webhooks",
            get(webhooks::list_webhooks).post(webhooks::create_webhook),
        )
        .route(
            "/v1/webhooks/{webhook_id}",
            axum::routing::delete(webhooks::delete_webhook),
        )
        .route("/v1/auth/logout", axum::routing::post(users::logout))
        .route("/v1/me", get(users::me))
        .route(
            "/v1/admin/users",
            get(users::admin_list_users).post(users::admin_create_user),
        )
        .route(
            "/v1/admin/users/{user_id}",
            axum::routing::delete(users::admin_disable_user),
        )
        .merge(ext_authed)
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        // Outside auth: refused keys are counted too.
        .route_layer(middleware::from_fn_with_state(state.clone(), track));
    Router::new()
        .route("/v1/health", get(handlers::health))
        // The enrollment token is its only credential (no API key).
        .route("/v1/hosts/enroll", axum::routing::post(hosts::enroll_host))
        .route("/metrics", get(prometheus))
        .route("/v1/openapi.json", get(openapi::serve))
        .route(
            "/v1/auth/login",
            axum::routing::post(users::login)
                .route_layer(middleware::from_fn_with_state(state.clone(), track)),
        )
        .route("/openapi.json", get(openapi::serve))
        .route("/docs", get(docs::serve))
        .merge(authed)
        .merge(ext_public)
        .merge(e2b::router(state.clone()))
        .fallback(|uri: axum::http::Uri| async move {
            if e2b::is_e2b_path(uri.path()) {
                return e2b::not_served(uri.path());
            }
            ApiError(AppError::NotFound("no such API endpoint".into())).into_response()
        })
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(middleware::from_fn(reject::json_errors))
        // Outermost: sandbox traffic never reaches the API's routes, limits or errors.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            sandbox_proxy::route,
        ))
        .with_state(state)
}

/// `Authorization: Bearer <key>` or `X-API-Key: <key>`, else a signed-in session's
/// `hearth_session` cookie -> [`Principal`] in the request's extensions; anything else
/// is 401. A request that names a key is judged by that key alone (a bad key is not
/// rescued by a cookie).
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| {
            let named =
                headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key");
            (!named).then(|| session_cookie(headers)).flatten()
        })
        .map(str::to_owned);
    match run_authenticated(&state.app, key.as_deref(), req, next).await {
        Ok(resp) => resp,
        Err(e) => ApiError(e).into_response(),
    }
}

/// The value of the `hearth_session` cookie, if the request has one.
fn session_cookie(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == users::SESSION_COOKIE).then_some(value)
        })
}

/// Look the API key `key` up and, when it is valid, run the rest of the request with
/// its [`Principal`] in the extensions and under [`crate::app::audit::as_caller`].
/// Every edge's auth middleware (`/v1`, E2B's) ends here; each only finds the key in
/// its own headers and shapes the refusal (`Unauthenticated` or `Db`) its own way.
pub(crate) async fn run_authenticated(
    app: &App,
    key: Option<&str>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let key = key
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 256)
        .ok_or(AppError::Unauthenticated)?;
    let principal = app
        .db
        .authenticate(key)
        .await
        .map_err(AppError::Db)?
        .ok_or(AppError::Unauthenticated)?;
    let key_id = principal.key_id.clone();
    req.extensions_mut().insert(principal);
    Ok(crate::app::audit::as_caller(key_id, next.run(req)).await)
}

/// Count the request and its latency under its route template (matched routes only).
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    if let Some(route) = route {
        state.app.metrics.observe_request(
            method.as_str(),
            &route,
            resp.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
    }
    resp
}

/// `GET /metrics`: Prometheus' text format, no API key (aggregates only: no label
/// names a team, key or sandbox).
async fn prometheus(State(state): State<AppState>) -> Response {
    match state.app.render_metrics().await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

/// The caller (team, key, admin or not), set by the auth middleware: an extractor for
/// handlers behind it, the built-in ones and [`crate::Extensions::route`]'s.
pub type Caller = axum::Extension<Principal>;

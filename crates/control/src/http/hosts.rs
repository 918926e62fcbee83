//! `/v1/admin/hosts` (admins: create, list, get, drain, undrain, revoke) and
//! `POST /v1/hosts/enroll` (no API key: the one-time enrollment token is the only
//! credential). Logic is in `app::fleet`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::{ApiJson, AppState, Caller};
use crate::app::fleet::parse_host_id;

type ApiResult<T> = Result<T, ApiError>;

/// Body of `POST /v1/admin/hosts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateHostRequest {
    /// Unique; lowercase letters, digits and '-' (at most 63).
    pub name: String,
    /// Where the control plane reaches the agent: an https URL of HOST:PORT.
    pub url: String,
}

/// Capacity and load from the host's last heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct HostLoadInfo {
    pub memory_capacity_mb: u64,
    pub memory_used_mb: u64,
    pub vcpu_capacity: u64,
    pub vcpus_used: u64,
    pub disk_free_mb: u64,
    /// Sandboxes on the host.
    pub running: u64,
}

/// A host agent as the control plane records it.
#[derive(Debug, Serialize, ToSchema)]
pub struct HostInfoBody {
    pub id: String,
    /// Null for a static host (`hearth server --agent-url`).
    pub name: Option<String>,
    pub url: String,
    /// pending, active, draining, unreachable or revoked.
    pub status: String,
    /// An admin drained it (kept while it is unreachable).
    pub drain: bool,
    pub vmm: String,
    pub accel: String,
    /// RFC 3339
    pub created_at: String,
    pub enrolled_at: Option<String>,
    /// When the enrollment token stops working (pending hosts).
    pub enroll_expires_at: Option<String>,
    pub last_heartbeat_at: Option<String>,
    /// SHA-256 of the certificate issued at enrollment (the only one accepted).
    pub cert_fingerprint: Option<String>,
    pub load: HostLoadInfo,
}

impl From<hearth_db::Host> for HostInfoBody {
    fn from(h: hearth_db::Host) -> Self {
        HostInfoBody {
            id: h.id.to_string(),
            name: h.name,
            url: h.url,
            status: h.status.as_str().into(),
            drain: h.drain,
            vmm: h.vmm,
            accel: h.accel,
            created_at: h.created_at.to_rfc3339(),
            enrolled_at: h.enrolled_at.map(|t| t.to_rfc3339()),
            enroll_expires_at: h.enroll_expires_at.map(|t| t.to_rfc3339()),
            last_heartbeat_at: h.last_heartbeat_at.map(|t| t.to_rfc3339()),
            cert_fingerprint: h.cert_fingerprint,
            load: HostLoadInfo {
                memory_capacity_mb: h.load.memory_capacity_mb,
                memory_used_mb: h.load.memory_used_mb,
                vcpu_capacity: h.load.vcpu_capacity,
                vcpus_used: h.load.vcpus_used,
                disk_free_mb: h.load.disk_free_mb,
                running: h.load.running,
            },
        }
    }
}

/// A new host and its enrollment token, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedHost {
    pub host: HostInfoBody,
    /// Give it to `hearth agent --enroll-token`; works once, until `enroll_expires_at`.
    pub enrollment_token: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HostList {
    pub hosts: Vec<HostInfoBody>,
}

/// Body of `POST /v1/hosts/enroll`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The one-time token from `POST /v1/admin/hosts`.
    pub token: String,
    /// PEM certificate signing request of the agent's own key (only the key is used).
    pub csr: String,
}

/// What an enrolled agent keeps: its certificate and the CA's.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnrollResponse {
    pub host_id: String,
    /// PEM; names the host (DNS SAN `<host_id>.hosts.hearth`), server auth only.
    pub certificate: String,
    /// PEM of the deployment CA: the agent accepts clients it issued.
    pub ca_certificate: String,
}

#[utoipa::path(post, path = "/v1/admin/hosts", request_body = CreateHostRequest,
    responses((status = 201, body = CreatedHost), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody, description = "The name is taken.")),
    security(("api_key" = [])))]
pub async fn admin_create_host(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateHostRequest>,
) -> ApiResult<(StatusCode, Json<CreatedHost>)> {
    let new = s.app.create_host(&caller, &req.name, &req.url).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedHost {
            host: new.host.into(),
            enrollment_token: new.token,
        }),
    ))
}

#[utoipa::path(get, path = "/v1/admin/hosts",
    responses((status = 200, body = HostList), (status = 403, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn admin_list_hosts(
    State(s): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<HostList>> {
    let hosts = s.app.list_hosts(&caller).await?;
    Ok(Json(HostList {
        hosts: hosts.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/admin/hosts/{id}", params(("id" = String, Path)),
    responses((status = 200, body = HostInfoBody), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn admin_get_host(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfoBody>> {
    crate::app::accounts::require_admin(&caller)?;
    let id = parse_host_id(&id)?;
    Ok(Json(s.app.get_host(&caller, &id).await?.into()))
}

#[utoipa::path(post, path = "/v1/admin/hosts/{id}/drain", params(("id" = String, Path)),
    responses((status = 200, body = HostInfoBody, description = "No new sandboxes go there; running ones stay."),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Revoked or static.")),
    security(("api_key" = [])))]
pub async fn admin_drain_host(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfoBody>> {
    crate::app::accounts::require_admin(&caller)?;
    let id = parse_host_id(&id)?;
    Ok(Json(s.app.drain_host(&caller, &id, true).await?.into()))
}

#[utoipa::path(post, path = "/v1/admin/hosts/{id}/undrain", params(("id" = String, Path)),
    responses((status = 200, body = HostInfoBody), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "Revoked or static.")),
    security(("api_key" = [])))]
pub async fn admin_undrain_host(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfoBody>> {
    crate::app::accounts::require_admin(&caller)?;
    let id = parse_host_id(&id)?;
    Ok(Json(s.app.drain_host(&caller, &id, false).await?.into()))
}

#[utoipa::path(delete, path = "/v1/admin/hosts/{id}", params(("id" = String, Path)),
    responses((status = 200, body = HostInfoBody, description = "Revoked: its token and certificate are refused from now on."),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Already revoked, or static.")),
    security(("api_key" = [])))]
pub async fn admin_revoke_host(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<HostInfoBody>> {
    crate::app::accounts::require_admin(&caller)?;
    let id = parse_host_id(&id)?;
    Ok(Json(s.app.revoke_host(&caller, &id).await?.into()))
}

#[utoipa::path(post, path = "/v1/hosts/enroll", request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "Unknown, used, expired or revoked token.")))]
pub async fn enroll_host(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> ApiResult<Json<EnrollResponse>> {
    let e = s.app.enroll_host(&req.token, &req.csr).await?;
    Ok(Json(EnrollResponse {
        host_id: e.host_id.to_string(),
        certificate: e.certificate_pem,
        ca_certificate: e.ca_certificate_pem,
    }))
}

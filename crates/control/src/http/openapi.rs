//! The OpenAPI document: generated from the handlers' annotations, then completed here
//! with what cuts across handlers, so that it says exactly what the server does:
//! the errors of the middleware (401 of auth; 414 and 431 of the size limits; 413 and
//! 415 of JSON bodies; 500 where the database is read), the numeric bounds of
//! [`SandboxLimits::default`] and the `validate` rules, and required inputs.

use axum::Json;
use hearth_types::{SandboxLimits, SandboxShape};
use serde_json::{json, Value};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ErrorBody, ErrorDetail};
use super::handlers;
use super::hosts;
use super::types::*;
use super::users;
use super::webhooks;
use crate::app::{sandboxes, validate};

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
        c.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(users::SESSION_COOKIE))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "hearth", description = "Public REST API of the hearth control plane. \
        Every error is {\"error\":{\"code\",\"message\"}}. JSON bodies need \
        content-type: application/json. \
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
        handlers::pause_sandbox,
        handlers::resume_sandbox,
        handlers::set_timeout,
        handlers::snapshot_sandbox,
        handlers::fork_sandbox,
        handlers::get_template,
        handlers::delete_template,
        handlers::list_processes,
        handlers::connect_process,
        handlers::sandbox_metrics,
        handlers::create_key,
        handlers::list_keys,
        handlers::revoke_key,
        handlers::admin_list_teams,
        handlers::admin_create_team,
        handlers::admin_list_team_keys,
        handlers::admin_create_team_key,
        handlers::admin_revoke_key,
        handlers::admin_list_templates,
        handlers::list_audit,
        handlers::events,
        users::login,
        users::logout,
        users::me,
        users::admin_create_user,
        users::admin_list_users,
        users::admin_disable_user,
        webhooks::create_webhook,
        webhooks::list_webhooks,
        webhooks::delete_webhook,
        hosts::admin_create_host,
        hosts::admin_list_hosts,
        hosts::admin_get_host,
        hosts::admin_drain_host,
        hosts::admin_undrain_host,
        hosts::admin_revoke_host,
        hosts::enroll_host,
    ),
    components(schemas(ErrorBody, ErrorDetail, Health, CreateSandboxRequest, Sandbox, SandboxList,
        ExecRequest, PtySize, ExecResponse, FileWritten, TemplateInfo, TemplateList,
        ResumeRequest, TimeoutRequest, SnapshotRequest, ForkRequest, ForkResponse, ProcessInfo, ProcessList,
        CreateKeyRequest, ApiKeyInfo, CreatedKey, KeyList, CreateTeamRequest, TeamInfo, TeamList,
        SandboxMetricsInfo, AuditEntryInfo, AuditPage,
        users::LoginRequest, users::LoginResponse, users::UserInfo, users::MeResponse,
        users::CreateUserRequest, users::UserList,
        webhooks::CreateWebhookRequest, webhooks::WebhookInfo, webhooks::CreatedWebhook,
        webhooks::WebhookList,
        hosts::CreateHostRequest, hosts::HostInfoBody, hosts::HostLoadInfo, hosts::CreatedHost,
        hosts::HostList, hosts::EnrollRequest, hosts::EnrollResponse)),
    modifiers(&Security)
)]
pub struct ApiDoc;

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// Add `status` to an operation's responses unless the handler already lists it.
fn add(op: &mut Value, status: u16, description: &str) {
    if let Some(r) = op.get_mut("responses").and_then(Value::as_object_mut) {
        r.entry(status.to_string())
            .or_insert_with(|| error_response(description));
    }
}

/// Set keys of the object `target`.
fn set_in(target: &mut Value, values: Value) {
    if let (Some(target), Value::Object(values)) = (target.as_object_mut(), values) {
        target.extend(values);
    }
}

/// An absolute guest path, as `validate::guest_path` accepts it.
fn guest_path() -> Value {
    json!({"pattern": "^/[^\\u0000]*$", "maxLength": validate::MAX_PATH_LEN})
}

/// A guest user name, as `validate::user` accepts it.
fn user() -> Value {
    json!({"pattern": "^[a-z0-9_][a-z0-9_-]{0,31}$"})
}

/// An env map, as `validate::env` accepts it.
fn env_map() -> Value {
    json!({
        "maxProperties": validate::MAX_ENV_VARS,
        "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]{0,255}$"},
        "additionalProperties": {"type": "string", "maxLength": validate::MAX_ENV_VALUE}
    })
}

/// Set keys of the schema at `pointer` (in the document).
fn set(doc: &mut Value, pointer: &str, values: Value) {
    if let (Some(target), Value::Object(values)) = (doc.pointer_mut(pointer), values) {
        if let Some(target) = target.as_object_mut() {
            target.extend(values);
        }
    }
}

/// The groups of operations, in the order `/docs` shows them.
const TAGS: [(&str, &str); 9] = [
    (
        "sandboxes",
        "Create, list, inspect, pause, resume, fork, snapshot and destroy sandboxes.",
    ),
    (
        "exec and files",
        "Run commands in a sandbox, re-attach to its processes, move files in and out.",
    ),
    (
        "templates",
        "What sandboxes are made from: the platform's templates and the team's snapshots.",
    ),
    ("keys", "The calling team's API keys."),
    (
        "admin",
        "Operators (admin keys only): teams, any team's keys, users, hosts, every team's templates.",
    ),
    (
        "audit and events",
        "The team's audit log and its live event stream.",
    ),
    (
        "users and sessions",
        "Signing in with an email and password (a session cookie), and who a request speaks for.",
    ),
    ("webhooks", "The team's events POSTed to its own URLs, signed."),
    ("service", "Health of the control plane, and host agents' enrollment."),
];

/// The group of the operation at `path`.
fn tag_of(path: &str) -> &'static str {
    let sandbox_io = ["/exec", "/exec/ws", "/files", "/processes", "/connect"];
    if path.starts_with("/v1/admin/") {
        "admin"
    } else if path.starts_with("/v1/sandboxes") {
        if sandbox_io.iter().any(|s| path.ends_with(s)) {
            "exec and files"
        } else {
            "sandboxes"
        }
    } else if path.starts_with("/v1/templates") {
        "templates"
    } else if path.starts_with("/v1/keys") {
        "keys"
    } else if path.starts_with("/v1/audit") || path.starts_with("/v1/events") {
        "audit and events"
    } else if path.starts_with("/v1/auth/") || path == "/v1/me" {
        "users and sessions"
    } else if path.starts_with("/v1/webhooks") {
        "webhooks"
    } else {
        "service"
    }
}

/// One line about each operation (by operation ID), shown as its summary.
const SUMMARIES: [(&str, &str); 46] = [
    ("health", "Is the control plane up."),
    (
        "get_template",
        "One template: owner, size, memory or not, source, the hosts that hold it.",
    ),
    (
        "admin_list_hosts",
        "Every host: status, last heartbeat, capacity and load.",
    ),
    (
        "admin_create_host",
        "Add a host; returns its one-time enrollment token.",
    ),
    (
        "admin_revoke_host",
        "Revoke a host: its credential is refused from the next call on.",
    ),
    ("admin_get_host", "One host."),
    ("admin_drain_host", "Send no new sandboxes to a host."),
    (
        "admin_undrain_host",
        "Let a drained host take new sandboxes again.",
    ),
    ("admin_list_users", "Every user, or one team's."),
    (
        "admin_create_user",
        "Make a user who signs in with an email and password.",
    ),
    (
        "admin_disable_user",
        "Disable a user: its sessions end and it can no longer sign in.",
    ),
    (
        "login",
        "Sign in; the session comes back as an HttpOnly cookie.",
    ),
    ("logout", "End the session the request came with."),
    (
        "enroll_host",
        "A host agent trades its enrollment token and CSR for its certificate.",
    ),
    ("me", "The team, key and user the request speaks for."),
    (
        "list_webhooks",
        "The team's webhooks and how far delivery has got.",
    ),
    (
        "create_webhook",
        "Have the team's events POSTed to a URL; returns the signing secret once.",
    ),
    ("delete_webhook", "Remove a webhook."),
    (
        "create_sandbox",
        "Create a sandbox from a template; answers once its guest agent answers.",
    ),
    (
        "list_sandboxes",
        "The team's sandboxes, newest first, a page at a time.",
    ),
    ("get_sandbox", "One sandbox."),
    (
        "delete_sandbox",
        "Destroy a sandbox (its VM, disk and network are released).",
    ),
    (
        "exec",
        "Run a command to its end and return its output and exit code.",
    ),
    (
        "upload_file",
        "Write a file into the sandbox (the body is its content).",
    ),
    ("download_file", "Read a file from the sandbox."),
    (
        "list_templates",
        "Templates the team may create sandboxes from.",
    ),
    (
        "pause_sandbox",
        "Pause a running sandbox, keeping its memory and disk.",
    ),
    ("resume_sandbox", "Resume a paused sandbox where it was."),
    ("set_timeout", "Set a sandbox's lifetime, from now."),
    (
        "snapshot_sandbox",
        "Save a sandbox as a team template, with or without its memory.",
    ),
    ("fork_sandbox", "Make running copies of a running sandbox."),
    (
        "delete_template",
        "Delete a template (platform templates: admins only).",
    ),
    (
        "list_processes",
        "Processes started through the API that still run.",
    ),
    (
        "connect_process",
        "Re-attach to a running process's output.",
    ),
    (
        "sandbox_metrics",
        "CPU, memory and disk use of a running sandbox.",
    ),
    (
        "create_key",
        "Make an API key of the caller's team (its secret is shown once).",
    ),
    ("list_keys", "The caller's team's API keys."),
    (
        "revoke_key",
        "Revoke one of the team's keys; it stops working at once.",
    ),
    ("admin_list_teams", "Every team."),
    ("admin_create_team", "Make a team."),
    ("admin_list_team_keys", "A team's API keys."),
    ("admin_create_team_key", "Make an API key of any team."),
    ("admin_revoke_key", "Revoke any team's key."),
    (
        "admin_list_templates",
        "Every team's templates and the platform's.",
    ),
    (
        "list_audit",
        "The team's audit log, newest first, a page at a time.",
    ),
    (
        "events",
        "The team's audit entries as they are written (server-sent events).",
    ),
];

/// The document as served and checked in.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    doc["tags"] = TAGS
        .iter()
        .map(|(name, description)| json!({"name": name, "description": description}))
        .collect();
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (path, item) in paths.iter_mut() {
            let Some(ops) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in ops.iter_mut() {
                op["tags"] = json!([tag_of(path)]);
                let summary = op["operationId"]
                    .as_str()
                    .and_then(|id| SUMMARIES.iter().find(|(k, _)| *k == id));
                if let Some((_, summary)) = summary {
                    op["summary"] = json!(summary);
                }
                add(op, 414, "The request target is longer than 8 KiB.");
                add(op, 431, "The request headers are larger than 32 KiB.");
                if op.get("security").is_some() {
                    add(op, 401, "No API key, or not a valid one.");
                    add(op, 500, "Internal error (details in the server log).");
                }
                let json_body = op
                    .pointer("/requestBody/content/application~1json")
                    .is_some();
                if json_body {
                    add(op, 400, "Malformed JSON or an invalid field.");
                    add(op, 413, "The JSON body is larger than 1 MiB.");
                    add(op, 415, "The body's content type is not JSON.");
                }
                if path.starts_with("/v1/admin/") {
                    add(op, 403, "The key is not an admin's (forbidden).");
                }
                if path.contains("{key_id}") || path.contains("{team_id}") {
                    add(op, 400, "Malformed key or team ID.");
                }
                if path.contains("{name}") {
                    add(op, 400, "Malformed template name.");
                }
                if path.contains("{id}") {
                    add(op, 400, "Malformed ID or parameter.");
                    add(op, 404, "No such sandbox in this team.");
                    // Everything but a plain read of the row calls the sandbox's host.
                    if !(method == "get" && path == "/v1/sandboxes/{id}") {
                        add(op, 409, "The sandbox is not in a state that allows this.");
                        add(op, 503, "The sandbox's host or guest does not answer.");
                    }
                }
                if path.ends_with("/exec")
                    || path.ends_with("/exec/ws")
                    || path.ends_with("/connect")
                {
                    add(
                        op,
                        429,
                        "The team has its maximum of concurrent exec streams open (quota_exceeded).",
                    );
                }
                if path.ends_with("/files") {
                    add(
                        op,
                        429,
                        "The team has its maximum of concurrent file transfers in flight (quota_exceeded).",
                    );
                }
                if path == "/v1/sandboxes" && method == "post" {
                    add(op, 404, "No such template.");
                    add(op, 409, "No host has room for it (capacity_exceeded).");
                    add(
                        op,
                        429,
                        "The team's quota would be exceeded (quota_exceeded).",
                    );
                    add(op, 503, "No host agent answers.");
                }
                if path == "/v1/audit" {
                    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                        for p in params.iter_mut() {
                            if p["name"] == "limit" {
                                set_in(
                                    &mut p["schema"],
                                    json!({"minimum": 1, "maximum": crate::app::audit::MAX_AUDIT_PAGE}),
                                );
                            } else if p["name"] == "before" {
                                set_in(&mut p["schema"], json!({"minimum": 1}));
                            }
                        }
                    }
                }
                if path == "/v1/sandboxes" && method == "get" {
                    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                        for p in params.iter_mut().filter(|p| p["name"] == "limit") {
                            set_in(
                                &mut p["schema"],
                                json!({"minimum": 1, "maximum": sandboxes::MAX_PAGE}),
                            );
                        }
                    }
                }
                if path.ends_with("/connect") {
                    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                        for p in params.iter_mut() {
                            if p["name"] == "pid" {
                                set_in(&mut p["schema"], json!({"minimum": 1}));
                            } else if p["name"] == "timeout_s" {
                                set_in(
                                    &mut p["schema"],
                                    json!({
                                        "minimum": 1,
                                        "maximum": validate::MAX_EXEC_TIMEOUT_S,
                                        "default": validate::DEFAULT_EXEC_TIMEOUT_S
                                    }),
                                );
                            }
                        }
                    }
                }
                if path.ends_with("/files") {
                    if let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                        for p in params.iter_mut().filter(|p| p["in"] == "query") {
                            if p["name"] == "path" {
                                p["required"] = json!(true);
                                set_in(&mut p["schema"], guest_path());
                            } else if p["name"] == "user" {
                                set_in(&mut p["schema"], user());
                            }
                        }
                    }
                }
            }
        }
    }

    let limits = SandboxLimits::default();
    let create = "/components/schemas/CreateSandboxRequest/properties";
    let numbers = [
        ("vcpus", 1, limits.max_vcpus, SandboxShape::DEFAULT_VCPUS),
        (
            "memory_mb",
            limits.min_memory_mb,
            limits.max_memory_mb,
            SandboxShape::DEFAULT_MEMORY_MB,
        ),
        (
            "disk_size_mb",
            limits.min_disk_mb,
            limits.max_disk_mb,
            SandboxShape::DEFAULT_DISK_MB,
        ),
        (
            "timeout_s",
            1,
            limits.max_timeout_s,
            SandboxShape::DEFAULT_TIMEOUT_S,
        ),
    ];
    for (field, min, max, default) in numbers {
        set(
            &mut doc,
            &format!("{create}/{field}"),
            json!({"minimum": min, "maximum": max, "default": default}),
        );
    }
    set(
        &mut doc,
        &format!("{create}/template"),
        json!({"example": "minimal", "minLength": 1}),
    );
    set(&mut doc, &format!("{create}/env"), env_map());
    set(
        &mut doc,
        &format!("{create}/metadata"),
        json!({
            "maxProperties": validate::MAX_METADATA_ENTRIES,
            "propertyNames": {"minLength": 1, "maxLength": validate::MAX_METADATA_KEY},
            "additionalProperties": {"type": "string", "maxLength": validate::MAX_METADATA_VALUE}
        }),
    );
    set(
        &mut doc,
        "/components/schemas/CreateSandboxRequest",
        json!({"example": {"template": "minimal", "timeout_s": 120}}),
    );

    set(
        &mut doc,
        &format!("{create}/on_timeout"),
        json!({"enum": ["destroy", "pause"], "default": "destroy"}),
    );
    for schema in ["ResumeRequest", "TimeoutRequest"] {
        set(
            &mut doc,
            &format!("/components/schemas/{schema}/properties/timeout_s"),
            json!({"minimum": 1, "maximum": limits.max_timeout_s}),
        );
    }
    set(
        &mut doc,
        "/components/schemas/TimeoutRequest",
        json!({"required": ["timeout_s"]}),
    );
    set(
        &mut doc,
        "/components/schemas/ForkRequest/properties/count",
        json!({"minimum": 1, "maximum": crate::app::lifecycle::MAX_FORK, "default": 1}),
    );
    set(
        &mut doc,
        "/components/schemas/SnapshotRequest/properties/name",
        json!({"pattern": "^[a-z0-9][a-z0-9_-]{0,62}$", "example": "prepared"}),
    );
    use crate::app::accounts;
    set(
        &mut doc,
        "/components/schemas/CreateKeyRequest/properties/expires_in_s",
        json!({"minimum": accounts::MIN_KEY_TTL_S, "maximum": accounts::MAX_KEY_TTL_S}),
    );
    set(
        &mut doc,
        "/components/schemas/CreateKeyRequest/properties/name",
        json!({"maxLength": accounts::MAX_KEY_NAME, "example": "ci"}),
    );
    set(
        &mut doc,
        "/components/schemas/CreateTeamRequest/properties/name",
        json!({"pattern": "^[a-z0-9][a-z0-9_-]{0,62}$", "example": "acme"}),
    );
    let exec = "/components/schemas/ExecRequest/properties";
    set(
        &mut doc,
        &format!("{exec}/cmd"),
        json!({"minItems": 1, "maxItems": validate::MAX_CMD_ARGS}),
    );
    set(
        &mut doc,
        &format!("{exec}/timeout_s"),
        json!({
            "minimum": 1,
            "maximum": validate::MAX_EXEC_TIMEOUT_S,
            "default": validate::DEFAULT_EXEC_TIMEOUT_S
        }),
    );
    set(&mut doc, &format!("{exec}/env"), env_map());
    set(&mut doc, &format!("{exec}/cwd"), guest_path());
    set(&mut doc, &format!("{exec}/user"), user());
    set(
        &mut doc,
        "/components/schemas/ExecRequest",
        json!({"example": {"cmd": ["uname", "-r"]}}),
    );
    for dim in ["cols", "rows"] {
        set(
            &mut doc,
            &format!("/components/schemas/PtySize/properties/{dim}"),
            json!({"minimum": 1, "maximum": 1000}),
        );
    }
    doc
}

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn spec_json() -> String {
    serde_json::to_string_pretty(&document()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// `GET /openapi.json` and `GET /v1/openapi.json`.
pub async fn serve() -> Json<Value> {
    Json(document())
}

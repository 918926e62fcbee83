//! The Connect RPC face of the agent: `hearth.agent.v1.HostAgent`.
//!
//! Owns request validation (typed IDs, template names, limits) and the mapping
//! of agent errors to Connect codes. The work itself is done by sandbox actors;
//! this module never touches a VM, disk or network.

use std::sync::Arc;
use std::time::Instant;

use connectrpc::{
    ConnectError, ErrorCode, RequestContext, Response, ServiceRequest, ServiceResult,
};
use hearth_proto::hearth::agent::v1 as pb;
use hearth_types::{SandboxId, SandboxShape, TemplateName};
use tracing::{info, warn};

use crate::lifecycle::LifecycleError;
use crate::metrics::{Op, Start};
use crate::registry::{InsertError, SandboxHandle};
use crate::sandbox::{start_create, start_create_from, SandboxError, StartError};
use crate::snapshot::SnapshotRequest;
use crate::state::{SandboxRecord, SandboxSpec, SandboxState};
use crate::templates::{TemplateEntry, TemplateError};
use crate::Ctx;

/// Implements the generated `HostAgent` trait.
#[derive(Clone)]
pub struct AgentService {
    pub(crate) ctx: Arc<Ctx>,
}

fn invalid(msg: impl Into<String>) -> ConnectError {
    ConnectError::new(ErrorCode::InvalidArgument, msg.into())
}

fn parse_id(raw: &str) -> Result<SandboxId, ConnectError> {
    raw.parse::<SandboxId>().map_err(|e| invalid(e.to_string()))
}

/// Connect error for a create that was not started (duplicate, over capacity).
pub(crate) fn start_error(e: &StartError) -> ConnectError {
    match e {
        StartError::Registry(InsertError::Exists(e)) => {
            ConnectError::new(ErrorCode::AlreadyExists, e.to_string())
        }
        StartError::Registry(InsertError::Refused(r)) => {
            ConnectError::new(ErrorCode::ResourceExhausted, r.to_string())
        }
        StartError::Token(_) => ConnectError::new(
            ErrorCode::Internal,
            "could not generate the sandbox's access token",
        ),
    }
}

/// Connect code for a failed create.
fn create_error_code(e: &SandboxError) -> ErrorCode {
    match e {
        SandboxError::Slot(crate::net::slots::SlotError::Exhausted { .. }) => {
            ErrorCode::ResourceExhausted
        }
        SandboxError::Cancelled => ErrorCode::Aborted,
        _ => ErrorCode::Internal,
    }
}

pub(crate) fn to_pb_state(s: SandboxState) -> pb::SandboxState {
    match s {
        SandboxState::Starting => pb::SandboxState::SANDBOX_STATE_STARTING,
        SandboxState::Running => pb::SandboxState::SANDBOX_STATE_RUNNING,
        SandboxState::Stopping => pb::SandboxState::SANDBOX_STATE_STOPPING,
        SandboxState::Stopped => pb::SandboxState::SANDBOX_STATE_STOPPED,
        SandboxState::Error => pb::SandboxState::SANDBOX_STATE_ERROR,
        SandboxState::Pausing => pb::SandboxState::SANDBOX_STATE_PAUSING,
        SandboxState::Paused => pb::SandboxState::SANDBOX_STATE_PAUSED,
        SandboxState::Resuming => pb::SandboxState::SANDBOX_STATE_RESUMING,
        // The agent never holds a sandbox it has not started.
        SandboxState::Pending => pb::SandboxState::SANDBOX_STATE_STARTING,
    }
}

pub(crate) fn to_pb_status(r: &SandboxRecord) -> pb::SandboxStatus {
    let s = &r.spec;
    pb::SandboxStatus {
        spec: pb::SandboxSpec {
            sandbox_id: s.sandbox_id.to_string(),
            template: s.template.to_string(),
            vcpus: s.vcpus,
            memory_mb: s.memory_mb,
            disk_size_mb: s.disk_size_mb,
            expires_at_unix_ms: s.expires_at_unix_ms,
            env: s.env.clone().into_iter().collect(),
            team_id: s.team_id.clone(),
            ..Default::default()
        }
        .into(),
        state: to_pb_state(r.state).into(),
        started_at_unix_ms: r.started_at_unix_ms,
        guest_address: r.guest_address.map(|a| a.to_string()).unwrap_or_default(),
        error: r.error.clone().unwrap_or_default(),
        boot_ms: r.boot_ms,
        restored: r.restored,
        paused_at_unix_ms: r.paused.as_ref().map_or(0, |p| p.paused_at_unix_ms),
        ..Default::default()
    }
}

/// Connect error for a pause or resume that did not happen.
fn lifecycle_error(e: &LifecycleError) -> ConnectError {
    let code = match e {
        LifecycleError::WrongState { .. } | LifecycleError::Incompatible { .. } => {
            ErrorCode::FailedPrecondition
        }
        LifecycleError::Refused(_) => ErrorCode::ResourceExhausted,
        LifecycleError::Gone => ErrorCode::NotFound,
        _ => ErrorCode::Internal,
    };
    ConnectError::new(code, e.public_message())
}

/// Most copies one fork makes.
pub const MAX_FORK_COPIES: usize = 16;

/// Snapshot `source` into a hidden fork point and start one sandbox per copy
/// from it; all or nothing (a failed copy destroys the others).
pub(crate) async fn fork(
    ctx: Arc<crate::Ctx>,
    source: SandboxHandle,
    copies: Vec<SandboxSpec>,
) -> Result<Vec<SandboxRecord>, ConnectError> {
    let point: TemplateName = format!(
        "fork-{}",
        &hearth_types::SandboxId::generate().as_str()[3..]
    )
    .parse()
    .map_err(|_| ConnectError::new(ErrorCode::Internal, "fork point name"))?;
    ctx.pinned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(point.clone());
    let result = async {
        source
            .snapshot_to_template(SnapshotRequest {
                template: point.clone(),
                memory: true,
                hidden: true,
                warm_of: None,
            })
            .await
            .map_err(|e| {
                warn!(error = %crate::error_chain(&e), "fork: snapshot of the source failed");
                lifecycle_error(&e)
            })?;
        let mut waits = Vec::new();
        let mut refused = None;
        for spec in copies {
            match start_create_from(&ctx, spec, Some(point.clone())) {
                Ok(rx) => waits.push(rx),
                Err(e) => {
                    refused = Some(start_error(&e));
                    break;
                }
            }
        }
        let results = futures::future::join_all(waits).await;
        let mut made = Vec::new();
        let mut failed = refused;
        for r in results {
            match r {
                Ok(Ok(rec)) => made.push(rec),
                Ok(Err(e)) => {
                    failed.get_or_insert_with(|| {
                        ConnectError::new(create_error_code(&e), e.public_message())
                    });
                }
                Err(_) => {
                    failed.get_or_insert_with(|| {
                        ConnectError::new(ErrorCode::Internal, "a copy's actor stopped")
                    });
                }
            }
        }
        if let Some(e) = failed {
            for rec in &made {
                if let Some(h) = ctx.registry.get(&rec.spec.sandbox_id) {
                    h.destroy("fork failed").await;
                }
            }
            return Err(e);
        }
        Ok(made)
    }
    .await;
    ctx.pinned
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&point);
    ctx.sweep_fork_points();
    result
}

impl AgentService {
    fn template_info(&self, t: &TemplateEntry) -> pb::TemplateInfo {
        pb::TemplateInfo {
            name: t.name.to_string(),
            allocated_bytes: t.allocated_bytes,
            apparent_bytes: t.apparent_bytes,
            has_memory: t.warm.is_some(),
            source_sandbox_id: t.meta.source_sandbox_id.clone().unwrap_or_default(),
            created_at_unix_ms: t.meta.created_at_unix_ms,
            vcpus: t.warm.as_ref().map_or(0, |w| w.vcpus),
            memory_mb: t.warm.as_ref().map_or(0, |w| w.memory_mb),
            disk_size_mb: t.warm.as_ref().map_or(t.disk_size_mb, |w| w.disk_size_mb),
            in_use: u32::try_from(self.ctx.registry.template_users(&t.name)).unwrap_or(u32::MAX),
            ..Default::default()
        }
    }

    /// The actor of sandbox `id`, or NotFound.
    fn handle(&self, id: &SandboxId) -> Result<SandboxHandle, ConnectError> {
        // Pooled VMs are the host's own business.
        let visible = self
            .ctx
            .registry
            .get(id)
            .filter(|h| !h.record.borrow().pooled);
        visible.ok_or_else(|| {
            ConnectError::new(
                ErrorCode::NotFound,
                format!("sandbox {id} is not on this host"),
            )
        })
    }

    /// Validate a wire spec into a [`SandboxSpec`].
    fn validate(&self, spec: &pb::SandboxSpec) -> Result<SandboxSpec, ConnectError> {
        let sandbox_id = parse_id(&spec.sandbox_id)?;
        let template: TemplateName = spec
            .template
            .parse()
            .map_err(|e: hearth_types::IdError| invalid(e.to_string()))?;
        let opt = |v: u32| (v != 0).then_some(v);
        let shape = SandboxShape::validate(
            &self.ctx.config.limits,
            opt(spec.vcpus),
            opt(spec.memory_mb),
            opt(spec.disk_size_mb),
            None,
        )
        .map_err(|e| invalid(e.to_string()))?;
        if spec.expires_at_unix_ms < 0 {
            return Err(invalid("expires_at_unix_ms must not be negative"));
        }
        let image_bytes = match std::fs::metadata(self.ctx.template_rootfs(&template)) {
            Ok(m) if m.is_file() => m.len(),
            _ => {
                return Err(ConnectError::new(
                    ErrorCode::NotFound,
                    format!("template {template} does not exist on this host"),
                ))
            }
        };
        // The disk starts as a copy of the template's image and the guest only grows it.
        let min_mb = image_bytes.div_ceil(1 << 20);
        if u64::from(shape.disk_size_mb) < min_mb {
            return Err(invalid(format!(
                "disk_size_mb {} is smaller than template {template}'s image; the minimum is {min_mb}",
                shape.disk_size_mb
            )));
        }
        Ok(SandboxSpec {
            sandbox_id,
            template,
            vcpus: shape.vcpus,
            memory_mb: shape.memory_mb,
            disk_size_mb: shape.disk_size_mb,
            expires_at_unix_ms: spec.expires_at_unix_ms,
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            team_id: spec.team_id.clone(),
        })
    }

    /// Listed templates whose create of one shape restores instead of booting, as
    /// the create itself decides ([`crate::sandbox`]): the template's own memory, else
    /// its fresh warm variant, saved by this VMM; with the pooled VMs of it ready.
    fn warm_templates(&self) -> Vec<pb::WarmTemplate> {
        let ctx = &self.ctx;
        let compat = ctx.vmm.snapshot_compat();
        let pool: Vec<SandboxSpec> = ctx
            .registry
            .all()
            .iter()
            .map(|h| h.record.borrow().clone())
            .filter(|r| r.pooled && r.state == SandboxState::Running)
            .map(|r| r.spec)
            .collect();
        ctx.templates
            .list(false)
            .into_iter()
            .filter_map(|t| {
                let variant = || {
                    let v = crate::templates::warm_variant(&t.name)
                        .filter(|v| crate::warm::variant_is_fresh(ctx, &t.name, v))?;
                    ctx.templates.warm(&v)
                };
                let w = t
                    .warm
                    .clone()
                    .filter(|w| w.saved.compat == compat)
                    .or_else(|| variant().filter(|w| w.saved.compat == compat))?;
                let pooled = pool
                    .iter()
                    .filter(|s| {
                        s.template == t.name
                            && (s.vcpus, s.memory_mb, s.disk_size_mb)
                                == (w.vcpus, w.memory_mb, w.disk_size_mb)
                    })
                    .count();
                Some(pb::WarmTemplate {
                    template: t.name.to_string(),
                    vcpus: w.vcpus,
                    memory_mb: w.memory_mb,
                    disk_size_mb: w.disk_size_mb,
                    pooled: u32::try_from(pooled).unwrap_or(u32::MAX),
                    ..Default::default()
                })
            })
            .collect()
    }

    async fn create_sandbox_timed(
        &self,
        request: ServiceRequest<'_, pb::CreateSandboxRequest>,
    ) -> ServiceResult<pb::CreateSandboxResponse> {
        let req = request.to_owned_message();
        let wire = req
            .spec
            .as_option()
            .ok_or_else(|| invalid("spec is required"))?;
        let spec = self.validate(wire)?;
        let id = spec.sandbox_id.clone();
        info!(sandbox_id = %id, template = %spec.template, "create requested");
        // A pooled VM of this template and shape, when there is one.
        let ctx = self.ctx.clone();
        let s = spec.clone();
        let pooled = tokio::spawn(async move { crate::pool::take(&ctx, &s).await })
            .await
            .ok()
            .flatten();
        match pooled {
            Some(Ok(record)) => {
                self.ctx.metrics.started(Start::Pool);
                return Response::ok(pb::CreateSandboxResponse {
                    sandbox: to_pb_status(&record).into(),
                    ..Default::default()
                });
            }
            Some(Err(e)) => crate::pool::log_miss(&id, &e),
            None => {}
        }
        // Pooled VMs give their place to real sandboxes, one at a time until the
        // create fits (schedulers count them as free capacity), at most as many as
        // there are now.
        let mut started = start_create(&self.ctx, spec.clone());
        for _ in 0..self.ctx.registry.usage().pooled_sandboxes {
            if !matches!(started, Err(StartError::Registry(InsertError::Refused(_)))) {
                break;
            }
            let evicted = self.ctx.registry.evict_pooled(1, |_| true);
            if evicted.is_empty() {
                break;
            }
            for h in evicted {
                h.destroy("capacity for a create").await;
            }
            started = start_create(&self.ctx, spec.clone());
        }
        let reply = started.map_err(|e| {
            warn!(sandbox_id = %id, error = %crate::error_chain(&e), "create refused");
            start_error(&e)
        })?;
        match reply.await {
            Ok(Ok(record)) => {
                self.ctx.metrics.started(if record.restored {
                    Start::Restore
                } else {
                    Start::Boot
                });
                Response::ok(pb::CreateSandboxResponse {
                    sandbox: to_pb_status(&record).into(),
                    ..Default::default()
                })
            }
            Ok(Err(e)) => {
                warn!(sandbox_id = %id, error = %crate::error_chain(&e), "create failed");
                Err(ConnectError::new(create_error_code(&e), e.public_message()))
            }
            Err(_) => Err(ConnectError::new(
                ErrorCode::Internal,
                "the sandbox actor stopped before answering",
            )),
        }
    }

    async fn pause_sandbox_timed(
        &self,
        request: ServiceRequest<'_, pb::PauseSandboxRequest>,
    ) -> ServiceResult<pb::PauseSandboxResponse> {
        let id = parse_id(request.sandbox_id)?;
        let handle = self.handle(&id)?;
        let started = std::time::Instant::now();
        // Outside the request future: a cancelled RPC must not stop it halfway.
        let record = tokio::spawn(async move { handle.pause().await })
            .await
            .map_err(|_| ConnectError::new(ErrorCode::Internal, "pause task failed"))?
            .map_err(|e| {
                warn!(sandbox_id = %id, error = %crate::error_chain(&e), "pause failed");
                lifecycle_error(&e)
            })?;
        Response::ok(pb::PauseSandboxResponse {
            sandbox: to_pb_status(&record).into(),
            pause_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn resume_sandbox_timed(
        &self,
        request: ServiceRequest<'_, pb::ResumeSandboxRequest>,
    ) -> ServiceResult<pb::ResumeSandboxResponse> {
        let id = parse_id(request.sandbox_id)?;
        if request.expires_at_unix_ms < 0 {
            return Err(invalid("expires_at_unix_ms must not be negative"));
        }
        let expires = request.expires_at_unix_ms;
        let handle = self.handle(&id)?;
        let started = std::time::Instant::now();
        let record = tokio::spawn(async move { handle.resume(expires).await })
            .await
            .map_err(|_| ConnectError::new(ErrorCode::Internal, "resume task failed"))?
            .map_err(|e| {
                warn!(sandbox_id = %id, error = %crate::error_chain(&e), "resume failed");
                lifecycle_error(&e)
            })?;
        Response::ok(pb::ResumeSandboxResponse {
            sandbox: to_pb_status(&record).into(),
            resume_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn snapshot_sandbox_timed(
        &self,
        request: ServiceRequest<'_, pb::SnapshotSandboxRequest>,
    ) -> ServiceResult<pb::SnapshotSandboxResponse> {
        let id = parse_id(request.sandbox_id)?;
        let template: TemplateName = request
            .template
            .parse()
            .map_err(|e: hearth_types::IdError| invalid(e.to_string()))?;
        let handle = self.handle(&id)?;
        let req = SnapshotRequest {
            template,
            memory: request.memory,
            hidden: false,
            warm_of: None,
        };
        let started = std::time::Instant::now();
        let snap = tokio::spawn(async move { handle.snapshot_to_template(req).await })
            .await
            .map_err(|_| ConnectError::new(ErrorCode::Internal, "snapshot task failed"))?
            .map_err(|e| {
                warn!(sandbox_id = %id, error = %crate::error_chain(&e), "snapshot failed");
                lifecycle_error(&e)
            })?;
        Response::ok(pb::SnapshotSandboxResponse {
            template: self.template_info(&snap.entry).into(),
            snapshot_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            frozen_ms: snap.frozen_ms,
            ..Default::default()
        })
    }

    async fn fork_sandbox_timed(
        &self,
        request: ServiceRequest<'_, pb::ForkSandboxRequest>,
    ) -> ServiceResult<pb::ForkSandboxResponse> {
        let req = request.to_owned_message();
        let id = parse_id(&req.sandbox_id)?;
        if req.copies.is_empty() || req.copies.len() > MAX_FORK_COPIES {
            return Err(invalid(format!(
                "a fork makes 1 to {MAX_FORK_COPIES} copies, not {}",
                req.copies.len()
            )));
        }
        let source = self.handle(&id)?;
        let src = source.snapshot().spec;
        let mut copies = Vec::with_capacity(req.copies.len());
        for wire in &req.copies {
            let c = self.validate(wire)?;
            if (c.template.clone(), c.vcpus, c.memory_mb, c.disk_size_mb)
                != (
                    src.template.clone(),
                    src.vcpus,
                    src.memory_mb,
                    src.disk_size_mb,
                )
            {
                return Err(invalid(format!(
                    "copy {} must have its source's template and shape",
                    c.sandbox_id
                )));
            }
            if c.sandbox_id == id
                || copies
                    .iter()
                    .any(|o: &SandboxSpec| o.sandbox_id == c.sandbox_id)
            {
                return Err(invalid(format!("copy ID {} is not unique", c.sandbox_id)));
            }
            copies.push(c);
        }
        let ctx = self.ctx.clone();
        let started = std::time::Instant::now();
        // The fork itself runs outside the request future: a cancelled RPC must
        // not leave half the copies.
        let outcome = tokio::spawn(async move { fork(ctx, source, copies).await })
            .await
            .map_err(|_| ConnectError::new(ErrorCode::Internal, "fork task failed"))??;
        info!(sandbox_id = %id, copies = outcome.len(), ms = started.elapsed().as_millis() as u64, "forked");
        Response::ok(pb::ForkSandboxResponse {
            copies: outcome.iter().map(to_pb_status).collect(),
            fork_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }
}

#[allow(refining_impl_trait)]
impl pb::HostAgent for AgentService {
    async fn info(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, pb::InfoRequest>,
    ) -> ServiceResult<pb::InfoResponse> {
        let ctx = &self.ctx;
        let used = ctx.registry.usage();
        Response::ok(pb::InfoResponse {
            host_id: ctx.host_id.to_string(),
            vmm: ctx.vmm.kind().to_owned(),
            accel: ctx.vmm.accel().as_str().to_owned(),
            reason: ctx.accel_reason.clone(),
            templates: ctx.template_names(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            running: u32::try_from(ctx.registry.len()).unwrap_or(u32::MAX),
            memory_capacity_mb: ctx.capacity.memory_mb,
            memory_used_mb: used.memory_mb,
            vcpus_capacity: ctx.capacity.vcpus,
            vcpus_used: used.vcpus,
            disk_free_mb: ctx
                .capacity
                .disk_free_mb()
                .unwrap_or(0)
                .saturating_sub(used.disk_pending_mb),
            max_sandboxes: u32::try_from(ctx.capacity.max_sandboxes).unwrap_or(u32::MAX),
            memory_overcommit: ctx.capacity.overcommit,
            vm_sandboxes: u32::try_from(used.sandboxes).unwrap_or(u32::MAX),
            pooled_sandboxes: u32::try_from(used.pooled_sandboxes).unwrap_or(u32::MAX),
            pooled_memory_mb: used.pooled_memory_mb,
            pooled_vcpus: used.pooled_vcpus,
            warm: self.warm_templates(),
            vm_sandbox_ids: ctx
                .registry
                .all()
                .iter()
                .map(|h| h.record.borrow().clone())
                .filter(|r| r.state.holds_vm() && !r.pooled)
                .map(|r| r.spec.sandbox_id.to_string())
                .collect(),
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::CreateSandboxRequest>,
    ) -> ServiceResult<pb::CreateSandboxResponse> {
        let started = Instant::now();
        let r = self.create_sandbox_timed(request).await;
        self.ctx.metrics.observe(Op::Create, started, &r);
        r
    }

    async fn destroy_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::DestroySandboxRequest>,
    ) -> ServiceResult<pb::DestroySandboxResponse> {
        let id = parse_id(request.sandbox_id)?;
        let existed = match self.ctx.registry.get(&id) {
            Some(handle) => {
                // Run the destroy outside the request future: a cancelled RPC
                // must not stop it halfway.
                let task = tokio::spawn(async move { handle.destroy("requested").await });
                let _ = task.await;
                true
            }
            None => false,
        };
        Response::ok(pb::DestroySandboxResponse {
            existed,
            ..Default::default()
        })
    }

    async fn get_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetSandboxRequest>,
    ) -> ServiceResult<pb::GetSandboxResponse> {
        let id = parse_id(request.sandbox_id)?;
        let handle = self.handle(&id)?;
        Response::ok(pb::GetSandboxResponse {
            sandbox: to_pb_status(&handle.snapshot()).into(),
            ..Default::default()
        })
    }

    async fn list_sandboxes(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, pb::ListSandboxesRequest>,
    ) -> ServiceResult<pb::ListSandboxesResponse> {
        let mut sandboxes: Vec<_> = self
            .ctx
            .registry
            .all()
            .iter()
            .map(|h| h.snapshot())
            .filter(|r| !r.pooled)
            .map(|r| to_pb_status(&r))
            .collect();
        sandboxes.sort_by(|a, b| {
            let id = |s: &pb::SandboxStatus| s.spec.as_option().map(|s| s.sandbox_id.clone());
            id(a).cmp(&id(b))
        });
        Response::ok(pb::ListSandboxesResponse {
            sandboxes,
            ..Default::default()
        })
    }

    async fn pause_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::PauseSandboxRequest>,
    ) -> ServiceResult<pb::PauseSandboxResponse> {
        let started = Instant::now();
        let r = self.pause_sandbox_timed(request).await;
        self.ctx.metrics.observe(Op::Pause, started, &r);
        r
    }

    async fn resume_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ResumeSandboxRequest>,
    ) -> ServiceResult<pb::ResumeSandboxResponse> {
        let started = Instant::now();
        let r = self.resume_sandbox_timed(request).await;
        self.ctx.metrics.observe(Op::Resume, started, &r);
        r
    }

    async fn snapshot_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::SnapshotSandboxRequest>,
    ) -> ServiceResult<pb::SnapshotSandboxResponse> {
        let started = Instant::now();
        let r = self.snapshot_sandbox_timed(request).await;
        self.ctx.metrics.observe(Op::Snapshot, started, &r);
        r
    }

    async fn fork_sandbox(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::ForkSandboxRequest>,
    ) -> ServiceResult<pb::ForkSandboxResponse> {
        let started = Instant::now();
        let r = self.fork_sandbox_timed(request).await;
        self.ctx.metrics.observe(Op::Fork, started, &r);
        r
    }

    async fn list_templates(
        &self,
        _ctx: RequestContext,
        _request: ServiceRequest<'_, pb::ListTemplatesRequest>,
    ) -> ServiceResult<pb::ListTemplatesResponse> {
        let templates = self
            .ctx
            .templates
            .list(false)
            .iter()
            .map(|t| self.template_info(t))
            .collect();
        Response::ok(pb::ListTemplatesResponse {
            templates,
            ..Default::default()
        })
    }

    async fn delete_template(
        &self,
        _ctx: RequestContext,
        request: ServiceRequest<'_, pb::DeleteTemplateRequest>,
    ) -> ServiceResult<pb::DeleteTemplateResponse> {
        let name: TemplateName = request
            .template
            .parse()
            .map_err(|e: hearth_types::IdError| invalid(e.to_string()))?;
        if !self.ctx.templates.exists(&name) {
            return Response::ok(pb::DeleteTemplateResponse {
                existed: false,
                ..Default::default()
            });
        }
        if self.ctx.registry.uses_template(&name) {
            return Err(ConnectError::new(
                ErrorCode::FailedPrecondition,
                format!("template {name} is used by a sandbox on this host; destroy those first"),
            ));
        }
        match self.ctx.templates.delete(&name) {
            Ok(()) => {
                info!(template = %name, "template deleted");
                Response::ok(pb::DeleteTemplateResponse {
                    existed: true,
                    ..Default::default()
                })
            }
            Err(TemplateError::BuiltIn(_)) => Err(ConnectError::new(
                ErrorCode::PermissionDenied,
                format!("template {name} is built in and cannot be deleted"),
            )),
            Err(TemplateError::NotFound(_)) => Response::ok(pb::DeleteTemplateResponse {
                existed: false,
                ..Default::default()
            }),
            Err(e) => {
                warn!(template = %name, error = %crate::error_chain(&e), "template deletion failed");
                Err(ConnectError::new(
                    ErrorCode::Internal,
                    "could not delete the template",
                ))
            }
        }
    }
}

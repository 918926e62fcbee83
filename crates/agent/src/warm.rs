//! Warm variants of built-in templates, made by the agent at start.
//!
//! A plain create from a built-in template (`minimal`, `python`) with the default
//! shape should restore, not boot. For each template named in
//! `AgentConfig::warm_templates`, the agent boots a sandbox from it once, saves
//! it idle with its memory as the template `warm-<name>`
//! ([`crate::templates::warm_variant`]; not listed, tracked as the base of every
//! sandbox restored from it) and destroys the sandbox. A variant is rebuilt when
//! it no longer fits: another VMM or accelerator, or a rebuilt template image.
//! Runs in the background; creates meanwhile boot as before.

use std::sync::Arc;
use std::time::Duration;

use hearth_types::{SandboxId, SandboxShape, TemplateName};
use tracing::{info, warn};

use crate::sandbox::start_create;
use crate::snapshot::SnapshotRequest;
use crate::state::SandboxSpec;
use crate::templates::{warm_variant, WarmMeta};
use crate::Ctx;

/// How long a freshly booted guest is left alone before it is saved, so that
/// what it does right after boot has settled.
const SETTLE: Duration = Duration::from_secs(1);

/// The shape warm variants are made for: the API's defaults.
pub fn default_shape() -> (u32, u32, u32) {
    (
        SandboxShape::DEFAULT_VCPUS,
        SandboxShape::DEFAULT_MEMORY_MB,
        SandboxShape::DEFAULT_DISK_MB,
    )
}

/// Make (or refresh) the warm variant of every configured template, one at a time.
pub(crate) async fn warm_templates(ctx: Arc<Ctx>) {
    for name in ctx.config.warm_templates.clone() {
        let stopped = ctx.warming.lock().await;
        if *stopped {
            return;
        }
        match warm_one(&ctx, &name).await {
            Ok(true) => info!(template = %name, "warm variant made"),
            Ok(false) => info!(template = %name, "warm variant up to date"),
            Err(e) => {
                warn!(template = %name, error = %e, "could not make the warm variant; creates from it boot")
            }
        }
    }
}

/// Create a host-internal sandbox (no team, no deadline) from template `name`
/// with the default shape and wait until it runs: the warming sandbox, a pooled VM.
pub(crate) async fn create_default(
    ctx: &Arc<Ctx>,
    name: &TemplateName,
) -> Result<(SandboxId, crate::state::SandboxRecord), String> {
    let (vcpus, memory_mb, disk_size_mb) = default_shape();
    let id = SandboxId::generate();
    let spec = SandboxSpec {
        sandbox_id: id.clone(),
        template: name.clone(),
        vcpus,
        memory_mb,
        disk_size_mb,
        expires_at_unix_ms: 0,
        env: Default::default(),
        team_id: String::new(),
    };
    let rx = start_create(ctx, spec).map_err(|e| crate::error_chain(&e))?;
    match rx.await {
        Ok(Ok(rec)) => Ok((id, rec)),
        Ok(Err(e)) => Err(crate::error_chain(&e)),
        Err(_) => Err("the sandbox's actor stopped".into()),
    }
}

/// Whether `variant` (a warm variant of built-in `name`) was made after `name`'s
/// image was last written: a rebuilt image (a new guest agent, say) makes it stale.
pub(crate) fn variant_is_fresh(ctx: &Ctx, name: &TemplateName, variant: &TemplateName) -> bool {
    let image_ms = std::fs::metadata(ctx.templates.rootfs(name))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(i64::MAX, |d| d.as_millis() as i64);
    image_ms <= ctx.templates.meta(variant).created_at_unix_ms
}

/// Whether the variant `w` of template `name` still fits it: the default shape,
/// this VMM, and made after the image was last written.
fn fits(ctx: &Ctx, name: &TemplateName, variant: &TemplateName, w: &WarmMeta) -> bool {
    let (vcpus, memory_mb, disk_size_mb) = default_shape();
    (w.vcpus, w.memory_mb, w.disk_size_mb) == (vcpus, memory_mb, disk_size_mb)
        && w.saved.compat == ctx.vmm.snapshot_compat()
        && variant_is_fresh(ctx, name, variant)
}

/// Returns whether a new variant was made.
async fn warm_one(ctx: &Arc<Ctx>, name: &TemplateName) -> Result<bool, String> {
    if !ctx.templates.exists(name) {
        return Err("no such template on this host".into());
    }
    let variant = warm_variant(name).ok_or("the template's name is too long for a variant")?;
    if let Some(w) = ctx.templates.warm(&variant) {
        if fits(ctx, name, &variant, &w) {
            return Ok(false);
        }
    }
    if ctx.templates.exists(&variant) {
        // Pooled VMs of the stale variant are the pool's own: they go with it.
        for h in ctx
            .registry
            .evict_pooled(usize::MAX, |r| r.base.as_ref() == Some(&variant))
        {
            h.destroy("stale warm variant").await;
        }
        if ctx.registry.uses_template(&variant) {
            return Err(
                "the stale variant is used by sandboxes; it is replaced at a start after they are gone"
                    .into(),
            );
        }
        ctx.templates
            .delete(&variant)
            .map_err(|e| crate::error_chain(&e))?;
    }
    let (id, _) = create_default(ctx, name).await?;
    let handle = ctx
        .registry
        .get(&id)
        .ok_or("the warming sandbox vanished")?;
    tokio::time::sleep(SETTLE).await;
    let made = handle
        .snapshot_to_template(SnapshotRequest {
            template: variant,
            memory: true,
            hidden: false,
            warm_of: Some(name.clone()),
        })
        .await;
    handle.destroy("warm variant made").await;
    made.map(|_| true).map_err(|e| crate::error_chain(&e))
}

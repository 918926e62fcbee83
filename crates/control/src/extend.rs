//! The control plane's extension point: what a deployment adds without forking
//! (billing, quotas, reports). An [`Extensions`] value, passed to [`crate::start_with`],
//! carries
//! - **routes behind the API keys** ([`Extensions::route`]): the same auth middleware
//!   as `/v1` runs first, so a handler sees the caller ([`crate::http::Caller`]: team,
//!   key, admin or not) and an unauthenticated request never reaches it; requests are
//!   counted in `/metrics` like the built-in ones;
//! - **public routes** ([`Extensions::public_route`]): no key asked (webhooks from a
//!   payment provider, a status page);
//! - **background workers** ([`Extensions::worker`]): started once the API listens,
//!   told to stop when [`crate::RunningControl::shutdown`] runs, and awaited (each
//!   gets [`WORKER_STOP_GRACE`] to finish, then it is aborted).
//!
//! Every handler gets the [`crate::AppState`] (the database through `App::db`, the
//! hosts, the policy); errors in the API's shape come from [`crate::http::error::ApiError`].
//! An extension route must not take a method and path the built-in API serves:
//! [`crate::start_with`] refuses to start then ([`crate::ControlError::Extension`]).
//! The OpenAPI document describes the built-in API only. docs/extending.md has a
//! complete example.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::MethodRouter;
use axum::Router;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::http::AppState;

/// How long a worker may take to end after it was told to stop.
pub const WORKER_STOP_GRACE: Duration = Duration::from_secs(10);

type WorkerFn = Box<dyn FnOnce(WorkerContext) -> BoxFuture<'static, ()> + Send>;

/// Routes and workers a deployment adds to the control plane (see the module docs).
#[derive(Default)]
pub struct Extensions {
    authed: Router<AppState>,
    public: Router<AppState>,
    workers: Vec<(String, WorkerFn)>,
}

/// What a worker is given: the application and the signal to stop.
pub struct WorkerContext {
    app: Arc<App>,
    stop: watch::Receiver<bool>,
}

impl WorkerContext {
    /// The application (database, hosts, policy), shared with the API.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Resolves when the control plane shuts down; use it in a `select!` beside the
    /// worker's own timer.
    pub async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|s| *s).await;
    }

    /// Whether the control plane is shutting down.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

impl Extensions {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serve `path` (axum syntax, e.g. `/v1/billing/{month}`) to callers with an API
    /// key; the handler may extract [`crate::http::Caller`].
    pub fn route(mut self, path: &str, handler: MethodRouter<AppState>) -> Self {
        self.authed = self.authed.route(path, handler);
        self
    }

    /// Serve `path` to anyone, without an API key.
    pub fn public_route(mut self, path: &str, handler: MethodRouter<AppState>) -> Self {
        self.public = self.public.route(path, handler);
        self
    }

    /// Run `worker` from start to shutdown. `name` is in the logs.
    pub fn worker<F, Fut>(mut self, name: &str, worker: F) -> Self
    where
        F: FnOnce(WorkerContext) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.workers
            .push((name.to_owned(), Box::new(move |cx| Box::pin(worker(cx)))));
        self
    }

    /// The routes, for [`crate::http::router_with`].
    pub(crate) fn routes(&self) -> (Router<AppState>, Router<AppState>) {
        (self.authed.clone(), self.public.clone())
    }

    /// Start every worker.
    pub(crate) fn spawn_workers(
        &mut self,
        app: &Arc<App>,
        stop: &watch::Receiver<bool>,
    ) -> Vec<(String, JoinHandle<()>)> {
        self.workers
            .drain(..)
            .map(|(name, run)| {
                let cx = WorkerContext {
                    app: app.clone(),
                    stop: stop.clone(),
                };
                tracing::info!(worker = %name, "extension worker started");
                (name, tokio::spawn(run(cx)))
            })
            .collect()
    }
}

/// Wait for each worker to end, aborting one that takes longer than the grace.
pub(crate) async fn join_workers(workers: Vec<(String, JoinHandle<()>)>) {
    for (name, mut handle) in workers {
        match tokio::time::timeout(WORKER_STOP_GRACE, &mut handle).await {
            Ok(Ok(())) => tracing::info!(worker = %name, "extension worker stopped"),
            Ok(Err(e)) => tracing::error!(worker = %name, error = %e, "extension worker failed"),
            Err(_) => {
                tracing::warn!(worker = %name, "extension worker did not stop in time: aborted");
                handle.abort();
            }
        }
    }
}

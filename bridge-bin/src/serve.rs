//! Running the routes: starts each route, the admin server and the hooks, waits for a
//! signal, then drains every route and stops the admin server last.

use anyhow::Context as _;
use ferry_core::Metrics;
use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{ConfigError, Plan};
#[cfg(feature = "otlp")]
use crate::otlp;
use crate::{admin, audit, fleet_rate, pause, wiring, Failure};

/// Runs every route of `plan` until SIGTERM or SIGINT, then drains them.
pub(crate) async fn run_routes(plan: Plan) -> Result<(), Failure> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let shutdown = CancellationToken::new();
    let (audit, audit_thread) = match &plan.audit {
        Some(audit) => {
            let (trail, thread) = audit::start(audit, &mut registry)
                .with_context(|| format!("audit.path: cannot open {}", audit.path.display()))?;
            (
                Some(trail as std::sync::Arc<dyn ferry_core::AuditTrail>),
                Some(thread),
            )
        }
        None => (None, None),
    };
    #[cfg(feature = "otlp")]
    let (tracer, provider) = match &plan.otlp {
        Some(otlp) => {
            let (tracer, provider) =
                otlp::start(otlp).context("otlp: cannot build the exporter")?;
            info!(endpoint = %ferry_core::redact::url(&otlp.traces_url), "exporting delivery spans");
            (
                Some(tracer as std::sync::Arc<dyn ferry_core::DeliveryTracer>),
                Some(provider),
            )
        }
        None => (None, None),
    };
    #[cfg(not(feature = "otlp"))]
    let tracer = None;
    let hooks = wiring::Hooks { audit, tracer };

    let mut views = Vec::new();
    let mut tasks = Vec::new();
    for mut route in plan.routes {
        if let (Some(limit), Some(state)) = (route.shared_rate, &plan.state) {
            let rate = fleet_rate::RedisRate::start(
                route.name.clone(),
                &state.redis_url,
                &state.prefix,
                limit,
                shutdown.clone(),
            )
            .map_err(|e| Failure::Config(vec![ConfigError::new("start", e)]))?;
            route.policy.fleet_rate = Some(ferry_core::FleetRate(rate));
        }
        match wiring::build(route, &metrics, hooks.clone(), &shutdown).await {
            Ok((view, task)) => {
                views.push(view);
                tasks.push(task);
            }
            Err(e) if e.is_config() => {
                return Err(Failure::Config(vec![ConfigError::new(
                    "start",
                    e.to_string(),
                )]))
            }
            Err(e) => return Err(anyhow::Error::new(e).into()),
        }
    }
    let names: Vec<String> = views.iter().map(|v| v.name.to_string()).collect();
    let switches = pause::Switches::new(
        views.iter().map(|v| v.ctx.clone()).collect(),
        plan.state.as_ref(),
    )
    .map_err(|e| Failure::Config(vec![ConfigError::new("start", e)]))?;
    let switches = std::sync::Arc::new(switches);
    // Before any route receives: a replica started while its routes are paused stays so.
    switches.load().await;
    tokio::spawn(switches.clone().follow(shutdown.clone()));
    let state = admin::AdminState {
        registry,
        routes: views,
        switches,
        token: plan.admin_token.clone(),
        draining: shutdown.clone(),
    };
    // The admin server outlives the drain (it answers `/readyz` with 503 meanwhile, and
    // `/metrics` still shows the last deliveries); it stops once every route has.
    let admin_stop = CancellationToken::new();
    let admin = admin::serve(plan.admin, state, admin_stop.clone())
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", plan.admin))?;
    // The runtime's own count, so the log shows what `[runtime] worker_threads` gave.
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    info!(admin = %plan.admin, routes = ?names, worker_threads, "ferry started");

    tokio::spawn(wait_for_signal(shutdown.clone()));
    // Each route runs on a worker thread, not on this one: tasks a route spawns then start
    // on the worker's own queue instead of waking a parked worker for every message.
    let results = join_all(tasks.into_iter().map(|task| {
        let shutdown = shutdown.clone();
        let running = tokio::spawn(task);
        async move {
            let result = match running.await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(join) => Err(format!("route task ended abnormally: {join}")),
            };
            if let Err(e) = &result {
                error!(error = %e, "route failed; stopping ferry");
                shutdown.cancel();
            }
            result
        }
    }))
    .await;
    shutdown.cancel();
    admin_stop.cancel();
    let _ = admin.await;
    // Every route has dropped its handle: the writer drains the queue and ends.
    drop(hooks);
    if let Some(thread) = audit_thread {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    // Spans still queued go out now (bounded by the export timeout).
    #[cfg(feature = "otlp")]
    if let Some(provider) = provider {
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        info!("ferry stopped");
        Ok(())
    } else {
        Err(anyhow::anyhow!(failed.join("; ")).into())
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}

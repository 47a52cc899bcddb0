//! Running the routes: starts each route, the admin server and the hooks, reads the
//! configuration again on SIGHUP, and on SIGTERM or SIGINT drains every route and stops
//! the admin server last.
//!
//! A reload is applied route by route: a route whose settings changed is drained exactly
//! as at shutdown and started again with the new ones, a new route starts, a removed one
//! drains and stops, and an unchanged one is not touched. Everything a reload starts is
//! connected before anything is drained, so a reload either applies whole or changes
//! nothing. Reloads run on the one task that also waits for the end, so a SIGTERM during a
//! reload still drains every route, the ones the reload started included.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use ferry_core::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::Value;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{AdminState, RouteView};
use crate::config::{Config, ConfigError, LoadOptions, Plan, RoutePlan, StatePlan};
#[cfg(feature = "otlp")]
use crate::otlp;
use crate::{admin, audit, fleet_rate, pause, wiring, Failure};

/// Runs every route of `plan` until SIGTERM or SIGINT, then drains them. On SIGHUP the
/// configuration is read again from `options` and compared with `config`, the one `plan`
/// was validated from.
pub(crate) async fn run_routes(
    config: Config,
    plan: Plan,
    options: LoadOptions,
) -> Result<(), Failure> {
    // Before anything else: from here on SIGHUP reloads instead of ending the process.
    let hangup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let reloads = Reloads::register(&mut registry);
    registry.register(
        "ferry_log_lines_dropped",
        "Log lines dropped because stderr did not take them (its reader stalled or is gone)",
        DroppedLogLines,
    );
    let shutdown = CancellationToken::new();
    let (audit, audit_thread) = match &plan.audit {
        Some(audit) => {
            let (trail, thread) =
                audit::start(audit, &mut registry).context("starting the audit trail")?;
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

    let (ended_tx, ended) = mpsc::unbounded_channel();
    let mut routes = Routes {
        metrics,
        hooks,
        shutdown: shutdown.clone(),
        state: plan.state.clone(),
        running: BTreeMap::new(),
        ended: ended_tx,
    };
    let settings = route_settings(&config);
    let mut prepared = Vec::new();
    for route in plan.routes {
        let name = route.name.to_string();
        match routes.prepare(route).await {
            Ok(route) => prepared.push((name, route)),
            Err(e) if e.is_config() => {
                return Err(Failure::Config(vec![ConfigError::new(
                    "start",
                    e.to_string(),
                )]))
            }
            Err(e) => return Err(anyhow::Error::new(e).into()),
        }
    }
    let names: Vec<String> = prepared.iter().map(|(name, _)| name.clone()).collect();
    let switches = pause::Switches::new(
        prepared.iter().map(|(_, r)| r.view.ctx.clone()).collect(),
        plan.state.as_ref(),
    )
    .map_err(|e| Failure::Config(vec![ConfigError::new("start", e)]))?;
    let switches = std::sync::Arc::new(switches);
    // Before any route receives: a replica started while its routes are paused stays so.
    switches.load().await;
    tokio::spawn(switches.clone().follow(shutdown.clone()));
    let state = Arc::new(admin::AdminState {
        registry,
        routes: std::sync::RwLock::new(prepared.iter().map(|(_, r)| r.view.clone()).collect()),
        switches: switches.clone(),
        token: std::sync::RwLock::new(plan.admin_token.clone()),
        draining: shutdown.clone(),
    });
    // The admin server outlives the drain (it answers `/readyz` with 503 meanwhile, and
    // `/metrics` still shows the last deliveries); it stops once every route has.
    let admin_stop = CancellationToken::new();
    let admin = admin::serve(plan.admin, state.clone(), admin_stop.clone())
        .await
        .with_context(|| format!("admin.listen: cannot listen on {}", plan.admin))?;
    // The runtime's own count, so the log shows what `[runtime] worker_threads` gave.
    let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
    info!(admin = %plan.admin, routes = ?names, worker_threads, "ferry started");

    tokio::spawn(wait_for_signal(shutdown.clone()));
    for (name, route) in prepared {
        let settings = settings.get(&name).cloned().unwrap_or(Value::Null);
        routes.spawn(name, route, settings);
    }
    let mut supervisor = Supervisor {
        routes,
        admin: state,
        switches,
        reloads,
        config,
        options,
        hangup,
        ended,
    };
    supervisor.run().await;
    let Supervisor {
        mut routes, hangup, ..
    } = supervisor;
    // Every route drains (the cancelled token reaches each one); a SIGHUP meanwhile is
    // ignored, as the handler stays installed until the end.
    shutdown.cancel();
    let mut failed = routes.stop_all().await;
    drop(hangup);
    admin_stop.cancel();
    let _ = admin.await;
    // Every route has dropped its handle: the writer drains the queue and ends.
    drop(routes);
    if let Some(thread) = audit_thread {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    // Spans still queued go out now (bounded by the export timeout).
    #[cfg(feature = "otlp")]
    if let Some(provider) = provider {
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
    failed.retain(|e| !e.is_empty());
    if failed.is_empty() {
        info!("ferry stopped");
        Ok(())
    } else {
        Err(anyhow::anyhow!(failed.join("; ")).into())
    }
}

/// `ferry_config_reloads_total{result}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// [`crate::logging::dropped_lines`] as a counter, read when the metrics are.
#[derive(Debug)]
struct DroppedLogLines;

impl prometheus_client::encoding::EncodeMetric for DroppedLogLines {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
            &crate::logging::dropped_lines(),
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

/// Counts SIGHUP reloads: `applied` (the new configuration runs) or `refused` (it did not
/// load, validate or start; the running one stays), so a bad rollout of a file shows.
struct Reloads {
    applied: Counter,
    refused: Counter,
}

impl Reloads {
    fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let family = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "ferry_config_reloads",
            "Configuration reloads on SIGHUP: applied, or refused (the running configuration stays)",
            family.clone(),
        );
        // Both series exist from the start, so a rate or an alert has something to read.
        let applied = family
            .get_or_create(&ReloadLabels { result: "applied" })
            .clone();
        let refused = family
            .get_or_create(&ReloadLabels { result: "refused" })
            .clone();
        Self { applied, refused }
    }
}

/// Each route's settings as loaded (environment overrides and `${VAR}` already applied):
/// what a reload compares to tell a changed route from an unchanged one.
fn route_settings(config: &Config) -> BTreeMap<String, Value> {
    config
        .routes
        .iter()
        .map(|(name, route)| (name.clone(), json(route)))
        .collect()
}

/// A route connected and built, not yet receiving.
struct Prepared {
    /// Cancelled to drain this route alone (a child of the shutdown token).
    stop: CancellationToken,
    view: RouteView,
    task: wiring::RouteTask,
}

/// A route receiving.
struct Running {
    /// Its settings, to compare with a reloaded configuration.
    settings: Value,
    stop: CancellationToken,
    view: RouteView,
    /// Its result: empty when it ended well or its failure was already handled.
    task: JoinHandle<String>,
    /// Set when the route ended by itself (not drained by a reload).
    ended: Arc<AtomicBool>,
}

/// The running routes and what starting one takes.
struct Routes {
    metrics: Metrics,
    hooks: wiring::Hooks,
    shutdown: CancellationToken,
    /// `[admin.state]` as at start (it needs a restart to change).
    state: Option<StatePlan>,
    running: BTreeMap<String, Running>,
    /// Told whenever a route ends by itself.
    ended: mpsc::UnboundedSender<()>,
}

impl Routes {
    /// Connects the route's source and builds it, with its own stop token.
    async fn prepare(&self, mut route: RoutePlan) -> Result<Prepared, wiring::StartError> {
        let stop = self.shutdown.child_token();
        if let Some(limit) = route.shared_rate {
            match &self.state {
                Some(state) => {
                    let rate = fleet_rate::RedisRate::start(
                        route.name.clone(),
                        &state.redis_url,
                        &state.prefix,
                        limit,
                        stop.clone(),
                    )
                    .map_err(|detail| wiring::StartError::Config {
                        route: route.name.to_string(),
                        detail: format!("delivery.rate_limit: {detail}"),
                    })?;
                    route.policy.fleet_rate = Some(ferry_core::FleetRate(rate));
                }
                None => warn!(
                    route = %route.name,
                    "routes.{}.delivery.rate_limit.shared: admin.state needs a restart; this replica paces the route alone until then",
                    route.name
                ),
            }
        }
        let (view, task) = wiring::build(route, &self.metrics, self.hooks.clone(), &stop).await?;
        Ok(Prepared { stop, view, task })
    }

    /// Lets a prepared route receive.
    fn spawn(&mut self, name: String, route: Prepared, settings: Value) {
        let Prepared { stop, view, task } = route;
        let ended = Arc::new(AtomicBool::new(false));
        let shutdown = self.shutdown.clone();
        let (flag, tell) = (ended.clone(), self.ended.clone());
        let route_stop = stop.clone();
        let route = name.clone();
        // Each route runs on a worker thread, not on this one: tasks a route spawns then
        // start on the worker's own queue instead of waking a parked worker for every
        // message.
        let running = tokio::spawn(task);
        let task = tokio::spawn(async move {
            let result = match running.await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(join) => Err(format!("route task ended abnormally: {join}")),
            };
            let drained = route_stop.is_cancelled();
            let failure = match result {
                Ok(()) => String::new(),
                // A route drained for a reload is replaced or removed: its failure while
                // stopping does not stop the others.
                Err(e) if drained && !shutdown.is_cancelled() => {
                    error!(route = %route, error = %e, "route failed while draining for a reload");
                    String::new()
                }
                Err(e) => {
                    error!(error = %e, "route failed; stopping ferry");
                    shutdown.cancel();
                    e
                }
            };
            if !drained {
                flag.store(true, Ordering::SeqCst);
                let _ = tell.send(());
            }
            failure
        });
        self.running.insert(
            name,
            Running {
                settings,
                stop,
                view,
                task,
                ended,
            },
        );
    }

    /// Whether every route has ended by itself (then ferry stops, as it always has).
    fn all_ended(&self) -> bool {
        self.running
            .values()
            .all(|r| r.ended.load(Ordering::SeqCst))
    }

    /// Drains these routes at once and waits until each has stopped.
    async fn stop(&mut self, names: &BTreeSet<String>) -> Vec<(String, Running)> {
        let mut stopping: Vec<(String, Running)> = names
            .iter()
            .filter_map(|name| self.running.remove(name).map(|r| (name.clone(), r)))
            .collect();
        for (_, route) in &stopping {
            route.stop.cancel();
        }
        for (_, route) in &mut stopping {
            // A drained route's failure was logged by its task.
            let _ = (&mut route.task).await;
        }
        stopping
    }

    /// Waits until every route has stopped (after shutdown); their failures.
    async fn stop_all(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for (_, route) in std::mem::take(&mut self.running) {
            match route.task.await {
                Ok(failure) => failures.push(failure),
                Err(join) => failures.push(format!("route task ended abnormally: {join}")),
            }
        }
        failures
    }
}

/// The restart-only settings: changed in a reloaded file, they keep their running value
/// and say so. The admin server's address and its shared state, the runtime's threads and
/// the exporters are set up once, and moving them under running routes would cost more
/// than the restart they need.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let differs = |a: Value, b: Value| a != b;
    let mut keys = Vec::new();
    if old.admin.listen != new.admin.listen {
        keys.push("admin.listen");
    }
    if differs(json(&old.admin.state), json(&new.admin.state)) {
        keys.push("admin.state");
    }
    if old.runtime.worker_threads != new.runtime.worker_threads {
        keys.push("runtime.worker_threads");
    }
    if differs(json(&old.audit), json(&new.audit)) {
        keys.push("audit");
    }
    if differs(json(&old.otlp), json(&new.otlp)) {
        keys.push("otlp");
    }
    keys
}

/// A setting as a JSON tree, to compare two of them.
fn json<T: serde::Serialize>(setting: &T) -> Value {
    serde_json::to_value(setting).unwrap_or(Value::Null)
}

/// The loop that owns the routes: reloads on SIGHUP, ends at shutdown.
struct Supervisor {
    routes: Routes,
    admin: Arc<AdminState>,
    switches: Arc<pause::Switches>,
    reloads: Reloads,
    /// The configuration running now.
    config: Config,
    options: LoadOptions,
    hangup: Signal,
    ended: mpsc::UnboundedReceiver<()>,
}

impl Supervisor {
    /// Until shutdown (a signal, a failed route) or until every route ended by itself.
    async fn run(&mut self) {
        loop {
            tokio::select! {
                biased;
                _ = self.routes.shutdown.cancelled() => return,
                Some(()) = self.ended.recv() => {
                    if self.routes.all_ended() {
                        return;
                    }
                }
                Some(()) = self.hangup.recv() => {
                    info!("SIGHUP: reloading the configuration");
                    if self.reload().await {
                        self.reloads.applied.inc();
                    } else if !self.routes.shutdown.is_cancelled() {
                        self.reloads.refused.inc();
                    }
                }
            }
        }
    }

    /// Reads, validates and applies the configuration again; whether it was applied.
    async fn reload(&mut self) -> bool {
        let (config, plan) = match crate::load_with(&self.options) {
            Ok(loaded) => loaded,
            Err(Failure::Config(errors)) => {
                for e in &errors {
                    error!(at = %e.at, "{e}");
                }
                warn!(
                    errors = errors.len(),
                    "reload refused; the running configuration stays"
                );
                return false;
            }
            Err(Failure::Other(e)) => {
                error!("{e:#}");
                warn!("reload refused; the running configuration stays");
                return false;
            }
        };
        for key in needs_restart(&self.config, &config) {
            warn!("{key}: changed, but it needs a restart; the running value stays");
        }
        let settings = route_settings(&config);
        let changed = |name: &str| {
            self.routes
                .running
                .get(name)
                .is_none_or(|r| Some(&r.settings) != settings.get(name))
        };
        let mut start = Vec::new();
        let mut unchanged = Vec::new();
        for route in plan.routes {
            if changed(&route.name) {
                start.push(route);
            } else {
                unchanged.push(route.name.to_string());
            }
        }
        let stop: BTreeSet<String> = self
            .routes
            .running
            .keys()
            .filter(|name| !settings.contains_key(*name) || changed(name))
            .cloned()
            .collect();
        // Connect everything first: a route that cannot start refuses the whole reload,
        // before any running route was touched.
        let mut prepared = Vec::new();
        for route in start {
            let name = route.name.to_string();
            let connected = tokio::select! {
                connected = self.routes.prepare(route) => connected,
                _ = self.routes.shutdown.cancelled() => return false,
            };
            match connected {
                Ok(route) => prepared.push((name, route)),
                Err(e) => {
                    error!("{e}");
                    warn!("reload refused; the running configuration stays");
                    // What was connected for this reload never runs (a shared rate's
                    // heartbeat ends with its token).
                    for (_, route) in &prepared {
                        route.stop.cancel();
                    }
                    return false;
                }
            }
        }
        let stopped = self.routes.stop(&stop).await;
        if self.routes.shutdown.is_cancelled() {
            // SIGTERM came while the old routes drained: the new ones never start.
            return false;
        }
        // The routes' new set, before any new route receives: a restarted route keeps
        // its paused state, a new one follows the shared state.
        let mut views: BTreeMap<String, RouteView> = self
            .routes
            .running
            .iter()
            .map(|(name, r)| (name.clone(), r.view.clone()))
            .collect();
        views.extend(
            prepared
                .iter()
                .map(|(name, r)| (name.clone(), r.view.clone())),
        );
        // `replace` copies the paused state by name from the contexts it held, the drained
        // routes' among them.
        self.switches
            .replace(views.values().map(|v| v.ctx.clone()).collect());
        self.switches.load().await;
        self.admin.set_routes(views.into_values().collect());
        if self.config.admin.token != config.admin.token {
            self.admin.set_token(plan.admin_token.clone());
            info!("admin.token changed; applied");
        }
        let restarted: Vec<&str> = stopped
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| settings.contains_key(*name))
            .collect();
        let removed: Vec<&str> = stopped
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| !settings.contains_key(*name))
            .collect();
        // A removed route's series stay in `/metrics` (counters must not go back), but
        // its gauges say it holds nothing and is neither paused nor failing any more.
        for (_, route) in stopped
            .iter()
            .filter(|(name, _)| !settings.contains_key(name))
        {
            let m = &route.view.metrics;
            for gauge in [&m.in_flight, &m.paused, &m.circuit_open, &m.backlog] {
                gauge.set(0);
            }
        }
        let added: Vec<&str> = prepared
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| !restarted.contains(name))
            .collect();
        info!(
            added = ?added,
            restarted = ?restarted,
            removed = ?removed,
            unchanged = ?unchanged,
            "configuration reloaded"
        );
        for (name, route) in prepared {
            let route_settings = settings.get(&name).cloned().unwrap_or(Value::Null);
            self.routes.spawn(name, route, route_settings);
        }
        // The restart-only settings keep their running values.
        let mut config = config;
        config.admin.listen.clone_from(&self.config.admin.listen);
        config.admin.state = self.config.admin.state.clone();
        config.runtime = self.config.runtime.clone();
        config.audit = self.config.audit.clone();
        config.otlp = self.config.otlp.clone();
        self.config = config;
        true
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    let mut term = match signal(SignalKind::terminate()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, Format};

    fn config(text: &str) -> Config {
        load_str("test.toml", text, Format::Toml, &[]).expect("a valid test configuration")
    }

    const ROUTE: &str = "[routes.a.source]\ntype = \"amqp\"\nuri = \"amqp://127.0.0.1/%2f\"\n\
        queue = \"q\"\ndead_letters = \"queue\"\n[routes.a.sink]\ntype = \"http\"\n\
        url = \"http://127.0.0.1:9/\"\n";

    #[test]
    fn restart_only_settings_are_named() {
        let old = config(&format!("[admin]\nlisten = \"127.0.0.1:1\"\n{ROUTE}"));
        let same = config(&format!(
            "[admin]\nlisten = \"127.0.0.1:1\"\ntoken = \"t0ken-of-16-chars\"\n{ROUTE}[routes.a.delivery]\nconcurrency = 3\n"
        ));
        assert!(
            needs_restart(&old, &same).is_empty(),
            "the token and routes apply"
        );
        let moved = config(&format!(
            "[admin]\nlisten = \"127.0.0.1:2\"\n[runtime]\nworker_threads = 2\n\
             [audit]\npath = \"a.jsonl\"\n{ROUTE}"
        ));
        assert_eq!(
            needs_restart(&old, &moved),
            ["admin.listen", "runtime.worker_threads", "audit"]
        );
    }

    #[test]
    fn a_route_changes_with_any_of_its_settings() {
        let old = route_settings(&config(ROUTE));
        assert_eq!(old, route_settings(&config(ROUTE)));
        let new = route_settings(&config(&format!(
            "{ROUTE}[routes.a.delivery]\nmax_attempts = 3\n"
        )));
        assert_ne!(old.get("a"), new.get("a"));
    }
}

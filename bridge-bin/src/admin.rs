//! The admin server: `/ping`, `/healthz`, `/readyz`, `/metrics`, `/routes`, pause and
//! resume, the original consumer service's `/consumer/*` calls, and the status page at `/`
//! (see [`crate::status_page`]).

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use ferry_core::{RouteMetrics, SourceContext};
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::pause::{SwitchError, Switches};

/// What the admin server can see of one route.
#[derive(Clone)]
pub struct RouteView {
    pub name: Arc<str>,
    pub source: &'static str,
    pub ctx: SourceContext,
    pub metrics: RouteMetrics,
}

/// Everything the admin server serves.
pub struct AdminState {
    pub registry: Registry,
    /// The running routes; a reload replaces them (see [`AdminState::set_routes`]).
    pub routes: RwLock<Vec<RouteView>>,
    pub switches: Arc<Switches>,
    /// Required as `Authorization: Bearer <token>` on state-changing calls, when set; a
    /// reload may change it.
    pub token: RwLock<Option<String>>,
    /// Cancelled when ferry starts to drain: from then on `/readyz` answers 503, so a
    /// load balancer or Kubernetes stops counting this replica while it finishes.
    pub draining: CancellationToken,
}

impl AdminState {
    /// The routes now, for one answer (the lock is not held while answering).
    pub(crate) fn routes(&self) -> Vec<RouteView> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The route called `name` now.
    fn route(&self, name: &str) -> Option<RouteView> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|r| *r.name == *name)
            .cloned()
    }

    /// Whether pause and resume need the admin token (the status page asks for it then).
    pub(crate) fn token_required(&self) -> bool {
        self.token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// After a reload: `/routes`, `/readyz` and `/consumer/*` follow the new set.
    pub fn set_routes(&self, routes: Vec<RouteView>) {
        *self.routes.write().unwrap_or_else(PoisonError::into_inner) = routes;
    }

    /// After a reload: the admin token in force from now on.
    pub fn set_token(&self, token: Option<String>) {
        *self.token.write().unwrap_or_else(PoisonError::into_inner) = token;
    }
}

/// Binds the admin address (so a taken port is a start error) and returns the server task.
pub async fn serve(
    listen: SocketAddr,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let app = Router::new()
        .route("/ping", get(|| async { "pong" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/routes", get(list_routes))
        .route("/routes/{name}", get(one_route))
        .route("/routes/{name}/pause", put(pause))
        .route("/routes/{name}/resume", put(resume))
        .route("/consumer/status", get(consumer_status))
        .route("/consumer/start", put(consumer_start))
        .route("/consumer/stop", put(consumer_stop))
        .merge(crate::status_page::routes(&state, shutdown.clone()))
        .fallback(no_such_path)
        .method_not_allowed_fallback(no_such_method)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }))
}

type Shared = State<Arc<AdminState>>;

async fn readyz(State(state): Shared) -> impl IntoResponse {
    if state.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining".to_owned());
    }
    let routes = state.routes();
    let waiting: Vec<&str> = routes
        .iter()
        .filter(|r| !r.ctx.is_connected())
        .map(|r| &*r.name)
        .collect();
    if waiting.is_empty() {
        (StatusCode::OK, "ready".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not connected: {}", waiting.join(", ")),
        )
    }
}

async fn metrics(State(state): Shared) -> impl IntoResponse {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics failed: {e}"),
        );
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}

/// What `/routes` says of one route (the status page's `/status` adds to it).
pub(crate) fn describe(r: &RouteView) -> Value {
    let m = &r.metrics;
    let paused = r.ctx.is_paused();
    let error = r.ctx.error();
    let mut described = json!({
        "name": &*r.name,
        "source": r.source,
        "state": if paused {
            "paused"
        } else if !r.ctx.is_connected() {
            "connecting"
        } else if error.is_some() {
            "source_error"
        } else if m.circuit_open.get() == 1 {
            "endpoint_down"
        } else {
            "running"
        },
        "paused": paused,
        "in_flight": m.in_flight.get(),
        "concurrency_limit": m.concurrency_limit.get(),
        "backlog": m.backlog.get(),
        "received": m.received.get(),
        "delivered": m.delivered.get(),
        "retried": m.retried.get(),
        "dead_lettered": m.dead_lettered.get(),
        "dropped": m.dropped.get(),
    });
    if let (Some(error), Some(fields)) = (error, described.as_object_mut()) {
        fields.insert("error".to_owned(), Value::String(error));
    }
    described
}

async fn list_routes(State(state): Shared) -> impl IntoResponse {
    let routes: Vec<_> = state.routes().iter().map(describe).collect();
    Json(json!({ "routes": routes }))
}

fn error(status: StatusCode, what: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": what.to_string() }))).into_response()
}

/// Any other path or method: the same JSON error as every other refusal.
async fn no_such_path(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no such admin path {:?} (see /, /ping, /healthz, /readyz, /metrics, /routes, /status)",
            uri.path()
        ),
    )
}

async fn no_such_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not an admin call on {:?}", uri.path()),
    )
}

fn unknown(name: &str) -> Response {
    error(StatusCode::NOT_FOUND, format!("no route named {name:?}"))
}

async fn one_route(State(state): Shared, Path(name): Path<String>) -> Response {
    match state.route(&name) {
        Some(r) => Json(describe(&r)).into_response(),
        None => unknown(&name),
    }
}

/// Whether the call carries the admin token (always, when none is configured).
fn authorized(state: &AdminState, headers: &HeaderMap) -> bool {
    let token = state.token.read().unwrap_or_else(PoisonError::into_inner);
    let Some(token) = &*token else {
        return true;
    };
    // The scheme's name is case-insensitive (RFC 7235): `bearer` is `Bearer`.
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// Pauses or resumes `name` and answers with what `view` makes of the route afterwards.
async fn switch(
    state: &AdminState,
    headers: &HeaderMap,
    name: &str,
    paused: bool,
    view: fn(&RouteView) -> Value,
) -> Response {
    if !authorized(state, headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(json!({ "error": "missing or wrong bearer token" })),
        )
            .into_response();
    }
    match state.switches.set(name, paused).await {
        Ok(()) => {
            info!(route = name, paused, "admin call");
            match state.route(name) {
                Some(r) => Json(view(&r)).into_response(),
                None => unknown(name),
            }
        }
        Err(e @ SwitchError::UnknownRoute(_)) => error(StatusCode::NOT_FOUND, e),
        Err(e @ SwitchError::Unreachable(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn pause(State(state): Shared, headers: HeaderMap, Path(name): Path<String>) -> Response {
    switch(&state, &headers, &name, true, describe).await
}

async fn resume(State(state): Shared, headers: HeaderMap, Path(name): Path<String>) -> Response {
    switch(&state, &headers, &name, false, describe).await
}

/// The original consumer service's view: one consumer, started or stopped.
fn consumer(r: &RouteView) -> Value {
    let status = if r.ctx.is_paused() {
        "stopped"
    } else {
        "started"
    };
    json!({ "route": &*r.name, "status": status })
}

/// The single route the `/consumer/*` calls act on.
fn single(state: &AdminState) -> Option<RouteView> {
    match state.routes().as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    }
}

fn not_single() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "/consumer/* is for a configuration with one route; use /routes/{name}",
    )
}

async fn consumer_status(State(state): Shared) -> Response {
    match single(&state) {
        Some(r) => Json(consumer(&r)).into_response(),
        None => not_single(),
    }
}

async fn consumer_start(State(state): Shared, headers: HeaderMap) -> Response {
    match single(&state) {
        Some(r) => switch(&state, &headers, &r.name, false, consumer).await,
        None => not_single(),
    }
}

async fn consumer_stop(State(state): Shared, headers: HeaderMap) -> Response {
    match single(&state) {
        Some(r) => switch(&state, &headers, &r.name, true, consumer).await,
        None => not_single(),
    }
}

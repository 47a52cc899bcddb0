//! The admin server: `/ping`, `/healthz`, `/readyz`, `/metrics`, `/routes`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use ferry_core::{RouteMetrics, SourceContext};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// What the admin server can see of one route.
pub struct RouteView {
    pub name: Arc<str>,
    pub source: &'static str,
    pub ctx: SourceContext,
    pub metrics: RouteMetrics,
}

struct AdminState {
    registry: Registry,
    routes: Vec<RouteView>,
}

/// Binds the admin address (so a taken port is a start error) and returns the server task.
pub async fn serve(
    listen: SocketAddr,
    registry: Registry,
    routes: Vec<RouteView>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let state = Arc::new(AdminState { registry, routes });
    let app = Router::new()
        .route("/ping", get(|| async { "pong" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/routes", get(list_routes))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }))
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let waiting: Vec<&str> = state
        .routes
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

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
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

async fn list_routes(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let routes: Vec<_> = state
        .routes
        .iter()
        .map(|r| {
            let m = &r.metrics;
            json!({
                "name": &*r.name,
                "source": r.source,
                "state": if !r.ctx.is_connected() {
                    "connecting"
                } else if m.circuit_open.get() == 1 {
                    "endpoint_down"
                } else {
                    "running"
                },
                "in_flight": m.in_flight.get(),
                "concurrency_limit": m.concurrency_limit.get(),
                "backlog": m.backlog.get(),
                "received": m.received.get(),
                "delivered": m.delivered.get(),
                "retried": m.retried.get(),
                "dead_lettered": m.dead_lettered.get(),
            })
        })
        .collect();
    Json(json!({ "routes": routes }))
}

//! Operational endpoints: `/health` (liveness), `/ready` (readiness, the
//! Kubernetes probe split), `/info` (the loaded cascade and the limits a
//! client needs) and `/metrics` (Prometheus text exposition format 0.0.4).

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use crate::api::errors::{ApiError, ErrorBody};
use crate::api::schemas::{InfoDocument, StatusDoc};
use crate::api::state::AppState;
use crate::metrics::QUEUE_DEPTH;

#[utoipa::path(
    get,
    path = "/health",
    tag = "meta",
    responses((status = 200, description = "The process is alive (says nothing about the models)", body = StatusDoc)),
)]
pub async fn health() -> Json<StatusDoc> {
    Json(StatusDoc { status: "ok".into() })
}

#[utoipa::path(
    get,
    path = "/ready",
    tag = "meta",
    responses(
        (status = 200, description = "Models loaded and warmed up: send work", body = StatusDoc),
        (status = 503, description = "Loading, failed to load, or draining; `type` and `message` say which", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
)]
pub async fn ready(State(state): State<AppState>) -> Result<Json<StatusDoc>, ApiError> {
    state.cascade()?;
    Ok(Json(StatusDoc { status: "ready".into() }))
}

#[utoipa::path(
    get,
    path = "/info",
    tag = "meta",
    responses(
        (status = 200, description = "The cascade: stages with sizes, defaults, limits and parameter counts; device; precision; encoder; server limits", body = InfoDocument),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 503, description = "No cascade is loaded yet (or loading failed)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security((), ("bearer" = []))
)]
pub async fn info(State(state): State<AppState>) -> Result<Json<InfoDocument>, ApiError> {
    let cascade = state.loaded_cascade()?;
    Ok(Json(InfoDocument::new(&cascade, &state.config)))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses((status = 200, description = "Prometheus text format; every name starts with `diffusiond_`", content(("text/plain")))),
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // The queue knows its depth exactly; sampling it at scrape time needs no bookkeeping.
    metrics::gauge!(QUEUE_DEPTH).set(state.queue.depth() as f64);
    // Histograms are drained into their buckets on upkeep; a scrape is a fine moment.
    state.metrics.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

//! The job resource: `GET /jobs/{id}`, its images, its event stream, and
//! `POST /jobs/{id}/cancel`. (`PUT /jobs/{id}` creates one: see `generate`.)
//!
//! A job owned by another API key answers exactly like an unknown one (404).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::api::auth::Caller;
use crate::api::errors::{ApiError, ErrorBody};
use crate::api::extract::JobPath;
use crate::api::schemas::JobDocument;
use crate::api::sse;
use crate::api::state::AppState;
use crate::jobs::{now_ms, JobRecord, JobStatus};

/// `status` with the job document and a `Location` header pointing at the job.
pub fn document_response(state: &AppState, job: &JobRecord, status: StatusCode) -> Response {
    let location = format!("/jobs/{}", job.id);
    (status, [(header::LOCATION, location)], Json(state.document(job))).into_response()
}

#[utoipa::path(
    get,
    path = "/jobs/{id}",
    tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "The job")),
    responses(
        (status = 200, description = "The job", body = JobDocument),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 500, description = "The job store failed", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_job(State(state): State<AppState>, Extension(caller): Extension<Caller>, path: JobPath) -> Result<Json<JobDocument>, ApiError> {
    let job = caller.visible(state.job(path.id).await?)?;
    Ok(Json(state.document(&job)))
}

#[utoipa::path(
    get,
    path = "/jobs/{id}/images/{index}",
    tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "The job"), ("index" = usize, Path, description = "The image, from 0")),
    responses(
        (status = 200, description = "The image in the job's `output_format`: a PNG carries its generation parameters in text chunks",
            content(("image/png"), ("image/jpeg"), ("image/webp"))),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such job or image (the job has not succeeded, or the index is past `n`)", body = ErrorBody),
        (status = 500, description = "The job store failed", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn get_image(State(state): State<AppState>, Extension(caller): Extension<Caller>, path: JobPath) -> Result<Response, ApiError> {
    let job = caller.visible(state.job(path.id).await?)?;
    let index = path.index.ok_or(ApiError::NotFound("image"))?;
    if job.status != JobStatus::Succeeded || !job.images.iter().any(|i| i.index == index) {
        return Err(ApiError::NotFound("image"));
    }
    let id = job.id;
    let bytes = state.with_store(move |s| s.image(id, index)).await?.ok_or(ApiError::NotFound("image"))?;
    let mime = job.request.output.format.mime();
    // Finished images never change: clients and proxies may keep them.
    Ok(([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "private, max-age=31536000, immutable")], bytes).into_response())
}

#[utoipa::path(
    post,
    path = "/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "The job")),
    responses(
        (status = 200, description = "The job afterwards: canceled, or as it was when it had already finished (idempotent)", body = JobDocument),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 500, description = "The job store failed", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn cancel_job(State(state): State<AppState>, Extension(caller): Extension<Caller>, path: JobPath) -> Result<Json<JobDocument>, ApiError> {
    let job = caller.visible(state.job(path.id).await?)?;
    let id = job.id;
    if !job.status.is_terminal() {
        // The store records the cancellation; the queue stops a running job early.
        state.queue.cancel(id);
    }
    let job = state.with_store(move |s| s.cancel(id, now_ms())).await?.ok_or(ApiError::NotFound("job"))?;
    if job.status == JobStatus::Canceled {
        tracing::info!(job = %id, "job canceled");
    }
    Ok(Json(state.document(&job)))
}

#[utoipa::path(
    get,
    path = "/jobs/{id}/events",
    tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "The job")),
    responses(
        (status = 200, description = "Server-Sent Events: `state` (the job document) first, then `queued`, `started`, \
            `progress`, `stage_done`, and one of `succeeded`, `failed`, `canceled` (the final document) before the stream ends. \
            Data is JSON.", content(("text/event-stream"))),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 500, description = "The job store failed", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn job_events(State(state): State<AppState>, Extension(caller): Extension<Caller>, path: JobPath) -> Result<Response, ApiError> {
    // Subscribe before reading the record: nothing can happen in between unseen.
    let events = state.events.subscribe();
    let job = caller.visible(state.job(path.id).await?)?;
    Ok(sse::stream(state, job, events).into_response())
}

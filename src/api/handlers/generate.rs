//! Creating jobs: `POST /generate` (sync by default, async with
//! `Prefer: respond-async`) and `PUT /jobs/{id}` (create with a client-chosen
//! id, idempotently — a retried PUT returns the job it created).
//!
//! Sync mode waits for the job and answers with its images: JSON with base64
//! PNGs, or the PNG itself when `Accept: image/png` and n = 1. A sync client
//! that disconnects cancels its job (see `sync::CancelOnDrop`); one that waits
//! past `sync_timeout` gets 504 and its job is canceled too. A failed job
//! answers 500 with the job's own error type and message; a job canceled
//! meanwhile (through `POST /jobs/{id}/cancel`) answers 409 `canceled`.
//! Prefer and its `respond-async` token are RFC 7240's.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use uuid::Uuid;

use super::jobs::document_response;
use crate::api::admit::{admit, record_outcome, validate};
use crate::api::auth::Caller;
use crate::api::errors::{ApiError, ErrorBody};
use crate::api::extract::{ApiJson, JobPath};
use crate::api::observe::request_id;
use crate::api::schemas::{GenerateBody, GenerateResult, JobDocument, ResultImage, Timings};
use crate::api::state::AppState;
use crate::api::sync::{self, CancelOnDrop};
use crate::jobs::{now_ms, JobRecord};

/// Whether the client asked not to wait (RFC 7240 `Prefer: respond-async`).
fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|pref| pref.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("respond-async"))
}

/// Whether `Accept` names `mime` (the job's output format) itself.
fn accepts_image(headers: &HeaderMap, mime: &str) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| range.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case(mime))
}

#[utoipa::path(
    post,
    path = "/generate",
    tag = "generate",
    request_body = GenerateBody,
    params(
        ("Prefer" = Option<String>, Header, description = "`respond-async`: answer 202 at once; follow the job at `Location`"),
        ("Accept" = Option<String>, Header, description = "The output format's type (`image/png` unless `output_format` says otherwise) with n = 1: the sync answer is the image itself"),
    ),
    responses(
        (status = 200, description = "Sync: the finished images", content((GenerateResult = "application/json"), ("image/png"), ("image/jpeg"), ("image/webp"))),
        (status = 202, description = "Async: the job was queued", body = JobDocument,
            headers(("Location" = String, description = "The job: `/jobs/{id}`"))),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 409, description = "Sync: the job was canceled before it finished", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
        (status = 429, description = "The queue is full", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "The job failed (its error type and message), or the server did", body = ErrorBody),
        (status = 503, description = "Models are loading, failed to load, or the server is shutting down", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 504, description = "Sync: the job did not finish within the server's limit (it is canceled)", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn generate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<ApiJson<GenerateBody>, ApiError>,
) -> Result<Response, ApiError> {
    let result = generate_inner(&state, caller, &headers, body).await;
    record_outcome(&result);
    result
}

async fn generate_inner(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
    body: Result<ApiJson<GenerateBody>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(body) = body?;
    let request = validate(state, &body)?;
    let job = JobRecord::new(Uuid::new_v4(), caller.owner, request, now_ms()).with_request_id(request_id(headers));
    if prefers_async(headers) {
        let created = admit(state, job).await?;
        let mut response = document_response(state, &created.record, StatusCode::ACCEPTED);
        response.headers_mut().insert("preference-applied", HeaderValue::from_static("respond-async"));
        return Ok(response);
    }
    let record = run_sync(state, job).await?;
    if record.request.n == 1 && accepts_image(headers, record.request.output.format.mime()) {
        let bytes = sync::pngs(state, &record).await?.pop().ok_or_else(|| ApiError::internal("a succeeded job has no image"))?;
        return Ok(([(header::CONTENT_TYPE, record.request.output.format.mime())], bytes).into_response());
    }
    let pngs = sync::pngs(state, &record).await?;
    let started = record.started_at.unwrap_or(record.created_at);
    let result = GenerateResult {
        id: record.id,
        images: record
            .images
            .iter()
            .zip(pngs)
            .map(|(info, png)| ResultImage { index: info.index, seed: info.seed, b64_json: base64::engine::general_purpose::STANDARD.encode(png) })
            .collect(),
        timings: Timings { queue_ms: started - record.created_at, compute_ms: record.completed_at.unwrap_or(started) - started },
    };
    Ok(Json(result).into_response())
}

/// Queues `job` and waits for it; the succeeded record, or why not. Shared with
/// the OpenAI endpoint.
pub async fn run_sync(state: &AppState, job: JobRecord) -> Result<JobRecord, ApiError> {
    let id = job.id;
    // Subscribe before submitting, so the end cannot slip past unseen.
    let events = state.events.subscribe();
    admit(state, job).await?;
    let guard = CancelOnDrop::new(state, id);
    // On timeout this returns early with the guard armed: dropping it cancels the job.
    let record = sync::finished(state, id, events).await?;
    guard.disarm();
    sync::succeeded(record)
}

#[utoipa::path(
    put,
    path = "/jobs/{id}",
    tag = "jobs",
    request_body = GenerateBody,
    params(("id" = uuid::Uuid, Path, description = "The job id, chosen by the client (a UUID)")),
    responses(
        (status = 200, description = "A job with this id exists already: it, unchanged", body = JobDocument),
        (status = 201, description = "The job was created and queued", body = JobDocument,
            headers(("Location" = String, description = "The job: `/jobs/{id}`"))),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "The id is not a UUID", body = ErrorBody),
        (status = 409, description = "Another API key's job has this id", body = ErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = ErrorBody),
        (status = 429, description = "The queue is full", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "The job store failed", body = ErrorBody),
        (status = 503, description = "Models are loading, failed to load, or the server is shutting down", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    ),
    security((), ("bearer" = []))
)]
pub async fn put_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: JobPath,
    headers: HeaderMap,
    body: Result<ApiJson<GenerateBody>, ApiError>,
) -> Result<Response, ApiError> {
    let result = put_inner(&state, caller, path, &headers, body).await;
    record_outcome(&result);
    result
}

async fn put_inner(
    state: &AppState,
    caller: Caller,
    path: JobPath,
    headers: &HeaderMap,
    body: Result<ApiJson<GenerateBody>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(body) = body?;
    let request = validate(state, &body)?;
    let id = path.id;
    // A retry must succeed even when the queue is full now: look before admitting.
    if let Some(existing) = state.with_store(move |s| s.get(id)).await? {
        return existing_response(state, &caller, &existing);
    }
    let job = JobRecord::new(id, caller.owner.clone(), request, now_ms()).with_request_id(request_id(headers));
    let created = admit(state, job).await?;
    if created.created {
        Ok(document_response(state, &created.record, StatusCode::CREATED))
    } else {
        existing_response(state, &caller, &created.record)
    }
}

fn existing_response(state: &AppState, caller: &Caller, job: &JobRecord) -> Result<Response, ApiError> {
    if caller.can_see(job) {
        Ok(document_response(state, job, StatusCode::OK))
    } else {
        Err(ApiError::IdTaken(job.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_preferences() {
        let mut h = HeaderMap::new();
        assert!(!prefers_async(&h) && !accepts_image(&h, "image/png"));
        h.insert("prefer", "wait=10, Respond-Async".parse().unwrap());
        h.insert(header::ACCEPT, "application/json;q=0.5, image/png".parse().unwrap());
        assert!(prefers_async(&h) && accepts_image(&h, "image/png"));
        h.insert("prefer", "return=minimal".parse().unwrap());
        h.insert(header::ACCEPT, "image/*".parse().unwrap());
        assert!(!prefers_async(&h) && !accepts_image(&h, "image/png"));
    }
}

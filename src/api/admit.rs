//! Admission of a generation request, in the order the house style asks:
//! validate (against the cascade that is ready now), check the queue's
//! capacity (so a full queue costs the client nothing and stores nothing),
//! store the job, then hand it to the queue.
//!
//! TGI's `router/src/validation.rs` + `infer/mod.rs` split the same way: only a
//! validated `GenerationRequest` can become a `JobRecord`.

use crate::api::errors::ApiError;
use crate::api::schemas::GenerateBody;
use crate::api::state::AppState;
use crate::jobs::{now_ms, Created, JobError, JobRecord};
use crate::metrics::{LABEL_OUTCOME, REQUEST_OUTCOMES};
use crate::pipeline::{plan, GenerationRequest, SourceSpec};

/// `body` checked against the loaded cascade (503 when none is ready).
pub fn validate(state: &AppState, body: &GenerateBody) -> Result<GenerationRequest, ApiError> {
    validate_spec(state, body, None)
}

/// [`validate`] for a body whose image input came another way (OpenAI's forms).
pub fn validate_with_source(state: &AppState, body: &GenerateBody, source: SourceSpec) -> Result<GenerationRequest, ApiError> {
    validate_spec(state, body, Some(source))
}

fn validate_spec(state: &AppState, body: &GenerateBody, source: Option<SourceSpec>) -> Result<GenerationRequest, ApiError> {
    let info = state.cascade()?;
    let mut spec = body.to_spec(&info, state.config.max_images)?;
    if let Some(source) = source {
        spec.source = Some(source);
    }
    Ok(plan(&spec, &info.limits())?)
}

/// Stores `job` and queues it. When a job with its id exists (an idempotent
/// retry), nothing is queued and the existing record comes back with `created: false`.
pub async fn admit(state: &AppState, job: JobRecord) -> Result<Created, ApiError> {
    state.queue.check_capacity(job.request.n)?;
    let stored = job.clone();
    let created = state.with_store(move |s| s.create(&stored)).await?;
    if !created.created {
        return Ok(created);
    }
    if let Err(e) = state.queue.submit(job.id) {
        // Capacity went between the check and the submit (or the server began
        // draining): the stored job must not look pending forever.
        let err = ApiError::from(e);
        let reason = JobError { kind: err.error_type().to_owned(), message: err.to_string() };
        let id = job.id;
        if let Err(store_err) = state.with_store(move |s| s.fail(id, &reason, now_ms())).await {
            tracing::error!(job = %id, error = %store_err, "could not mark an unqueued job failed");
        }
        return Err(err);
    }
    tracing::info!(job = %job.id, images = job.request.n, stages = job.request.stages.len(), "job queued");
    Ok(created)
}

/// Counts a generation request's outcome: `ok` or the error's machine tag.
pub fn record_outcome<T>(result: &Result<T, ApiError>) {
    let outcome = match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => e.error_type().to_owned(),
    };
    metrics::counter!(REQUEST_OUTCOMES, LABEL_OUTCOME => outcome).increment(1);
}

//! A job's Server-Sent Events stream (`GET /jobs/{id}/events`, per the WHATWG
//! HTML "Server-sent events" section): the current state first, then the job's
//! events as they happen, then one terminal event, and the stream ends.
//!
//! | event | data (JSON) |
//! |---|---|
//! | `state` | the job document, as `GET /jobs/{id}` |
//! | `queued`, `started` | `{"id"}` |
//! | `progress` | `{stage, stages, stage_name, step, total_steps, fraction}` |
//! | `stage_done` | `{stage, stage_name}` |
//! | `preview` | `{stage, step, images}`: x̂_0 as base64 PNGs (requests with `preview_every`) |
//! | `succeeded`, `failed`, `canceled` | the final job document |
//!
//! A forwarding task filters the shared broadcast down to this job. When it
//! lags (the broadcast overwrote events) it re-reads the store and sends a
//! fresh `state`, since every change is in the store; it stops as soon as the
//! client is gone.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::schemas::job::{PreviewDoc, ProgressDoc};
use super::state::AppState;
use crate::jobs::{JobEvent, JobRecord};

/// Events buffered for a slow client before the forwarder waits on it.
const BUFFER: usize = 64;

/// The event stream of `job`; `events` must have been subscribed before `job` was read.
pub fn stream(state: AppState, job: JobRecord, events: broadcast::Receiver<JobEvent>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(forward(state, job, events, tx));
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::default())
}

fn event(name: &str, data: &impl Serialize) -> Event {
    Event::default().event(name).data(serde_json::to_string(data).expect("event data serialises"))
}

fn terminal(state: &AppState, job: &JobRecord) -> Event {
    event(job.status.as_str(), &state.document(job))
}

async fn forward(state: AppState, job: JobRecord, mut events: broadcast::Receiver<JobEvent>, tx: mpsc::Sender<Event>) {
    let id = job.id;
    if tx.send(event("state", &state.document(&job))).await.is_err() {
        return;
    }
    if job.status.is_terminal() {
        let _ = tx.send(terminal(&state, &job)).await;
        return;
    }
    loop {
        let received = tokio::select! {
            _ = tx.closed() => return,
            received = events.recv() => received,
        };
        let next = match received {
            Ok(e) if e.id() != id => continue,
            Ok(JobEvent::Queued { .. }) => event("queued", &json!({ "id": id })),
            Ok(JobEvent::Started { .. }) => event("started", &json!({ "id": id })),
            Ok(JobEvent::Progress { progress, .. }) => event("progress", &ProgressDoc::from(&progress)),
            Ok(JobEvent::StageDone { stage, stage_name, .. }) => event("stage_done", &json!({ "stage": stage, "stage_name": stage_name })),
            Ok(JobEvent::Preview { preview, .. }) => event("preview", &PreviewDoc::from(&preview)),
            // The end, or events we may have missed: the store has the truth.
            Ok(JobEvent::Finished { .. }) | Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                let closed = matches!(received, Err(RecvError::Closed));
                let job = match state.job(id).await {
                    Ok(job) => job,
                    Err(e) => {
                        tracing::warn!(job = %id, error = %e, "event stream could not re-read its job");
                        return;
                    }
                };
                if job.status.is_terminal() {
                    let _ = tx.send(terminal(&state, &job)).await;
                    return;
                }
                if closed {
                    return;
                }
                event("state", &state.document(&job))
            }
        };
        if tx.send(next).await.is_err() {
            return;
        }
    }
}

//! OpenAI's streamed image generation (`stream: true` on
//! `/v1/images/generations`): Server-Sent Events named by their `type`,
//! `image_generation.partial_image` for each of the first `partial_images`
//! previews (x̂_0 partway through the base stage, one event per image), then one
//! `image_generation.completed` per finished image; a failed, canceled or timed
//! out job ends the stream with an `error` event in OpenAI's error envelope.
//!
//! Reference: <https://platform.openai.com/docs/api-reference/images-streaming>.
//! The job is created before the stream starts; a client that leaves cancels it
//! (the forwarder owns a `CancelOnDrop`), as a sync client that leaves does.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::errors::{ApiError, OpenAiError};
use super::state::AppState;
use super::sync::{self, CancelOnDrop};
use crate::jobs::{JobEvent, JobId, JobStatus};

/// What every event repeats about the request.
#[derive(Debug, Clone)]
pub struct StreamMeta {
    /// `WxH`.
    pub size: String,
    /// png, jpeg or webp: the completed images' format (partials are PNG).
    pub output_format: &'static str,
    pub partial_images: usize,
}

#[derive(Serialize)]
struct ImageEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    b64_json: String,
    created_at: i64,
    size: &'a str,
    quality: &'static str,
    background: &'static str,
    output_format: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    partial_image_index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// Token counts OpenAI reports for its own models; a diffusion cascade has none.
#[derive(Serialize, Default)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
    input_tokens_details: TokenDetails,
}

#[derive(Serialize, Default)]
struct TokenDetails {
    image_tokens: u64,
    text_tokens: u64,
}

const PARTIAL: &str = "image_generation.partial_image";
const COMPLETED: &str = "image_generation.completed";

fn now_s() -> i64 {
    crate::jobs::now_ms().div_euclid(1000)
}

fn event(kind: &str, data: &impl Serialize) -> Event {
    Event::default().event(kind).data(serde_json::to_string(data).expect("event data serialises"))
}

fn error_event(e: ApiError) -> Event {
    let body = serde_json::to_value(OpenAiError::from(e).body()).expect("error bodies serialise");
    let mut data = serde_json::json!({ "type": "error" });
    data["error"] = body["error"].clone();
    Event::default().event("error").data(data.to_string())
}

/// The stream of job `id`, already admitted; `events` was subscribed before it was.
pub fn stream(state: AppState, id: JobId, events: broadcast::Receiver<JobEvent>, meta: StreamMeta) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(16);
    let guard = CancelOnDrop::new(&state, id);
    tokio::spawn(async move {
        let limit = state.config.sync_timeout;
        match tokio::time::timeout(limit, forward(&state, id, events, &meta, &tx)).await {
            // Delivered, or the client left (the guard cancels the job as it drops).
            Ok(Ok(())) => guard.disarm(),
            Ok(Err(Gone)) => drop(guard),
            Err(_) => {
                let _ = tx.send(error_event(ApiError::Timeout { secs: limit.as_secs() })).await;
                drop(guard);
            }
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::default())
}

/// The client went away.
struct Gone;

async fn send(tx: &mpsc::Sender<Event>, e: Event) -> Result<(), Gone> {
    tx.send(e).await.map_err(|_| Gone)
}

async fn forward(state: &AppState, id: JobId, mut events: broadcast::Receiver<JobEvent>, meta: &StreamMeta, tx: &mpsc::Sender<Event>) -> Result<(), Gone> {
    let mut partials = 0;
    loop {
        let received = tokio::select! {
            _ = tx.closed() => return Err(Gone),
            received = events.recv() => received,
        };
        match received {
            Ok(JobEvent::Preview { id: of, preview }) if of == id && partials < meta.partial_images => {
                for b64_json in preview.images {
                    let data = ImageEvent {
                        kind: PARTIAL,
                        b64_json,
                        created_at: now_s(),
                        size: &meta.size,
                        quality: "auto",
                        background: "opaque",
                        output_format: "png",
                        partial_image_index: Some(partials),
                        usage: None,
                    };
                    send(tx, event(PARTIAL, &data)).await?;
                }
                partials += 1;
            }
            Ok(JobEvent::Finished { id: of, .. }) if of == id => break,
            Ok(_) => continue,
            // Ours may be among the events missed: the store decides below.
            Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                let closed = matches!(received, Err(RecvError::Closed));
                match state.job(id).await {
                    Ok(job) if job.status.is_terminal() => break,
                    Ok(_) if !closed => continue,
                    Ok(_) => return send(tx, error_event(ApiError::internal("the job event channel closed"))).await,
                    Err(e) => return send(tx, error_event(e)).await,
                }
            }
        }
    }
    let record = match state.job(id).await.and_then(sync::succeeded) {
        Ok(record) => record,
        Err(e) => return send(tx, error_event(e)).await,
    };
    debug_assert_eq!(record.status, JobStatus::Succeeded);
    let images = match sync::pngs(state, &record).await {
        Ok(images) => images,
        Err(e) => return send(tx, error_event(e)).await,
    };
    use base64::Engine as _;
    for bytes in images {
        let data = ImageEvent {
            kind: COMPLETED,
            b64_json: base64::engine::general_purpose::STANDARD.encode(bytes),
            created_at: now_s(),
            size: &meta.size,
            quality: "auto",
            background: "opaque",
            output_format: meta.output_format,
            partial_image_index: None,
            usage: Some(Usage::default()),
        };
        send(tx, event(COMPLETED, &data)).await?;
    }
    Ok(())
}

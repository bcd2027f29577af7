//! Request observability: the `x-request-id` (the client's, or a new UUID),
//! echoed on the response and carried on the request's tracing span, and the
//! per-route request counter.
//!
//! Built from tower-http's `request_id` and `trace` layers, the way TGI's router
//! and axum's `examples/tracing-aka-logging` wire them. The `route` label is the
//! matched route template (`/jobs/{id}`), never the raw path, so the metric's
//! cardinality stays bounded.

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::Response;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnBodyChunk, DefaultOnEos, DefaultOnRequest, DefaultOnResponse, MakeSpan, TraceLayer};
use tracing::Level;

use crate::metrics::{HTTP_REQUESTS, LABEL_ROUTE, LABEL_STATUS};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest request id a job keeps (a client may send a long header).
const MAX_STORED_REQUEST_ID: usize = 128;

/// The request's `x-request-id`, as a new job records it (shortened to 128 bytes).
pub fn request_id(headers: &axum::http::HeaderMap) -> Option<String> {
    let id = headers.get(&REQUEST_ID)?.to_str().ok()?;
    let mut end = id.len().min(MAX_STORED_REQUEST_ID);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    Some(id[..end].to_owned())
}

/// Sets `x-request-id` on requests that lack one (outermost layer).
pub fn set_request_id() -> SetRequestIdLayer<MakeRequestUuid> {
    SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid)
}

/// Copies the request's `x-request-id` onto the response.
pub fn propagate_request_id() -> PropagateRequestIdLayer {
    PropagateRequestIdLayer::new(REQUEST_ID)
}

/// One span per request, named by method and route, carrying the request id;
/// job logs inside handlers inherit it.
#[derive(Debug, Clone, Copy)]
pub struct RequestSpan;

impl<B> MakeSpan<B> for RequestSpan {
    fn make_span(&mut self, request: &axum::http::Request<B>) -> tracing::Span {
        let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str);
        let id = request.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
        tracing::info_span!("request", method = %request.method(), route, request_id = id)
    }
}

/// The request span and a response log line. Failures are not logged here:
/// `errors.rs` logs each refusal or internal error once, with its cause (a 503
/// while models load is not an ERROR).
pub fn trace() -> TraceLayer<SharedClassifier<ServerErrorsAsFailures>, RequestSpan, DefaultOnRequest, DefaultOnResponse, DefaultOnBodyChunk, DefaultOnEos, ()> {
    TraceLayer::new_for_http()
        .make_span_with(RequestSpan)
        .on_request(DefaultOnRequest::new().level(Level::DEBUG))
        .on_response(DefaultOnResponse::new().level(Level::INFO))
        .on_failure(())
}

/// Counts every answered request by route template and status.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    metrics::counter!(HTTP_REQUESTS, LABEL_ROUTE => route, LABEL_STATUS => response.status().as_u16().to_string()).increment(1);
    response
}

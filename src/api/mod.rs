//! The HTTP API: axum routes over the `JobStore` and `JobQueue` traits, never
//! the compute side itself (TGI's router/backend split), so tests run the whole
//! router against in-memory fakes.
//!
//! | file | owns |
//! |---|---|
//! | `state` | `AppState` (store, queue, events, readiness, config, metrics) and `ApiConfig` |
//! | `errors` | `ApiError`: the one mapping to status + JSON (native and OpenAI envelopes) |
//! | `extract` | the JSON body extractor (415/413/422 naming the field), job path params |
//! | `multipart` | `multipart/form-data` bodies (OpenAI edits and variations), errors naming the field |
//! | `schemas` | wire types: raw requests, job/info documents, OpenAI types |
//! | `auth` | optional bearer API keys, owner fingerprints, job visibility |
//! | `admit` | validate → check capacity → store → queue |
//! | `sync` | waiting for a job's end, cancel-on-disconnect, fetching images |
//! | `sse` | a job's Server-Sent Events stream |
//! | `openai_stream` | OpenAI's streamed generation events (partial and completed images) |
//! | `observe` | `x-request-id`, request spans, the request counter |
//! | `cors` | cross-origin access for pages hosted elsewhere (`--cors-origins`) |
//! | `handlers` | one file per resource |
//! | `openapi` | the OpenAPI document (served at `/openapi.json`, UI at `/docs`) |
//! | `ui` | the web playground at `/` and its assets (`--no-ui` turns it off) |

pub mod admit;
pub mod auth;
pub mod cors;
pub mod errors;
pub mod extract;
pub mod handlers;
pub mod multipart;
pub mod observe;
pub mod openai_stream;
pub mod openapi;
pub mod schemas;
pub mod sse;
pub mod state;
pub mod sync;
pub mod ui;

use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::Router;
use tower::ServiceBuilder;
use utoipa_swagger_ui::SwaggerUi;

pub use errors::ApiError;
pub use state::{ApiConfig, AppState};

/// The whole HTTP API over `state`: every route, `/openapi.json`, the Swagger UI
/// at `/docs` and the playground at `/` (assets built into the binary), and the
/// request-id, tracing, metrics, body-limit and (when configured) CORS layers.
pub fn router(state: AppState) -> Router {
    let (protected, _) = openapi::protected_routes().route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key)).split_for_parts();
    let (public, _) = openapi::public_routes().split_for_parts();
    // `ServiceBuilder` applies its layers top to bottom: the request id exists
    // before the span that records it, and the response gets it last.
    let observability = ServiceBuilder::new()
        .layer(observe::set_request_id())
        .layer(observe::trace())
        .layer(observe::propagate_request_id())
        .layer(middleware::from_fn(observe::count_requests));
    let mut app = Router::new().merge(protected).merge(public).merge(SwaggerUi::new("/docs").url("/openapi.json", openapi::openapi()));
    if state.config.ui {
        app = app.merge(ui::routes());
    }
    let app = app.layer(DefaultBodyLimit::max(state.config.max_body_bytes));
    // Inside the observability layers, so preflights get request ids and spans too.
    let app = match cors::layer(&state.config.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.layer(observability).with_state(state)
}

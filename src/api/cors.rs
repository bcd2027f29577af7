//! Cross-origin access (the Fetch standard's CORS protocol) for pages served
//! elsewhere — a playground on another host, a notebook — that call this API
//! from a browser. Off unless `--cors-origins` names origins; the page the
//! binary serves itself is same-origin and needs none of it.
//!
//! Preflights are answered by the layer before routing, so they never reach
//! the API-key check (browsers send them without credentials). An origin not
//! on the list gets no `Access-Control-Allow-Origin`, and the browser refuses.

use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may reuse a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for `origins` (`*` among them: any origin); `None` when empty.
pub fn layer(origins: &[HeaderValue]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") { AllowOrigin::any() } else { AllowOrigin::list(origins.iter().cloned()) };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT])
            // What the API reads: the key, JSON bodies, `Prefer: respond-async`, `Accept: image/png`.
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT, HeaderName::from_static("prefer")])
            // What a client needs to read back: the new job, when to retry, the id to quote.
            .expose_headers([header::LOCATION, header::RETRY_AFTER, HeaderName::from_static("x-request-id"), HeaderName::from_static("preference-applied")])
            .max_age(PREFLIGHT_MAX_AGE),
    )
}

//! The web playground: a page at `/` and its scripts and styles under
//! `/ui/<version>/`, all built into the binary (no CDN, nothing fetched at view
//! time). The page is a plain client of the public API — `/info` for the form's
//! defaults and limits, async `POST /generate`, the job's event stream, cancel,
//! `GET /jobs/{id}` for the gallery — so it needs no routes of its own beyond
//! its files, and `--no-ui` removes it entirely.
//!
//! Caching: `<version>` is a hash of every asset, so an asset URL names one
//! exact content and may be cached for a year (`immutable`); the page itself is
//! `no-cache` with an `ETag` of the same hash, so a browser revalidates it on
//! every visit (a cheap 304) and picks up a new build at once. Other versions
//! answer 404: an old page asking for old scripts would break in odder ways.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::errors::ApiError;
use super::state::AppState;

/// What `index.html` writes where the asset folder goes.
const VERSION_PLACEHOLDER: &str = "{{ASSETS}}";
/// Hex characters of the content hash in asset URLs.
const VERSION_HEX: usize = 12;

const CACHE_PAGE: &str = "no-cache";
const CACHE_ASSET: &str = "public, max-age=31536000, immutable";

/// One file under `/ui/<version>/`.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every served file but the page. Scripts are ES modules that import each
/// other by relative URL, so they share the versioned folder.
const ASSETS: &[Asset] = &[
    Asset { name: "style.css", content_type: "text/css; charset=utf-8", body: include_str!("assets/style.css") },
    Asset { name: "app.js", content_type: JS, body: include_str!("assets/app.js") },
    Asset { name: "api.js", content_type: JS, body: include_str!("assets/api.js") },
    Asset { name: "form.js", content_type: JS, body: include_str!("assets/form.js") },
    Asset { name: "job.js", content_type: JS, body: include_str!("assets/job.js") },
    Asset { name: "gallery.js", content_type: JS, body: include_str!("assets/gallery.js") },
];

const INDEX: &str = include_str!("assets/index.html");

/// The page with its asset URLs resolved, and the version they carry.
struct Page {
    version: String,
    html: String,
    etag: HeaderValue,
}

static PAGE: LazyLock<Page> = LazyLock::new(|| {
    let mut hasher = Sha256::new();
    hasher.update(INDEX);
    for asset in ASSETS {
        hasher.update(asset.name);
        hasher.update(asset.body);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    let version: String = digest.iter().map(|b| format!("{b:02x}")).collect::<String>()[..VERSION_HEX].to_owned();
    let html = INDEX.replace(VERSION_PLACEHOLDER, &format!("/ui/{version}"));
    let etag = HeaderValue::from_str(&format!("\"{version}\"")).expect("a hex ETag is a valid header value");
    Page { version, html, etag }
});

/// The version in this build's asset URLs (`/ui/<version>/app.js`).
pub fn version() -> &'static str {
    &PAGE.version
}

/// `/` and `/ui/<version>/<file>`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/ui/{version}/{file}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    let page = &*PAGE;
    let cache = [(header::CACHE_CONTROL, HeaderValue::from_static(CACHE_PAGE)), (header::ETAG, page.etag.clone())];
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || page.etag == tag.trim_start_matches("W/"));
    if matches {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (cache, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], page.html.as_str()).into_response()
}

async fn asset(Path((version, file)): Path<(String, String)>) -> Result<Response, ApiError> {
    let asset = ASSETS.iter().find(|a| a.name == file).filter(|_| version == PAGE.version).ok_or(ApiError::NotFound("asset"))?;
    Ok(([(header::CONTENT_TYPE, asset.content_type), (header::CACHE_CONTROL, CACHE_ASSET)], asset.body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_every_asset_by_version() {
        assert_eq!(version().len(), VERSION_HEX);
        assert!(!PAGE.html.contains(VERSION_PLACEHOLDER));
        for linked in ["style.css", "app.js"] {
            assert!(PAGE.html.contains(&format!("/ui/{}/{linked}", version())), "index.html must link {linked}");
        }
    }
}

//! The playground's routes and the CORS layer through `Router::oneshot`, on
//! the handler tests' fakes: the page and its assets with their types and
//! cache headers, `--no-ui`, and preflights from allowed and other origins.

mod api_support;

use api_support::{get, Behaviour, Harness};
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use diffusiond::api::ApiConfig;

fn harness(config: ApiConfig) -> Harness {
    Harness::with_config(Behaviour::Hold, config)
}

/// The `/ui/<version>/...` URLs the page links, and the modules they import.
fn linked_assets(html: &str) -> Vec<String> {
    html.split(['"', '\''])
        .filter(|s| s.starts_with("/ui/"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_page_and_its_assets_have_their_types_and_cache_headers() {
    let h = harness(ApiConfig::default());
    let page = h.send(get("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(page.header("cache-control"), Some("no-cache"), "the page is revalidated every time");
    let etag = page.header("etag").expect("the page has an ETag").to_owned();
    let html = page.text();
    assert!(html.contains("id=\"prompt\"") && html.contains("id=\"generate\""));

    let linked = linked_assets(&html);
    let version = diffusiond::api::ui::version();
    assert!(linked.iter().all(|u| u.starts_with(&format!("/ui/{version}/"))), "{linked:?}");
    let script = linked.iter().find(|u| u.ends_with("/app.js")).expect("the page loads app.js");
    let style = linked.iter().find(|u| u.ends_with("/style.css")).expect("the page loads style.css");

    let css = h.send(get(style)).await;
    assert_eq!((css.status, css.header("content-type")), (StatusCode::OK, Some("text/css; charset=utf-8")));
    assert_eq!(css.header("cache-control"), Some("public, max-age=31536000, immutable"));

    // app.js and every module it imports, relative to the same versioned folder.
    let app = h.send(get(script)).await;
    assert_eq!((app.status, app.header("content-type")), (StatusCode::OK, Some("text/javascript; charset=utf-8")));
    let imports: Vec<String> = app.text().lines().filter_map(|l| l.split("from \"./").nth(1)).map(|rest| rest.trim_end_matches("\";").to_owned()).collect();
    assert!(imports.len() >= 3, "{imports:?}");
    for module in imports {
        let reply = h.send(get(&format!("/ui/{version}/{module}"))).await;
        assert_eq!(reply.status, StatusCode::OK, "{module}");
        assert_eq!(reply.header("content-type"), Some("text/javascript; charset=utf-8"), "{module}");
        assert_eq!(reply.header("cache-control"), Some("public, max-age=31536000, immutable"), "{module}");
        assert!(!reply.text().contains("https://") && !reply.text().contains("http://"), "{module} fetches nothing from elsewhere");
    }

    // The same ETag answers 304 without a body; another build's assets are gone.
    let again = h.send(Request::get("/").header("if-none-match", &etag).body(Body::empty()).unwrap()).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let stale = h.send(Request::get("/").header("if-none-match", "\"0123456789ab\"").body(Body::empty()).unwrap()).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(h.send(get("/ui/0123456789ab/app.js")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.send(get(&format!("/ui/{version}/secrets.txt"))).await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.send(get("/docs/")).await.status, StatusCode::OK, "Swagger UI stays at /docs");
}

#[tokio::test]
async fn the_page_is_public_even_when_the_api_needs_keys() {
    let h = harness(ApiConfig::new(vec!["secret".into()]));
    assert_eq!(h.send(get("/")).await.status, StatusCode::OK);
    let version = diffusiond::api::ui::version();
    assert_eq!(h.send(get(&format!("/ui/{version}/app.js"))).await.status, StatusCode::OK);
    // The page learns that a key is needed from /info's 401.
    let info = h.send(get("/info")).await;
    assert_eq!(info.status, StatusCode::UNAUTHORIZED);
    assert_eq!(info.header("www-authenticate"), Some("Bearer"));
}

#[tokio::test]
async fn no_ui_turns_the_page_off() {
    let h = harness(ApiConfig { ui: false, ..ApiConfig::default() });
    assert_eq!(h.send(get("/")).await.status, StatusCode::NOT_FOUND);
    let version = diffusiond::api::ui::version();
    assert_eq!(h.send(get(&format!("/ui/{version}/app.js"))).await.status, StatusCode::NOT_FOUND);
    assert_eq!(h.send(get("/health")).await.status, StatusCode::OK);
    assert_eq!(h.send(get("/docs/")).await.status, StatusCode::OK);
}

fn preflight(origin: &str) -> Request<Body> {
    Request::options("/generate")
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "authorization, content-type, prefer")
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn cors_preflights_are_honoured_for_allowed_origins_only() {
    let allowed = "https://playground.example";
    let config = ApiConfig { cors_origins: vec![HeaderValue::from_static(allowed)], ..ApiConfig::new(vec!["secret".into()]) };
    let h = harness(config);

    // A preflight carries no key; it is answered before the key check.
    let ok = h.send(preflight(allowed)).await;
    assert!(ok.status.is_success(), "{}", ok.status);
    assert_eq!(ok.header("access-control-allow-origin"), Some(allowed));
    let methods = ok.header("access-control-allow-methods").unwrap_or_default().to_ascii_uppercase();
    assert!(methods.contains("POST") && methods.contains("GET"), "{methods}");
    let headers = ok.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
    assert!(["authorization", "content-type", "prefer"].iter().all(|h| headers.contains(h)), "{headers}");
    assert!(ok.header("access-control-max-age").is_some());
    assert!(ok.header("x-request-id").is_some(), "preflights pass through the request-id layer");

    let other = h.send(preflight("https://elsewhere.example")).await;
    assert_eq!(other.header("access-control-allow-origin"), None);

    // An actual cross-origin request: allowed, with the headers a client reads exposed.
    let req = Request::get("/info").header("origin", allowed).header("authorization", "Bearer secret").body(Body::empty()).unwrap();
    let info = h.send(req).await;
    assert_eq!(info.status, StatusCode::OK);
    assert_eq!(info.header("access-control-allow-origin"), Some(allowed));
    let exposed = info.header("access-control-expose-headers").unwrap_or_default().to_ascii_lowercase();
    assert!(exposed.contains("location") && exposed.contains("retry-after"), "{exposed}");
    let req = Request::get("/info").header("origin", "https://elsewhere.example").header("authorization", "Bearer secret").body(Body::empty()).unwrap();
    assert_eq!(h.send(req).await.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn without_cors_origins_there_is_no_cross_origin_access() {
    let h = harness(ApiConfig::default());
    let reply = h.send(preflight("https://playground.example")).await;
    assert_eq!(reply.header("access-control-allow-origin"), None);
    assert_ne!(reply.status, StatusCode::OK, "no layer answers the preflight");
}

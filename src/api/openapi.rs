//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! attributes and the schemas' `ToSchema` derives (utoipa + utoipa-axum), so the
//! routes served and the routes documented come from one list ([`routes`]).
//!
//! `diffusiond openapi` prints it; `openapi/openapi.json` is that output, kept
//! in the repository and checked against the code by `tests/openapi.rs`.

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::handlers::{generate, jobs, meta, openai};
use super::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "diffusiond",
        description = "Text-to-image diffusion inference: a frozen text encoder, a guided base stage and super-resolution stages. \
            Sync or async generation, jobs with progress events, and OpenAI's Images API.",
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "generate", description = "Create images"),
        (name = "jobs", description = "Follow, fetch and cancel jobs"),
        (name = "openai", description = "OpenAI-compatible Images API"),
        (name = "meta", description = "Health, readiness, description, metrics"),
    )
)]
struct ApiDoc;

/// Declares the optional bearer scheme that protected operations reference.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let scheme = Http::builder().scheme(HttpAuthScheme::Bearer).description(Some("An API key, when the server is configured with keys")).build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// Routes that need an API key when keys are configured.
pub(crate) fn protected_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(generate::generate))
        .routes(routes!(jobs::get_job, generate::put_job))
        .routes(routes!(jobs::get_image))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(jobs::job_events))
        .routes(routes!(openai::images_generations))
        .routes(routes!(openai::images_edits))
        .routes(routes!(openai::images_variations))
        .routes(routes!(meta::info))
}

/// Routes open to everyone: probes, scrapes and the API description.
pub(crate) fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(meta::health)).routes(routes!(meta::ready)).routes(routes!(meta::metrics))
}

/// The OpenAPI document of every route, titled `diffusiond`, versioned like the crate.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi()).merge(protected_routes()).merge(public_routes()).into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// The document as the repository keeps it: pretty JSON and a final newline.
pub fn openapi_json() -> String {
    let mut text = openapi().to_pretty_json().expect("the OpenAPI document serialises");
    text.push('\n');
    text
}

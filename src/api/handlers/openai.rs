//! OpenAI's Images API (<https://platform.openai.com/docs/api-reference/images>):
//! `POST /v1/images/generations` (JSON), `/v1/images/edits` and
//! `/v1/images/variations` (multipart), always sync, errors in OpenAI's envelope
//! (`{"error": {message, type, param, code}}`).
//!
//! Each request becomes a native request and runs exactly like a sync
//! `POST /generate`, including cancel-on-disconnect and the sync timeout.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use uuid::Uuid;

use super::generate::run_sync;
use crate::api::admit::{admit, record_outcome, validate, validate_with_source};
use crate::api::openai_stream::{self, StreamMeta};
use crate::api::schemas::generate::format_size;
use crate::api::multipart::Form;
use crate::pipeline::source::decode;
use crate::pipeline::{GenerationRequest, Mask, Picture, PictureLimits, SourceSpec};
use crate::pipeline::stage::StageKind;
use crate::api::auth::Caller;
use crate::api::errors::{ApiError, OpenAiError, OpenAiErrorBody};
use crate::api::extract::ApiJson;
use crate::api::observe::request_id;
use crate::api::schemas::job::image_url;
use crate::api::schemas::openai::{EditsForm, VariationsForm};
use crate::api::schemas::{ImageData, ImagesRequest, ImagesResponse, ResponseFormat};
use crate::api::state::AppState;
use crate::api::sync;
use crate::jobs::{now_ms, JobRecord};

#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "openai",
    request_body = ImagesRequest,
    responses(
        (status = 200, description = "The finished images; with `stream`, Server-Sent Events: `image_generation.partial_image` \
            (x̂₀ of the base stage, `partial_images` times), `image_generation.completed` per image, or `error`",
            content((ImagesResponse = "application/json"), ("text/event-stream"))),
        (status = 401, description = "Missing or invalid API key", body = OpenAiErrorBody),
        (status = 409, description = "The job was canceled before it finished", body = OpenAiErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = OpenAiErrorBody),
        (status = 415, description = "The body is not JSON", body = OpenAiErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = OpenAiErrorBody),
        (status = 429, description = "The queue is full", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "The job failed (`code` is its error type), or the server did", body = OpenAiErrorBody),
        (status = 503, description = "Models are loading, failed to load, or the server is shutting down", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 504, description = "The job did not finish within the server's limit (it is canceled)", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn images_generations(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<ApiJson<ImagesRequest>, ApiError>,
) -> Result<Response, OpenAiError> {
    let result = generate(&state, caller, &headers, body).await;
    record_outcome(&result);
    Ok(result?)
}

async fn generate(state: &AppState, caller: Caller, headers: &HeaderMap, body: Result<ApiJson<ImagesRequest>, ApiError>) -> Result<Response, ApiError> {
    let ApiJson(body) = body?;
    let partial_images = usize::from(body.partial_images.unwrap_or(0));
    if partial_images > 3 {
        return Err(ApiError::invalid("partial_images", format!("{partial_images} is outside 0..=3")));
    }
    if body.partial_images.is_some() && body.stream != Some(true) {
        return Err(ApiError::invalid("partial_images", "needs `stream: true`"));
    }
    let mut request = validate(state, &body.to_generate())?;
    if body.stream != Some(true) {
        let response = respond(state, caller, headers, request, body.response_format.unwrap_or_default()).await?;
        return Ok(Json(response).into_response());
    }
    // Previews spread over the base stage: its steps k, 2k, …, below its last.
    if partial_images > 0 {
        let steps = request.stages[0].sampler.steps;
        request.preview_every = Some((steps / (partial_images + 1)).max(1));
    }
    let (h, w) = state.cascade()?.stages[request.stages.last().map_or(0, |s| s.index)].0.size;
    let meta = StreamMeta { size: format_size((h, w)), output_format: request.output.format.extension_name(), partial_images };
    let job = JobRecord::new(Uuid::new_v4(), caller.owner, request, now_ms()).with_request_id(request_id(headers));
    let id = job.id;
    let events = state.events.subscribe();
    admit(state, job).await?;
    Ok(openai_stream::stream(state.clone(), id, events, meta).into_response())
}

/// Runs `request` as a sync job and answers in OpenAI's shape.
async fn respond(state: &AppState, caller: Caller, headers: &HeaderMap, request: GenerationRequest, format: ResponseFormat) -> Result<ImagesResponse, ApiError> {
    let job = JobRecord::new(Uuid::new_v4(), caller.owner, request, now_ms()).with_request_id(request_id(headers));
    let record = run_sync(state, job).await?;
    let data = match format {
        ResponseFormat::Url => {
            record.images.iter().map(|i| ImageData { b64_json: None, url: Some(image_url(record.id, i.index)), seed: i.seed }).collect()
        }
        ResponseFormat::B64Json => {
            let pngs = sync::pngs(state, &record).await?;
            record
                .images
                .iter()
                .zip(pngs)
                .map(|(i, png)| ImageData { b64_json: Some(base64::engine::general_purpose::STANDARD.encode(png)), url: None, seed: i.seed })
                .collect()
        }
    };
    Ok(ImagesResponse { created: record.created_at.div_euclid(1000), data, id: record.id })
}

#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "openai",
    request_body(content = EditsForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The edited images", body = ImagesResponse),
        (status = 401, description = "Missing or invalid API key", body = OpenAiErrorBody),
        (status = 409, description = "The job was canceled before it finished", body = OpenAiErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = OpenAiErrorBody),
        (status = 415, description = "The body is not multipart/form-data", body = OpenAiErrorBody),
        (status = 422, description = "A field is invalid (an image that does not decode, a mask of another size); `param` names it", body = OpenAiErrorBody),
        (status = 429, description = "The queue is full", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "The job failed (`code` is its error type), or the server did", body = OpenAiErrorBody),
        (status = 503, description = "Models are loading, failed to load, or the server is shutting down", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 504, description = "The job did not finish within the server's limit (it is canceled)", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn images_edits(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    form: Result<Form, ApiError>,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let result = edit(&state, caller, &headers, form).await;
    record_outcome(&result);
    Ok(Json(result?))
}

async fn edit(state: &AppState, caller: Caller, headers: &HeaderMap, form: Result<Form, ApiError>) -> Result<ImagesResponse, ApiError> {
    let form = EditsForm::from_form(&form?)?;
    let limits = PictureLimits::default();
    let image = decode("image", &form.image, &limits)?;
    let mask = match &form.mask {
        Some(bytes) => {
            let mask = decode("mask", bytes, &limits)?;
            Some(if mask.color().has_alpha() { Mask::from_transparency(&mask) } else { Mask::from_image(&mask) })
        }
        None if image.color().has_alpha() && Mask::from_transparency(&image).repaints_anything() => Some(Mask::from_transparency(&image)),
        None => None,
    };
    let image = Picture::from_image(&image);
    let source = match mask {
        Some(mask) => SourceSpec::Inpaint { image, mask, strength: form.strength },
        None => SourceSpec::Image { image, strength: form.strength },
    };
    let request = validate_with_source(state, &form.to_generate(), source).map_err(openai_fields)?;
    respond(state, caller, headers, request, form.response_format.unwrap_or_default()).await
}

#[utoipa::path(
    post,
    path = "/v1/images/variations",
    tag = "openai",
    request_body(content = VariationsForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The variations", body = ImagesResponse),
        (status = 401, description = "Missing or invalid API key", body = OpenAiErrorBody),
        (status = 409, description = "The job was canceled before it finished", body = OpenAiErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = OpenAiErrorBody),
        (status = 415, description = "The body is not multipart/form-data", body = OpenAiErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = OpenAiErrorBody),
        (status = 429, description = "The queue is full", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "The job failed (`code` is its error type), or the server did", body = OpenAiErrorBody),
        (status = 503, description = "Models are loading, failed to load, or the server is shutting down", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 504, description = "The job did not finish within the server's limit (it is canceled)", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn images_variations(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    form: Result<Form, ApiError>,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let result = vary(&state, caller, &headers, form).await;
    record_outcome(&result);
    Ok(Json(result?))
}

async fn vary(state: &AppState, caller: Caller, headers: &HeaderMap, form: Result<Form, ApiError>) -> Result<ImagesResponse, ApiError> {
    let form = VariationsForm::from_form(&form?)?;
    let image = Picture::from_image(&decode("image", &form.image, &PictureLimits::default())?);
    // On an unCLIP cascade a variation is DALL-E 2's own: new images drawn
    // from the image's CLIP embedding; elsewhere it is an SDEdit of the image.
    let unclip = state.cascade()?.stages.first().is_some_and(|(s, _)| s.kind == StageKind::Prior);
    let source = match (unclip, form.strength) {
        (false, strength) => SourceSpec::Image { image, strength },
        (true, None) => SourceSpec::ImageEmbedding { image },
        (true, Some(_)) => {
            return Err(ApiError::invalid("strength", "an unCLIP cascade draws variations from the image's CLIP embedding: it takes no strength"))
        }
    };
    let request = validate_with_source(state, &form.to_generate(), source).map_err(openai_fields)?;
    respond(state, caller, headers, request, form.response_format.unwrap_or_default()).await
}

/// The native field paths of an image input, as the form names them.
fn openai_fields(e: ApiError) -> ApiError {
    match e {
        ApiError::Invalid { param, message } => {
            let param = match param.as_str() {
                "source.image" => "image".to_owned(),
                "source.mask" => "mask".to_owned(),
                "source.strength" => "strength".to_owned(),
                "steps" => "num_inference_steps".to_owned(),
                _ => param,
            };
            ApiError::Invalid { param, message }
        }
        other => other,
    }
}

//! OpenAI's Images API (`POST /v1/images/generations`, `/edits`, `/variations`)
//! requests and responses, so that OpenAI SDKs work against this server, plus a
//! few extensions (`seed`, `negative_prompt`, `guidance_scale`,
//! `num_inference_steps`, `strength`).
//!
//! Reference: <https://platform.openai.com/docs/api-reference/images>. `model`,
//! `user`, `quality`, `background`, `style` and `moderation` are accepted and
//! ignored (SDKs send them, and the server runs the one cascade it loaded); each
//! request becomes a [`GenerateBody`] (or its `RequestSpec`), so validation is
//! the native endpoint's.
//!
//! Edits follow OpenAI's mask convention: the *transparent* pixels of `mask`
//! (alpha 0) are repainted; a mask without alpha uses the native one (white =
//! repaint); without `mask`, the transparent pixels of `image` are repainted,
//! and an opaque image is edited as a whole (image-to-image at `strength`).
//! Variations are image-to-image from the image under the empty prompt (or the
//! `prompt` extension): this cascade has no image embedding to condition on.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::generate::{GenerateBody, OutputFormat};
use crate::api::errors::ApiError;
use crate::api::multipart::Form;

/// How images come back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    #[default]
    B64Json,
    /// A link to `/jobs/{id}/images/{index}` (relative to this server).
    Url,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    #[schema(example = "a red circle on top of a blue square", max_length = 4000)]
    pub prompt: String,
    /// Images to generate (default 1).
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<usize>,
    /// `WxH`, one of the cascade's stage sizes (default: the last stage's).
    pub size: Option<String>,
    pub response_format: Option<ResponseFormat>,
    /// Accepted and ignored.
    pub model: Option<String>,
    /// Accepted and ignored.
    pub user: Option<String>,
    /// Extension: image i uses seed + i.
    pub seed: Option<u64>,
    /// Extension.
    #[schema(max_length = 4000)]
    pub negative_prompt: Option<String>,
    /// Extension: the base stage's guidance scale.
    #[schema(minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: Option<f32>,
    /// Extension: the base stage's steps.
    #[schema(minimum = 1)]
    pub num_inference_steps: Option<usize>,
    /// png (default), jpeg or webp.
    pub output_format: Option<OutputFormat>,
    /// JPEG quality, 0–100 (100 when unset).
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// Accepted and ignored.
    pub quality: Option<String>,
    /// Accepted and ignored.
    pub background: Option<String>,
    /// Accepted and ignored.
    pub style: Option<String>,
    /// Accepted and ignored.
    pub moderation: Option<String>,
    /// Accepted and ignored.
    pub safety_identifier: Option<String>,
    /// Answer with Server-Sent Events: partial images, then the finished ones.
    pub stream: Option<bool>,
    /// With `stream`: how many previews of the base stage to send first (0–3, default 0).
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u8>,
}

impl ImagesRequest {
    pub fn to_generate(&self) -> GenerateBody {
        GenerateBody {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n: self.n,
            size: self.size.clone(),
            seed: self.seed,
            steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
            output_format: self.output_format,
            output_compression: self.output_compression,
            ..GenerateBody::default()
        }
    }
}

/// `POST /v1/images/edits`, as `multipart/form-data`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct EditsForm {
    /// The image to edit (PNG, JPEG or WebP; `image[]` is accepted for one image).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// Same size as `image`; its transparent pixels are repainted.
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<Vec<u8>>,
    #[schema(max_length = 4000)]
    pub prompt: String,
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<usize>,
    /// `WxH`, one of the cascade's stage sizes (default: the last stage's).
    pub size: Option<String>,
    pub response_format: Option<ResponseFormat>,
    pub output_format: Option<OutputFormat>,
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// Extension: image i uses seed + i.
    pub seed: Option<u64>,
    /// Extension.
    #[schema(max_length = 4000)]
    pub negative_prompt: Option<String>,
    /// Extension: the base stage's guidance scale.
    #[schema(minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: Option<f32>,
    /// Extension: the base stage's steps.
    #[schema(minimum = 1)]
    pub num_inference_steps: Option<usize>,
    /// Extension: how much to change, in (0, 1] (1 inside a mask, 0.7 for a whole-image edit).
    #[schema(minimum = 0.0, exclusive_minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
    /// Accepted and ignored.
    pub model: Option<String>,
    /// Accepted and ignored.
    pub user: Option<String>,
    /// Accepted and ignored.
    pub quality: Option<String>,
    /// Accepted and ignored.
    pub background: Option<String>,
}

/// `POST /v1/images/variations`, as `multipart/form-data`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct VariationsForm {
    /// The image to vary (PNG, JPEG or WebP).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    #[schema(minimum = 1, maximum = 8)]
    pub n: Option<usize>,
    /// `WxH`, one of the cascade's stage sizes (default: the last stage's).
    pub size: Option<String>,
    pub response_format: Option<ResponseFormat>,
    pub output_format: Option<OutputFormat>,
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u8>,
    /// Extension: image i uses seed + i.
    pub seed: Option<u64>,
    /// Extension: what the variations should show (the empty prompt when unset).
    #[schema(max_length = 4000)]
    pub prompt: Option<String>,
    /// Extension: how far a variation strays from the image, in (0, 1] (0.7 when unset).
    /// An unCLIP cascade draws its variations from the image's CLIP embedding
    /// (DALL-E 2) and refuses it.
    #[schema(minimum = 0.0, exclusive_minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
    /// Accepted and ignored.
    pub model: Option<String>,
    /// Accepted and ignored.
    pub user: Option<String>,
}

fn parse_enum<T: serde::de::DeserializeOwned>(form: &Form, name: &str) -> Result<Option<T>, ApiError> {
    match form.text(name)? {
        None => Ok(None),
        Some(text) => serde_json::from_value(serde_json::Value::String(text.trim().to_owned()))
            .map(Some)
            .map_err(|_| ApiError::invalid(name, format!("`{text}` is not a valid value"))),
    }
}

impl EditsForm {
    pub const FIELDS: [&'static str; 17] = [
        "image", "mask", "prompt", "n", "size", "response_format", "output_format", "output_compression", "seed", "negative_prompt",
        "guidance_scale", "num_inference_steps", "strength", "model", "user", "quality", "background",
    ];

    pub fn from_form(form: &Form) -> Result<Self, ApiError> {
        form.only(&Self::FIELDS)?;
        Ok(Self {
            image: form.required_file("image")?.to_vec(),
            mask: form.file("mask").map(<[u8]>::to_vec),
            prompt: form.text("prompt")?.ok_or_else(|| ApiError::invalid("prompt", "is required"))?,
            n: form.parse("n")?,
            size: form.text("size")?,
            response_format: parse_enum(form, "response_format")?,
            output_format: parse_enum(form, "output_format")?,
            output_compression: form.parse("output_compression")?,
            seed: form.parse("seed")?,
            negative_prompt: form.text("negative_prompt")?,
            guidance_scale: form.parse("guidance_scale")?,
            num_inference_steps: form.parse("num_inference_steps")?,
            strength: form.parse("strength")?,
            model: form.text("model")?,
            user: form.text("user")?,
            quality: form.text("quality")?,
            background: form.text("background")?,
        })
    }

    /// The native body, without the images (they become the request's source).
    pub fn to_generate(&self) -> GenerateBody {
        GenerateBody {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            n: self.n,
            size: self.size.clone(),
            seed: self.seed,
            steps: self.num_inference_steps,
            guidance_scale: self.guidance_scale,
            output_format: self.output_format,
            output_compression: self.output_compression,
            ..GenerateBody::default()
        }
    }
}

impl VariationsForm {
    pub const FIELDS: [&'static str; 11] =
        ["image", "n", "size", "response_format", "output_format", "output_compression", "seed", "prompt", "strength", "model", "user"];

    pub fn from_form(form: &Form) -> Result<Self, ApiError> {
        form.only(&Self::FIELDS)?;
        Ok(Self {
            image: form.required_file("image")?.to_vec(),
            n: form.parse("n")?,
            size: form.text("size")?,
            response_format: parse_enum(form, "response_format")?,
            output_format: parse_enum(form, "output_format")?,
            output_compression: form.parse("output_compression")?,
            seed: form.parse("seed")?,
            prompt: form.text("prompt")?,
            strength: form.parse("strength")?,
            model: form.text("model")?,
            user: form.text("user")?,
        })
    }

    pub fn to_generate(&self) -> GenerateBody {
        GenerateBody {
            prompt: self.prompt.clone().unwrap_or_default(),
            n: self.n,
            size: self.size.clone(),
            seed: self.seed,
            output_format: self.output_format,
            output_compression: self.output_compression,
            ..GenerateBody::default()
        }
    }
}

/// One image: `b64_json` or `url`, as `response_format` asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Extension: the image's seed.
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix time in seconds.
    pub created: i64,
    pub data: Vec<ImageData>,
    /// Extension: the job, for `GET /jobs/{id}`.
    pub id: uuid::Uuid,
}

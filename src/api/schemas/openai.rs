//! OpenAI's Images API (`POST /v1/images/generations`) request and response, so
//! that OpenAI SDKs work against this server, plus a few extensions
//! (`seed`, `negative_prompt`, `guidance_scale`, `num_inference_steps`).
//!
//! Reference: <https://platform.openai.com/docs/api-reference/images/create>.
//! `model` and `user` are accepted and ignored (SDKs send a model name, and the
//! server runs the one cascade it loaded); the request becomes a
//! [`GenerateBody`], so validation is the native endpoint's.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::generate::GenerateBody;

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
    #[schema(example = "a red circle on top of a blue square")]
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
    pub negative_prompt: Option<String>,
    /// Extension: the base stage's guidance scale.
    #[schema(minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: Option<f32>,
    /// Extension: the base stage's steps.
    #[schema(minimum = 1)]
    pub num_inference_steps: Option<usize>,
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

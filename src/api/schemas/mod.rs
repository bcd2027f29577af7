//! The API's wire types: raw requests (optional fields, unknown fields
//! rejected, `ToSchema` for the OpenAPI document) and the documents responses
//! carry. Only `generate::GenerateBody::to_spec` leads inward, to the
//! pipeline's `RequestSpec`; responses are built from stored `JobRecord`s.
//!
//! | file | owns |
//! |---|---|
//! | `generate` | the generate body, its conversion to `RequestSpec`, the sync result |
//! | `source` | image inputs (edit, inpaint, upscale, invert) and seed mixes |
//! | `job` | the job document (status, progress, times, images, settings) |
//! | `openai` | OpenAI Images API request and response |
//! | `info` | health, readiness and cascade description documents |
//! | `time` | RFC 3339 timestamps |

pub mod generate;
pub mod info;
pub mod job;
pub mod openai;
pub mod source;
pub mod time;

pub use generate::{GenerateBody, GenerateResult, ResultImage, Sampler, StageOverrideBody, Timings};
pub use info::{InfoDocument, StatusDoc};
pub use job::{JobDocument, Status};
pub use source::{InterpolateBody, SourceBody, VariationBody};
pub use openai::{ImageData, ImagesRequest, ImagesResponse, ResponseFormat};

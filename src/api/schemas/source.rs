//! The parts of a generate body that start from something other than fresh
//! noise: a user's image (`source`: edit, inpaint, upscale, invert, or its
//! CLIP embedding on an unCLIP cascade) and a mix of
//! seeds (`variation`, `interpolate`), and their conversion to the pipeline's
//! `SourceSpec` / `NoiseMix`.
//!
//! Images come as base64 (standard alphabet, with or without padding) or as a
//! `data:` URL, in PNG, JPEG or WebP; they are decoded here, so an undecodable
//! image is a 422 naming its field before anything is queued.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::errors::ApiError;
use crate::pipeline::source::decode;
use crate::pipeline::{Mask, NoiseMix, Picture, PictureLimits, SourceSpec};

/// An image to start from. `kind` picks what is done with it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceBody {
    /// Image-to-image (SDEdit): the image, noised to `strength`, is denoised under
    /// the prompt at the base stage; the super-resolution stages upscale the result.
    Image {
        /// Base64 or a `data:` URL; PNG, JPEG or WebP, with the output's aspect ratio.
        image: String,
        /// How much to change: the fraction of the base stage's steps that run
        /// (0.7 when unset). At least one step must run.
        #[schema(minimum = 0.0, exclusive_minimum = 0.0, maximum = 1.0)]
        strength: Option<f64>,
    },
    /// Inpainting: the white part of `mask` is repainted under the prompt, the
    /// rest kept exactly, at every stage.
    Inpaint {
        /// Base64 or a `data:` URL; PNG, JPEG or WebP, with the output's aspect ratio.
        image: String,
        /// Same size as `image`; white (≥ 50% grey) = repaint. Must repaint something.
        mask: String,
        /// The fraction of the base stage's steps that run in the mask (1 when unset).
        #[schema(minimum = 0.0, exclusive_minimum = 0.0, maximum = 1.0)]
        strength: Option<f64>,
    },
    /// Upscaling only: the super-resolution stages run on the image. An image the
    /// size of a stage's output starts after that stage; any other size is taken
    /// as the base stage's output. `prompt` may be empty.
    Upscale {
        /// Base64 or a `data:` URL; PNG, JPEG or WebP, with the output's aspect ratio.
        image: String,
    },
    /// DDIM inversion: the image is encoded to its starting noise under `prompt`
    /// (empty when unset), then sampled from there under the request's prompt with
    /// deterministic DDIM (the base stage's sampler must be `ddim` with `eta` 0,
    /// which is the default here). The same prompt reconstructs the image; another edits it.
    Invert {
        /// Base64 or a `data:` URL; PNG, JPEG or WebP, with the output's aspect ratio.
        image: String,
        /// What the image shows (the prompt it is inverted under).
        #[schema(max_length = 4000)]
        prompt: Option<String>,
    },
    /// unCLIP image variations (DALL-E 2): the image's CLIP image embedding
    /// takes the place of the prior's, and the decoder draws new images of
    /// what it shows, under the request's prompt (which may be empty). Only on
    /// an unCLIP cascade (`/info` stage kinds `prior`, `decoder`, …), where it
    /// is the only source kind; `stages` must then be at least 2.
    ImageEmbedding {
        /// Base64 or a `data:` URL; PNG, JPEG or WebP, with the output's aspect ratio.
        image: String,
    },
}

/// Variations of a seed: each image's noise is moved toward the noise of
/// `seed` + i (spherically) by `strength`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VariationBody {
    pub seed: u64,
    /// 0 = the request's own seed, 1 = `seed`'s.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub strength: f64,
}

/// Interpolation: the n images are frames from the request's seed (and prompt)
/// to `seed` (and `prompt`); frame i lies at i / (n − 1). Needs n ≥ 2; every
/// frame reports the request's seed.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterpolateBody {
    pub seed: u64,
    /// The last frame's prompt (the request's when unset).
    #[schema(max_length = 4000)]
    pub prompt: Option<String>,
}

/// The bytes of a base64 image or `data:` URL.
pub fn image_bytes(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match text.strip_prefix("data:") {
        Some(url) => match url.split_once(',') {
            Some((meta, data)) if meta.ends_with(";base64") => data,
            _ => return Err(ApiError::invalid(field, "a data: URL must be base64 (data:image/png;base64,…)")),
        },
        None => text,
    };
    let payload = payload.trim();
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(payload))
        .map_err(|_| ApiError::invalid(field, "is not base64 (standard alphabet)"))
}

fn picture(field: &str, text: &str, limits: &PictureLimits) -> Result<Picture, ApiError> {
    Ok(Picture::from_image(&decode(field, &image_bytes(field, text)?, limits)?))
}

impl SourceBody {
    /// Decodes the images (422 naming `source.image` / `source.mask` when they do not decode).
    pub fn to_spec(&self, limits: &PictureLimits) -> Result<SourceSpec, ApiError> {
        Ok(match self {
            Self::Image { image, strength } => SourceSpec::Image { image: picture("source.image", image, limits)?, strength: *strength },
            Self::Inpaint { image, mask, strength } => SourceSpec::Inpaint {
                image: picture("source.image", image, limits)?,
                mask: Mask::from_image(&decode("source.mask", &image_bytes("source.mask", mask)?, limits)?),
                strength: *strength,
            },
            Self::Upscale { image } => SourceSpec::Upscale { image: picture("source.image", image, limits)? },
            Self::Invert { image, prompt } => SourceSpec::Invert { image: picture("source.image", image, limits)?, prompt: prompt.clone() },
            Self::ImageEmbedding { image } => SourceSpec::ImageEmbedding { image: picture("source.image", image, limits)? },
        })
    }
}

/// The pipeline's noise mix for a body's `variation` and `interpolate` (at most one).
pub fn noise_mix(variation: Option<&VariationBody>, interpolate: Option<&InterpolateBody>) -> Result<NoiseMix, ApiError> {
    match (variation, interpolate) {
        (Some(_), Some(_)) => Err(ApiError::invalid("interpolate", "cannot be combined with `variation`")),
        (Some(v), None) => Ok(NoiseMix::Variation { seed: v.seed, strength: v.strength }),
        (None, Some(i)) => Ok(NoiseMix::Interpolation { seed: i.seed, prompt: i.prompt.clone() }),
        (None, None) => Ok(NoiseMix::Seeds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_tagged_by_kind_and_reject_unknown_fields() {
        let body: SourceBody = serde_json::from_str(r#"{"kind":"image","image":"AAAA","strength":0.5}"#).unwrap();
        assert_eq!(body, SourceBody::Image { image: "AAAA".into(), strength: Some(0.5) });
        assert!(serde_json::from_str::<SourceBody>(r#"{"kind":"upscale","image":"AAAA","strength":0.5}"#).is_err());
        assert!(serde_json::from_str::<SourceBody>(r#"{"kind":"outpaint","image":"AAAA"}"#).is_err());
        assert!(serde_json::from_str::<SourceBody>(r#"{"kind":"inpaint","image":"AAAA"}"#).is_err());
    }

    #[test]
    fn images_come_as_base64_or_data_urls() {
        assert_eq!(image_bytes("source.image", "aGk=").unwrap(), b"hi");
        assert_eq!(image_bytes("source.image", "aGk").unwrap(), b"hi");
        assert_eq!(image_bytes("source.image", "data:image/png;base64,aGk=").unwrap(), b"hi");
        let e = image_bytes("source.mask", "data:image/png,hi").unwrap_err();
        assert_eq!(e.param(), Some("source.mask"));
        assert!(image_bytes("source.image", "not base64!").is_err());
    }

    #[test]
    fn variation_and_interpolation_exclude_each_other() {
        let v = VariationBody { seed: 1, strength: 0.5 };
        let i = InterpolateBody { seed: 2, prompt: None };
        assert_eq!(noise_mix(Some(&v), None).unwrap(), NoiseMix::Variation { seed: 1, strength: 0.5 });
        assert_eq!(noise_mix(None, None).unwrap(), NoiseMix::Seeds);
        assert_eq!(noise_mix(Some(&v), Some(&i)).unwrap_err().param(), Some("interpolate"));
    }
}

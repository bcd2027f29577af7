//! The file formats finished images are delivered in, as OpenAI's Images API
//! names them (`output_format`: png, jpeg, webp; `output_compression` 0–100):
//! PNG carries the generation parameters in text chunks (see `png`); JPEG is
//! written at quality `output_compression` (100 when unset); WebP is lossless
//! (the `image` crate's encoder), so `output_compression` does not apply to it.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::error::{PipelineError, Result};
use super::png::{self, ImageRecord};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }

    /// The name OpenAI's `output_format` uses.
    pub fn extension_name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }
}

/// How a job's images are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub format: ImageFormat,
    /// JPEG quality in 0..=100 (100 when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<u8>,
}

impl Output {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Encodes `image` as `output` asks; PNGs carry `record`.
pub fn encode(image: &RgbImage, record: &ImageRecord, output: &Output) -> Result<Vec<u8>> {
    let failed = |e: image::ImageError| PipelineError::Png(e.to_string());
    match output.format {
        ImageFormat::Png => png::encode(image, record),
        ImageFormat::Jpeg => {
            let mut out = Vec::new();
            // The encoder takes 1..=100.
            let quality = output.compression.unwrap_or(100).clamp(1, 100);
            JpegEncoder::new_with_quality(&mut Cursor::new(&mut out), quality).encode_image(image).map_err(failed)?;
            Ok(out)
        }
        ImageFormat::Webp => {
            let mut out = Vec::new();
            WebPEncoder::new_lossless(&mut Cursor::new(&mut out)).encode(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::Rgb8).map_err(failed)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ImageRecord {
        ImageRecord { prompt: "a red circle".into(), negative_prompt: None, seed: 1, model: "m".into(), stages: vec![] }
    }

    #[test]
    fn each_format_decodes_back_to_the_image() {
        let image = RgbImage::from_fn(24, 16, |x, y| image::Rgb([(x * 10) as u8, (y * 15) as u8, 90]));
        for (format, guessed) in [(ImageFormat::Png, image::ImageFormat::Png), (ImageFormat::Jpeg, image::ImageFormat::Jpeg), (ImageFormat::Webp, image::ImageFormat::WebP)] {
            let bytes = encode(&image, &record(), &Output { format, compression: None }).unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), guessed);
            let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(back.dimensions(), (24, 16));
            let worst = back.as_raw().iter().zip(image.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            // PNG and lossless WebP are exact; JPEG at quality 100 nearly so.
            assert!(worst <= if format == ImageFormat::Jpeg { 12 } else { 0 }, "{format:?}: {worst}");
        }
    }

    #[test]
    fn jpeg_quality_follows_output_compression() {
        let image = RgbImage::from_fn(64, 64, |x, y| image::Rgb([((x * y) % 251) as u8, (x * 4) as u8, (y * 4) as u8]));
        let size = |q| encode(&image, &record(), &Output { format: ImageFormat::Jpeg, compression: Some(q) }).unwrap().len();
        assert!(size(20) < size(90), "{} vs {}", size(20), size(90));
    }
}

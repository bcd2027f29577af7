//! Finished images: float tensors to 8-bit RGB, and PNG files that carry the
//! generation parameters in text chunks.
//!
//! Conversion follows diffusers (`(x / 2 + 0.5).clamp(0, 1)`, then `round(x·255)`).
//! The metadata follows the habit users know from other generators: one
//! `parameters` chunk in the AUTOMATIC1111 layout (prompt, `Negative prompt:`,
//! then `Key: value` pairs), plus one chunk per field (`prompt`, `seed`, …) and a
//! `diffusiond` chunk with the full settings as JSON. Chunks are iTXt (UTF-8),
//! since prompts are not Latin-1.

use image::RgbImage;
use serde::Serialize;
use tch::{Kind, Tensor};

use super::error::{PipelineError, Result};

/// Converts a `[3, H, W]` or `[N, 3, H, W]` tensor in [-1, 1] to RGB images.
pub fn to_rgb(images: &Tensor) -> Result<Vec<RgbImage>> {
    let images = if images.dim() == 3 { images.unsqueeze(0) } else { images.shallow_clone() };
    let size = images.size();
    if size.len() != 4 || size[1] != 3 {
        return Err(PipelineError::invalid("images", format!("shape {size:?}; expected [N, 3, H, W]")));
    }
    let (h, w) = (size[2] as u32, size[3] as u32);
    let bytes = ((images.to_device(tch::Device::Cpu).to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous();
    let per_image = (h * w * 3) as usize;
    let flat = Vec::<u8>::try_from(bytes.view(-1))?;
    Ok(flat
        .chunks(per_image)
        .map(|c| RgbImage::from_raw(w, h, c.to_vec()).expect("buffer size matches the image"))
        .collect())
}

/// One stage's settings, as recorded in the file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageRecord {
    pub name: String,
    pub sampler: String,
    pub steps: usize,
    pub guidance_scale: f32,
    pub eta: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise_level: Option<i64>,
    pub size: String,
    /// GLIDE's CLIP guidance scale (the base stage; left out when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub clip_guidance_scale: f32,
    /// ADM's classifier guidance scale (the base stage; left out when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub classifier_guidance_scale: f32,
    /// Layout guidance scale (the base stage; left out when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub layout_guidance_scale: f32,
    /// Super-resolution from the previous stage's upsampled output at this
    /// strength (left out when 1: from pure noise).
    #[serde(skip_serializing_if = "is_one")]
    pub strength: f64,
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

/// Everything needed to reproduce an image.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageRecord {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub model: String,
    pub stages: Vec<StageRecord>,
}

impl ImageRecord {
    /// The AUTOMATIC1111-style `parameters` text.
    pub fn parameters(&self) -> String {
        let mut out = self.prompt.clone();
        if let Some(neg) = &self.negative_prompt {
            out.push_str(&format!("\nNegative prompt: {neg}"));
        }
        let mut pairs = Vec::new();
        // The first stage that ran (the base stage, unless only upscaling).
        if let Some(first) = self.stages.first() {
            pairs.push(format!("Steps: {}", first.steps));
            pairs.push(format!("Sampler: {}", first.sampler));
            pairs.push(format!("CFG scale: {}", first.guidance_scale));
            if first.clip_guidance_scale != 0.0 {
                pairs.push(format!("CLIP guidance: {}", first.clip_guidance_scale));
            }
            if first.classifier_guidance_scale != 0.0 {
                pairs.push(format!("Classifier guidance: {}", first.classifier_guidance_scale));
            }
            if first.layout_guidance_scale != 0.0 {
                pairs.push(format!("Layout guidance: {}", first.layout_guidance_scale));
            }
        }
        pairs.push(format!("Seed: {}", self.seed));
        if let Some(last) = self.stages.last() {
            pairs.push(format!("Size: {}", last.size));
        }
        pairs.push(format!("Model: {}", self.model));
        for s in self.stages.iter().skip(1) {
            let mut stage = format!("Stage {}: {} {} steps, CFG {}, noise level {}", s.name, s.sampler, s.steps, s.guidance_scale, s.noise_level.unwrap_or(0));
            if s.strength != 1.0 {
                stage.push_str(&format!(", strength {}", s.strength));
            }
            pairs.push(stage);
        }
        out.push('\n');
        out.push_str(&pairs.join(", "));
        out
    }
}

/// Encodes `image` as PNG without metadata (previews).
pub fn encode_plain(image: &RgbImage) -> Result<Vec<u8>> {
    let png_err = |e: png::EncodingError| PipelineError::Png(e.to_string());
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(png_err)?;
        writer.write_image_data(image.as_raw()).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    Ok(out)
}

/// Encodes `image` as PNG with `record` in its text chunks.
pub fn encode(image: &RgbImage, record: &ImageRecord) -> Result<Vec<u8>> {
    let png_err = |e: png::EncodingError| PipelineError::Png(e.to_string());
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut chunks = vec![
            ("parameters", record.parameters()),
            ("prompt", record.prompt.clone()),
            ("seed", record.seed.to_string()),
            ("model", record.model.clone()),
            ("diffusiond", serde_json::to_string(record).expect("record serialises")),
        ];
        if let Some(neg) = &record.negative_prompt {
            chunks.push(("negative_prompt", neg.clone()));
        }
        for (key, text) in chunks {
            encoder.add_itxt_chunk(key.to_owned(), text).map_err(png_err)?;
        }
        let mut writer = encoder.write_header().map_err(png_err)?;
        writer.write_image_data(image.as_raw()).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
    }
    Ok(out)
}

/// Reads the UTF-8 text chunks of a PNG (for tests and tools).
pub fn read_text_chunks(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().map_err(|e| PipelineError::Png(e.to_string()))?;
    reader
        .info()
        .utf8_text
        .iter()
        .map(|c| Ok((c.keyword.clone(), c.get_text().map_err(|e| PipelineError::Png(e.to_string()))?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_like_diffusers_and_round_trips_metadata() {
        // Channels [R, G, B] of two pixels: -1 → 0, 1 → 255, 0 → round(127.5) = 128,
        // 0.5 → round(191.25) = 191, out of range clamps.
        let t = Tensor::from_slice(&[-1.0f32, 1.0, 0.0, 3.0, -2.0, 0.5]).view([1, 3, 1, 2]);
        let img = &to_rgb(&t).unwrap()[0];
        assert_eq!(img.get_pixel(0, 0).0, [0, 128, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 191]);

        let record = ImageRecord {
            prompt: "a red circle — above a blue square".into(),
            negative_prompt: Some("blurry".into()),
            seed: 7,
            model: "shapes".into(),
            stages: vec![StageRecord {
                name: "base".into(),
                sampler: "ddim".into(),
                steps: 25,
                guidance_scale: 4.0,
                eta: 0.0,
                noise_level: None,
                size: "32x32".into(),
                clip_guidance_scale: 0.0,
                classifier_guidance_scale: 0.0,
                layout_guidance_scale: 0.0,
                strength: 1.0,
            }, StageRecord {
                name: "sr64".into(),
                sampler: "ddim".into(),
                steps: 10,
                guidance_scale: 1.0,
                eta: 0.0,
                noise_level: Some(100),
                size: "64x64".into(),
                clip_guidance_scale: 0.0,
                classifier_guidance_scale: 0.0,
                layout_guidance_scale: 0.0,
                strength: 0.4,
            }],
        };
        let bytes = encode(img, &record).unwrap();
        let chunks = read_text_chunks(&bytes).unwrap();
        let get = |k: &str| chunks.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
        assert_eq!(get("prompt"), record.prompt);
        assert_eq!(get("seed"), "7");
        assert!(get("parameters").contains("Negative prompt: blurry\nSteps: 25, Sampler: ddim, CFG scale: 4, Seed: 7"));
        assert!(get("parameters").ends_with("Stage sr64: ddim 10 steps, CFG 1, noise level 100, strength 0.4"), "{}", get("parameters"));
        assert!(get("diffusiond").contains("\"strength\":0.4") && get("diffusiond").matches("strength").count() == 1);
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(decoded.as_raw(), img.as_raw());
    }
}

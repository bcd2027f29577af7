//! What a request starts from besides its seeds: a user's image to edit
//! (SDEdit image-to-image, inpainting), to upscale or to invert, and how its
//! initial noise is mixed (variations of a seed, interpolation between two).
//!
//! * Image-to-image is SDEdit (Meng et al. 2022): the image is noised in closed
//!   form to the timestep that `strength` picks and denoised from there, as
//!   diffusers' `IFImg2ImgPipeline` does (`get_timesteps`: the first
//!   `S − ⌊S·strength⌋` of the S steps are skipped).
//! * Inpainting follows `IFInpaintingPipeline`: the mask (white = repaint) is cut
//!   at 0.5; the masked region starts from the noised image, and after every step
//!   the region outside the mask is put back to what it was before the step —
//!   the clean image, so the known pixels come out exactly as given.
//! * Variations and interpolation follow DDIM §5.3: Gaussian latents are mixed
//!   spherically (`diffusion::inversion::slerp`), prompts' token embeddings
//!   linearly.
//!
//! Pictures are decoded once, at validation (PNG, JPEG or WebP, within pixel
//! limits), resized to the size the pipeline needs and carried in the validated
//! request as PNG, so that a job in the store or the Redis queue holds its
//! inputs and runs again after a restart.

use std::io::Cursor;

use base64::Engine as _;
use image::imageops::FilterType;
use image::{GrayImage, ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tch::{Device, Kind, Tensor};

use super::error::{PipelineError, Result};

/// Bounds on the pictures a request may carry.
#[derive(Debug, Clone, Copy)]
pub struct PictureLimits {
    /// Longest side, in pixels.
    pub max_side: u32,
    /// Width × height.
    pub max_pixels: u64,
}

impl Default for PictureLimits {
    fn default() -> Self {
        Self { max_side: 4096, max_pixels: 4096 * 4096 }
    }
}

/// The formats a picture may come in.
const FORMATS: [ImageFormat; 3] = [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP];

/// Decodes `bytes` (PNG, JPEG or WebP) with `field` named in every error. The
/// header's dimensions are checked before any pixel is decoded, so a small file
/// that claims a huge image costs nothing.
pub fn decode(field: &str, bytes: &[u8], limits: &PictureLimits) -> Result<image::DynamicImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| PipelineError::invalid(field, "could not be read"))?;
    match reader.format() {
        Some(f) if FORMATS.contains(&f) => {}
        _ => return Err(PipelineError::invalid(field, "is not a PNG, JPEG or WebP image")),
    }
    let (w, h) = reader.into_dimensions().map_err(|_| PipelineError::invalid(field, "is not a readable PNG, JPEG or WebP image"))?;
    check_dimensions(field, w, h, limits)?;
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|_| PipelineError::invalid(field, "could not be read"))?;
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(limits.max_side);
    decode_limits.max_image_height = Some(limits.max_side);
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16));
    reader.limits(decode_limits);
    reader.decode().map_err(|e| PipelineError::invalid(field, format!("could not be decoded ({e})")))
}

fn check_dimensions(field: &str, w: u32, h: u32, limits: &PictureLimits) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(PipelineError::invalid(field, "has no pixels"));
    }
    if w.max(h) > limits.max_side || u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(PipelineError::invalid(
            field,
            format!("is {w}x{h}; at most {} pixels a side and {} pixels in all", limits.max_side, limits.max_pixels),
        ));
    }
    Ok(())
}

/// Checks that a `w`×`h` picture has the aspect ratio of a `(height, width)`
/// output: the pipeline resizes, it does not crop or pad.
pub fn check_aspect(field: &str, (w, h): (u32, u32), (out_h, out_w): (i64, i64)) -> Result<()> {
    let (a, b) = (u64::from(w) * out_h as u64, u64::from(h) * out_w as u64);
    // Within one pixel's rounding on the shorter side.
    let tolerance = u64::from(w.max(h)) * (out_h.max(out_w) as u64) / u64::from(w.min(h)).max(1);
    if a.abs_diff(b) > tolerance {
        return Err(PipelineError::invalid(
            field,
            format!("is {w}x{h}; the output is {out_w}x{out_h}: crop or pad it to that aspect ratio first"),
        ));
    }
    Ok(())
}

/// `image` at `(height, width)`: Lanczos when it must be resized, a copy otherwise.
fn resized<P: image::Pixel<Subpixel = u8> + 'static>(image: &image::ImageBuffer<P, Vec<u8>>, (h, w): (i64, i64)) -> image::ImageBuffer<P, Vec<u8>> {
    let (h, w) = (h as u32, w as u32);
    if image.dimensions() == (w, h) {
        return image.clone();
    }
    image::imageops::resize(image, w, h, FilterType::Lanczos3)
}

/// An 8-bit RGB picture (serialised as a base64 PNG).
#[derive(Debug, Clone, PartialEq)]
pub struct Picture(pub RgbImage);

/// An 8-bit mask, white = repaint (serialised as a base64 PNG).
#[derive(Debug, Clone, PartialEq)]
pub struct Mask(pub GrayImage);

impl Picture {
    /// Drops alpha (the colour under transparent pixels stays), as `PIL.Image.convert("RGB")` does.
    pub fn from_image(image: &image::DynamicImage) -> Self {
        Self(image.to_rgb8())
    }

    pub fn dimensions(&self) -> (u32, u32) {
        self.0.dimensions()
    }

    /// This picture at `(height, width)` (Lanczos when it must be resized).
    pub fn resized(&self, size: (i64, i64)) -> Self {
        Self(resized(&self.0, size))
    }

    /// `[1, 3, h, w]` float32 in [-1, 1] (x / 127.5 − 1, as IF's preprocessing).
    pub fn tensor(&self, size: (i64, i64), device: Device) -> Result<Tensor> {
        let Self(image) = self.resized(size);
        let (w, h) = image.dimensions();
        let t = Tensor::from_slice(image.as_raw()).view([1, h as i64, w as i64, 3]).permute([0, 3, 1, 2]);
        Ok((t.to_kind(Kind::Float) / 127.5 - 1.0).to_device(device))
    }
}

impl Mask {
    /// The mask's luma (ITU-R 601, as `PIL.Image.convert("L")`), alpha ignored.
    pub fn from_image(image: &image::DynamicImage) -> Self {
        let rgb = image.to_rgb8();
        let luma = image::ImageBuffer::from_fn(rgb.width(), rgb.height(), |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0;
            let l = (u32::from(r) * 299 + u32::from(g) * 587 + u32::from(b) * 114 + 500) / 1000;
            image::Luma([l as u8])
        });
        Self(luma)
    }

    /// Alpha as the mask: fully transparent pixels are repainted (the OpenAI
    /// images API's convention for edits).
    pub fn from_transparency(image: &image::DynamicImage) -> Self {
        let rgba = image.to_rgba8();
        Self(image::ImageBuffer::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([if rgba.get_pixel(x, y).0[3] == 0 { 255 } else { 0 }])
        }))
    }

    pub fn dimensions(&self) -> (u32, u32) {
        self.0.dimensions()
    }

    /// Whether any pixel would be repainted (≥ 0.5 once scaled to [0, 1]).
    pub fn repaints_anything(&self) -> bool {
        self.0.pixels().any(|p| p.0[0] >= 128)
    }

    pub fn resized(&self, size: (i64, i64)) -> Self {
        Self(resized(&self.0, size))
    }

    /// `[1, 1, h, w]` float32 of 0 (keep) and 1 (repaint): x / 255 cut at 0.5.
    pub fn tensor(&self, size: (i64, i64), device: Device) -> Result<Tensor> {
        let Self(mask) = self.resized(size);
        let (w, h) = mask.dimensions();
        let t = Tensor::from_slice(mask.as_raw()).view([1, 1, h as i64, w as i64]).to_kind(Kind::Float) / 255.0;
        Ok(t.ge(0.5).to_kind(Kind::Float).to_device(device))
    }
}

fn png_bytes(image: &image::DynamicImage) -> std::result::Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)?;
    Ok(out)
}

fn serialize_png<S: Serializer>(image: image::DynamicImage, s: S) -> std::result::Result<S::Ok, S::Error> {
    let bytes = png_bytes(&image).map_err(serde::ser::Error::custom)?;
    s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn deserialize_png<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<image::DynamicImage, D::Error> {
    let text = String::deserialize(d)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)?;
    image::load_from_memory_with_format(&bytes, ImageFormat::Png).map_err(serde::de::Error::custom)
}

impl Serialize for Picture {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serialize_png(image::DynamicImage::ImageRgb8(self.0.clone()), s)
    }
}

impl<'de> Deserialize<'de> for Picture {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Self(deserialize_png(d)?.to_rgb8()))
    }
}

impl Serialize for Mask {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        serialize_png(image::DynamicImage::ImageLuma8(self.0.clone()), s)
    }
}

impl<'de> Deserialize<'de> for Mask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(Self(deserialize_png(d)?.to_luma8()))
    }
}

/// A request's image input, as given (any size within the limits); `plan`
/// checks it against the cascade and resizes it.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    Image { image: Picture, strength: Option<f64> },
    Inpaint { image: Picture, mask: Mask, strength: Option<f64> },
    Upscale { image: Picture },
    Invert { image: Picture, prompt: Option<String> },
    ImageEmbedding { image: Picture },
}

/// A validated image input, its pictures at the sizes the pipeline uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// SDEdit at the base stage, from `image` (at the base size); the
    /// super-resolution stages then upscale the result as usual.
    Image { image: Picture, strength: f64 },
    /// Inpainting at every stage: `image` and `mask` at the output size, each
    /// stage taking them at its own size. `strength` applies to the base stage;
    /// the super-resolution stages repaint the mask from pure noise (strength 1),
    /// since their low-resolution input already carries the new content.
    Inpaint { image: Picture, mask: Mask, strength: f64 },
    /// Only the super-resolution stages run, on `image` as the previous stage's
    /// output (at that stage's size).
    Upscale { image: Picture },
    /// DDIM inversion of `image` (at the base size) under `prompt` to its x_T,
    /// then deterministic sampling from there with the request's prompt.
    Invert { image: Picture, prompt: String },
    /// unCLIP image variations (DALL-E 2 §2, diffusers'
    /// `UnCLIPImageVariationPipeline`): the CLIP image embedding of `image`
    /// (at the decoder's size) takes the place of the prior's sample, so the
    /// prior does not run and the decoder draws new images of what the CLIP
    /// sees in it, under the request's prompt (which may be empty).
    ImageEmbedding { image: Picture },
}

/// How a request's initial noise is made.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NoiseMix {
    /// Image i's own seed (seed + i).
    #[default]
    Seeds,
    /// Image i's noise moved toward that of `seed` + i by `strength` (slerp).
    Variation { seed: u64, strength: f64 },
    /// The n images are frames from the request's seed (and prompt) to `seed`
    /// (and `prompt`): frame i at weight i / (n − 1).
    Interpolation { seed: u64, prompt: Option<String> },
}

impl NoiseMix {
    /// Image i's weight toward the second latent, for n images; None when unmixed.
    pub fn weight(&self, i: usize, n: usize) -> Option<f64> {
        match self {
            Self::Seeds => None,
            Self::Variation { strength, .. } => Some(*strength),
            Self::Interpolation { .. } => Some(if n <= 1 { 0.0 } else { i as f64 / (n - 1) as f64 }),
        }
    }
}

/// The first step of `steps` that SDEdit runs at `strength` (diffusers'
/// `get_timesteps`): ⌊S·strength⌋ steps remain.
pub fn first_step(steps: usize, strength: f64) -> usize {
    let kept = ((steps as f64 * strength).floor() as usize).min(steps);
    steps - kept
}

/// Spherical interpolation of each row of `a` toward the same row of `b`, row i
/// at `weights[i]` (`diffusion::inversion::slerp` row by row).
pub fn slerp_rows(a: &Tensor, b: &Tensor, weights: &[f64]) -> Result<Tensor> {
    let rows: Vec<Tensor> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| crate::diffusion::inversion::slerp(&a.narrow(0, i as i64, 1), &b.narrow(0, i as i64, 1), w))
        .collect::<std::result::Result<_, _>>()?;
    Ok(Tensor::cat(&rows, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(image: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        image.write_to(&mut Cursor::new(&mut out), format).unwrap();
        out
    }

    fn gradient(w: u32, h: u32) -> image::DynamicImage {
        image::DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128])))
    }

    #[test]
    fn pictures_decode_from_png_jpeg_and_webp_and_nothing_else() {
        let limits = PictureLimits::default();
        let image = gradient(20, 12);
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let decoded = decode("image", &encode(&image, format), &limits).unwrap();
            assert_eq!(decoded.width(), 20, "{format:?}");
        }
        let bmp = encode(&image, ImageFormat::Png).iter().map(|b| b ^ 0x5a).collect::<Vec<_>>();
        let e = decode("mask", &bmp, &limits).unwrap_err().to_string();
        assert!(e.contains("`mask`") && e.contains("PNG, JPEG or WebP"), "{e}");
        let e = decode("image", b"", &limits).unwrap_err().to_string();
        assert!(e.contains("`image`"), "{e}");
    }

    #[test]
    fn oversized_pictures_are_refused_from_their_header() {
        let limits = PictureLimits { max_side: 16, max_pixels: 200 };
        let e = decode("image", &encode(&gradient(17, 4), ImageFormat::Png), &limits).unwrap_err().to_string();
        assert!(e.contains("17x4") && e.contains("at most 16"), "{e}");
        let e = decode("image", &encode(&gradient(15, 15), ImageFormat::Png), &limits).unwrap_err().to_string();
        assert!(e.contains("200 pixels in all"), "{e}");
        // A truncated file with a valid header fails cleanly, too.
        let mut bytes = encode(&gradient(12, 12), ImageFormat::Png);
        bytes.truncate(bytes.len() / 2);
        assert!(decode("image", &bytes, &PictureLimits::default()).is_err());
    }

    #[test]
    fn aspect_ratios_must_match_the_output() {
        assert!(check_aspect("image", (512, 512), (32, 32)).is_ok());
        assert!(check_aspect("image", (513, 512), (32, 32)).is_ok());
        let e = check_aspect("image", (640, 480), (32, 32)).unwrap_err().to_string();
        assert!(e.contains("640x480") && e.contains("32x32"), "{e}");
    }

    #[test]
    fn tensors_follow_if_preprocessing() {
        let picture = Picture(RgbImage::from_fn(2, 1, |x, _| image::Rgb(if x == 0 { [0, 255, 51] } else { [255, 0, 0] })));
        let t = picture.tensor((1, 2), Device::Cpu).unwrap();
        assert_eq!(t.size(), [1, 3, 1, 2]);
        let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        // Channel-major: R of both pixels, then G, then B.
        let want = [-1.0, 1.0, 1.0, -1.0, 51.0 / 127.5 - 1.0, -1.0];
        assert!(v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{v:?}");
        let mask = Mask(GrayImage::from_raw(3, 1, vec![127, 128, 255]).unwrap());
        let m = Vec::<f32>::try_from(mask.tensor((1, 3), Device::Cpu).unwrap().flatten(0, -1)).unwrap();
        assert_eq!(m, [0.0, 1.0, 1.0]);
    }

    #[test]
    fn masks_come_from_luma_or_from_transparency() {
        let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_raw(2, 1, vec![255, 255, 255, 0, 10, 20, 30, 255]).unwrap());
        assert_eq!(Mask::from_transparency(&rgba).0.as_raw(), &[255, 0]);
        assert_eq!(Mask::from_image(&rgba).0.as_raw(), &[255, 18]);
        assert!(Mask::from_transparency(&rgba).repaints_anything());
        assert!(!Mask(GrayImage::from_raw(1, 1, vec![127]).unwrap()).repaints_anything());
    }

    #[test]
    fn sources_round_trip_through_json() {
        let source = Source::Inpaint {
            image: Picture(gradient(8, 8).to_rgb8()),
            mask: Mask(GrayImage::from_fn(8, 8, |x, _| image::Luma([if x > 3 { 255 } else { 0 }]))),
            strength: 0.75,
        };
        let json = serde_json::to_string(&source).unwrap();
        assert!(json.contains(r#""kind":"inpaint""#));
        assert_eq!(serde_json::from_str::<Source>(&json).unwrap(), source);
        let mix: NoiseMix = serde_json::from_str(r#"{"kind":"variation","seed":3,"strength":0.25}"#).unwrap();
        assert_eq!(mix.weight(5, 8), Some(0.25));
        assert_eq!(NoiseMix::Interpolation { seed: 1, prompt: None }.weight(3, 4), Some(1.0));
    }

    #[test]
    fn strength_skips_the_first_steps_like_diffusers() {
        assert_eq!(first_step(10, 0.6), 4);
        assert_eq!(first_step(10, 1.0), 0);
        assert_eq!(first_step(50, 0.7), 15);
        assert_eq!(first_step(10, 0.05), 10);
    }
}

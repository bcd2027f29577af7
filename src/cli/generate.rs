//! `diffusiond generate`: prompt in, PNG files out, with a progress bar per stage.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use diffusiond::diffusion::SamplerKind;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::source::decode;
use diffusiond::pipeline::{Cascade, ImageFormat, LoadOptions, Mask, NoiseMix, Output, Picture, PictureLimits, RequestSpec, SourceSpec, StageOverride};
use indicatif::{ProgressBar, ProgressStyle};

/// Where the model and the device come from, shared by `generate` and `info`.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The cascade directory (its cascade.json names the encoder and stages).
    #[arg(long, env = "DIFFUSIOND_MODEL", default_value = "models/default")]
    pub model: PathBuf,
    /// auto (CUDA when present), cpu, cuda or cuda:N.
    #[arg(long, env = "DIFFUSIOND_DEVICE", default_value = "auto")]
    pub device: DeviceSetting,
    /// auto (f32 on CPU, f16 on CUDA), f32, f16 or bf16.
    #[arg(long, env = "DIFFUSIOND_PRECISION", default_value = "auto")]
    pub precision: Precision,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<Cascade> {
        let options = LoadOptions { device: self.device, precision: self.precision };
        Cascade::load(&self.model, &options).with_context(|| format!("loading the cascade in {}", self.model.display()))
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to draw.
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to steer away from (replaces the empty prompt of classifier-free guidance).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Number of images; image i uses seed + i.
    #[arg(short = 'n', long = "num-images", default_value_t = 1)]
    pub n: usize,
    /// Random when not given (and printed, so the images can be made again).
    #[arg(long)]
    pub seed: Option<u64>,
    /// ddpm, ddim or dpmsolver++, for every stage (default: each stage's own).
    #[arg(long)]
    pub sampler: Option<SamplerKind>,
    /// DDIM's η in [0, 1] (0: deterministic).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Denoising steps of the base stage.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale of the base stage (≤ 1: no guidance).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// GLIDE's CLIP guidance of the base stage at this scale (needs a
    /// cascade whose manifest names a noised CLIP; 0: none).
    #[arg(long, value_name = "S")]
    pub clip_guidance: Option<f32>,
    /// ADM's classifier guidance of the base stage at this scale, the
    /// cascade's noised CLIP as the classifier over the prompt and its
    /// contrasts (needs a cascade whose manifest names one; 0: none).
    #[arg(long, value_name = "S")]
    pub classifier_guidance: Option<f32>,
    /// Layout guidance of the base stage (an unCLIP decoder) at this scale:
    /// each single thing the prompt names drawn once, things apart, a stated
    /// relation ("… above …") kept (0: none; default: the cascade's).
    #[arg(long, value_name = "S")]
    pub layout_guidance: Option<f32>,
    /// Steps of every super-resolution stage.
    #[arg(long)]
    pub sr_steps: Option<usize>,
    /// Guidance scale of every super-resolution stage.
    #[arg(long)]
    pub sr_guidance: Option<f32>,
    /// Noise-augmentation timestep of every super-resolution stage.
    #[arg(long)]
    pub noise_level: Option<i64>,
    /// Every super-resolution stage starts from the previous stage's output,
    /// upsampled and noised to this share of its schedule (1: pure noise).
    #[arg(long, value_name = "S")]
    pub sr_strength: Option<f64>,
    /// Run only the first N stages (1: a fast base-resolution preview).
    #[arg(long)]
    pub stages: Option<usize>,
    /// Image-to-image: start from this picture (PNG, JPEG or WebP), noised to `--strength`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["upscale", "invert", "image_embedding"])]
    pub init_image: Option<PathBuf>,
    /// Inpainting, with `--init-image`: white = repaint.
    #[arg(long, value_name = "FILE", requires = "init_image")]
    pub mask: Option<PathBuf>,
    /// How much of the image to change, in (0, 1] (0.7 for image-to-image, 1 for inpainting).
    #[arg(long, requires = "init_image")]
    pub strength: Option<f64>,
    /// Run only the super-resolution stages on this picture (the prompt may be empty).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["invert", "image_embedding"])]
    pub upscale: Option<PathBuf>,
    /// DDIM-invert this picture under `--source-prompt`, then sample it under the prompt.
    #[arg(long, value_name = "FILE", conflicts_with = "image_embedding")]
    pub invert: Option<PathBuf>,
    /// unCLIP image variations: draw new images from this picture's CLIP
    /// embedding instead of the prior's (the prompt may be empty).
    #[arg(long, value_name = "FILE")]
    pub image_embedding: Option<PathBuf>,
    /// What the inverted picture shows (default: the empty prompt).
    #[arg(long, requires = "invert")]
    pub source_prompt: Option<String>,
    /// Variations: move each image's noise toward this seed's (+ i)…
    #[arg(long, requires = "variation_strength", conflicts_with = "interpolate_seed")]
    pub variation_seed: Option<u64>,
    /// …by this much, in [0, 1].
    #[arg(long, requires = "variation_seed")]
    pub variation_strength: Option<f64>,
    /// Interpolation: the n images are frames from `--seed` to this seed…
    #[arg(long)]
    pub interpolate_seed: Option<u64>,
    /// …and from the prompt to this one.
    #[arg(long, requires = "interpolate_seed")]
    pub interpolate_prompt: Option<String>,
    /// File format: png (with the parameters in text chunks), jpeg or webp (lossless).
    #[arg(long, default_value = "png", value_parser = ["png", "jpeg", "webp"])]
    pub format: String,
    /// JPEG quality, 0–100.
    #[arg(long)]
    pub quality: Option<u8>,
    /// Output folder.
    #[arg(short = 'o', long, default_value = "out")]
    pub output: PathBuf,
}

fn read_image(flag: &str, path: &Path) -> anyhow::Result<image::DynamicImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(decode(flag, &bytes, &PictureLimits::default())?)
}

impl GenerateArgs {
    fn source(&self) -> anyhow::Result<Option<SourceSpec>> {
        if let Some(image) = &self.image_embedding {
            return Ok(Some(SourceSpec::ImageEmbedding { image: Picture::from_image(&read_image("--image-embedding", image)?) }));
        }
        Ok(match (&self.init_image, &self.mask, &self.upscale, &self.invert) {
            (Some(image), None, _, _) => {
                Some(SourceSpec::Image { image: Picture::from_image(&read_image("--init-image", image)?), strength: self.strength })
            }
            (Some(image), Some(mask), _, _) => Some(SourceSpec::Inpaint {
                image: Picture::from_image(&read_image("--init-image", image)?),
                mask: Mask::from_image(&read_image("--mask", mask)?),
                strength: self.strength,
            }),
            (None, _, Some(image), _) => Some(SourceSpec::Upscale { image: Picture::from_image(&read_image("--upscale", image)?) }),
            (None, _, None, Some(image)) => {
                Some(SourceSpec::Invert { image: Picture::from_image(&read_image("--invert", image)?), prompt: self.source_prompt.clone() })
            }
            (None, _, None, None) => None,
        })
    }

    fn noise(&self) -> NoiseMix {
        match (self.variation_seed, self.variation_strength, self.interpolate_seed) {
            (Some(seed), Some(strength), _) => NoiseMix::Variation { seed, strength },
            (_, _, Some(seed)) => NoiseMix::Interpolation { seed, prompt: self.interpolate_prompt.clone() },
            _ => NoiseMix::Seeds,
        }
    }
}

/// A short file-name-safe form of the prompt.
pub(super) fn slug(prompt: &str) -> String {
    let s: String = prompt
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect::<String>()
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let s: String = s.chars().take(48).collect();
    if s.is_empty() {
        "image".into()
    } else {
        s.trim_end_matches('-').to_owned()
    }
}

fn bar(name: &str, total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} steps {elapsed_precise} ({per_sec})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_owned());
    bar
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if super::unclip::is_unclip_folder(&args.model.model) {
        return super::unclip::run(&args);
    }
    let loading = Instant::now();
    let cascade = args.model.load()?;
    let load_time = loading.elapsed();
    let sr = StageOverride { steps: args.sr_steps, guidance_scale: args.sr_guidance, noise_level: args.noise_level, strength: args.sr_strength, ..Default::default() };
    let spec = RequestSpec {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        n: args.n,
        seed: args.seed,
        sampler: args.sampler,
        eta: args.eta,
        steps: args.steps,
        guidance_scale: args.guidance,
        clip_guidance_scale: args.clip_guidance,
        classifier_guidance_scale: args.classifier_guidance,
        layout_guidance_scale: args.layout_guidance,
        stage_overrides: (1..cascade.stages.len()).map(|i| (i, sr.clone())).collect(),
        stages: args.stages,
        source: args.source()?,
        noise: args.noise(),
        preview_every: None,
        output: Output {
            format: match args.format.as_str() {
                "jpeg" => ImageFormat::Jpeg,
                "webp" => ImageFormat::Webp,
                _ => ImageFormat::Png,
            },
            compression: args.quality,
        },
    };
    let request = cascade.plan(&spec)?;
    eprintln!(
        "{} image(s) of \"{}\" with {} on {:?} ({:?}), seed {}",
        request.n,
        request.prompt,
        cascade.manifest.name,
        cascade.device(),
        cascade.kind(),
        request.seed
    );
    let mut current: Option<(usize, ProgressBar)> = None;
    // Each stage's last progress report (after its last step), for wall time per stage.
    let generating = Instant::now();
    let mut stage_ends: Vec<(String, Instant)> = Vec::new();
    let images = cascade.generate(&request, &mut |p| {
        if current.as_ref().is_none_or(|(stage, _)| *stage != p.stage) {
            if let Some((_, done)) = current.take() {
                done.finish();
            }
            current = Some((p.stage, bar(p.stage_name, p.total_steps)));
            stage_ends.push((p.stage_name.to_owned(), Instant::now()));
        }
        if let Some((_, end)) = stage_ends.last_mut() {
            *end = Instant::now();
        }
        if let Some((_, bar)) = &current {
            bar.set_position(p.step as u64);
        }
        ControlFlow::Continue(())
    })?;
    if let Some((_, done)) = current.take() {
        done.finish();
    }
    eprintln!("{}", timing_line(load_time, generating, &stage_ends, Instant::now()));
    std::fs::create_dir_all(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    // Interpolation frames share a seed: their index tells them apart.
    let shared_seed = images.windows(2).any(|w| w[0].seed == w[1].seed);
    let ext = request.output.format.extension();
    for image in &images {
        let name = match shared_seed {
            true => format!("{}-{}-{:03}.{ext}", slug(&request.prompt), image.seed, image.index),
            false => format!("{}-{}.{ext}", slug(&request.prompt), image.seed),
        };
        let file: PathBuf = Path::new(&args.output).join(name);
        std::fs::write(&file, image.encode(&request.output)?).with_context(|| format!("writing {}", file.display()))?;
        println!("{}", file.display());
    }
    Ok(())
}

/// "loaded in 2.41 s; generated in 5.02 s (base 1.20 s, sr64 0.90 s, sr128 2.92 s)":
/// the model load apart, as speed targets count it. `ends` holds each stage's
/// last step's end: a stage's time runs from the one before it (the first
/// stage's from `start`, so it includes the prompts' encoding) to its own.
fn timing_line(load: Duration, start: Instant, ends: &[(String, Instant)], end: Instant) -> String {
    let parts: Vec<String> = ends
        .iter()
        .enumerate()
        .map(|(i, (name, until))| {
            let from = if i == 0 { start } else { ends[i - 1].1 };
            format!("{name} {:.2} s", until.saturating_duration_since(from).as_secs_f64())
        })
        .collect();
    format!("loaded in {:.2} s; generated in {:.2} s ({})", load.as_secs_f64(), end.duration_since(start).as_secs_f64(), parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::{slug, timing_line};
    use std::time::{Duration, Instant};

    #[test]
    fn the_timing_line_splits_the_stages() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let ends = vec![("base".to_string(), at(1200)), ("sr64".to_string(), at(1900))];
        let line = timing_line(Duration::from_millis(2410), t0, &ends, at(2000));
        assert_eq!(line, "loaded in 2.41 s; generated in 2.00 s (base 1.20 s, sr64 0.70 s)");
    }

    #[test]
    fn slugs_are_file_name_safe() {
        assert_eq!(slug("A red circle, above a BLUE square!"), "a-red-circle-above-a-blue-square");
        assert_eq!(slug("???"), "image");
        assert!(slug(&"long ".repeat(40)).len() <= 48);
    }
}

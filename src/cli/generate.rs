//! `diffusiond generate`: prompt in, PNG files out, with a progress bar per stage.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use diffusiond::diffusion::SamplerKind;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, LoadOptions, RequestSpec, StageOverride};
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
    /// Steps of every super-resolution stage.
    #[arg(long)]
    pub sr_steps: Option<usize>,
    /// Guidance scale of every super-resolution stage.
    #[arg(long)]
    pub sr_guidance: Option<f32>,
    /// Noise-augmentation timestep of every super-resolution stage.
    #[arg(long)]
    pub noise_level: Option<i64>,
    /// Run only the first N stages (1: a fast base-resolution preview).
    #[arg(long)]
    pub stages: Option<usize>,
    /// Output folder.
    #[arg(short = 'o', long, default_value = "out")]
    pub output: PathBuf,
}

/// A short file-name-safe form of the prompt.
fn slug(prompt: &str) -> String {
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
    let cascade = args.model.load()?;
    let sr = StageOverride { steps: args.sr_steps, guidance_scale: args.sr_guidance, noise_level: args.noise_level, ..Default::default() };
    let spec = RequestSpec {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        n: args.n,
        seed: args.seed,
        sampler: args.sampler,
        eta: args.eta,
        steps: args.steps,
        guidance_scale: args.guidance,
        stage_overrides: (1..cascade.stages.len()).map(|i| (i, sr.clone())).collect(),
        stages: args.stages,
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
    let images = cascade.generate(&request, &mut |p| {
        if current.as_ref().is_none_or(|(stage, _)| *stage != p.stage) {
            if let Some((_, done)) = current.take() {
                done.finish();
            }
            current = Some((p.stage, bar(p.stage_name, p.total_steps)));
        }
        if let Some((_, bar)) = &current {
            bar.set_position(p.step as u64);
        }
        ControlFlow::Continue(())
    })?;
    if let Some((_, done)) = current.take() {
        done.finish();
    }
    std::fs::create_dir_all(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    for image in &images {
        let file: PathBuf = Path::new(&args.output).join(format!("{}-{}.png", slug(&request.prompt), image.seed));
        std::fs::write(&file, image.png()?).with_context(|| format!("writing {}", file.display()))?;
        println!("{}", file.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::slug;

    #[test]
    fn slugs_are_file_name_safe() {
        assert_eq!(slug("A red circle, above a BLUE square!"), "a-red-circle-above-a-blue-square");
        assert_eq!(slug("???"), "image");
        assert!(slug(&"long ".repeat(40)).len() <= 48);
    }
}

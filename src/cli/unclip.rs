//! `diffusiond generate --model DIR` where DIR is an unCLIP pipeline folder
//! (diffusers' `UnCLIPPipeline` layout, Karlo's): the prior, decoder and
//! super-resolution stages of [`diffusiond::pipeline::unclip`], on the CPU.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use diffusiond::pipeline::png;
use diffusiond::pipeline::unclip::{UnClipNoise, UnClipPipeline, UnClipSettings};

use super::generate::{slug, GenerateArgs};

/// Whether `dir` holds an unCLIP pipeline rather than a cascade.
pub fn is_unclip_folder(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("model_index.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|index| index["_class_name"] == "UnCLIPPipeline")
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let unsupported = [
        ("--negative-prompt", args.negative_prompt.is_some()),
        ("--sampler", args.sampler.is_some()),
        ("--eta", args.eta.is_some()),
        ("--sr-guidance", args.sr_guidance.is_some()),
        ("--noise-level", args.noise_level.is_some()),
        ("--stages", args.stages.is_some()),
        ("--init-image", args.init_image.is_some()),
        ("--upscale", args.upscale.is_some()),
        ("--invert", args.invert.is_some()),
        ("--variation-seed", args.variation_seed.is_some()),
        ("--interpolate-seed", args.interpolate_seed.is_some() || args.interpolate_prompt.is_some()),
    ];
    if let Some((flag, _)) = unsupported.iter().find(|(_, given)| *given) {
        bail!("{flag} is not available for an unCLIP pipeline (prior, decoder and super-resolution at their own settings)");
    }
    if args.format != "png" {
        bail!("--format {}: an unCLIP pipeline writes PNG", args.format);
    }
    let dir = &args.model.model;
    let loading = Instant::now();
    let pipeline = UnClipPipeline::load(dir).with_context(|| format!("loading the unCLIP pipeline in {}", dir.display()))?;
    let load_time = loading.elapsed();
    let defaults = UnClipSettings::default();
    let settings = UnClipSettings {
        prior_steps: args.steps.unwrap_or(defaults.prior_steps),
        decoder_steps: args.steps.unwrap_or(defaults.decoder_steps),
        super_res_steps: args.sr_steps.unwrap_or(defaults.super_res_steps),
        prior_guidance_scale: defaults.prior_guidance_scale,
        decoder_guidance_scale: args.guidance.unwrap_or(defaults.decoder_guidance_scale),
    };
    let seed = args.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let seeds: Vec<u64> = (0..args.n as u64).map(|i| seed + i).collect();
    let prompts = vec![args.prompt.as_str(); args.n];
    eprintln!("{} image(s) of \"{}\" with unCLIP ({}), seed {seed}", args.n, args.prompt, dir.display());
    let generating = Instant::now();
    let out = pipeline.generate(&prompts, &settings, &mut UnClipNoise::seeded(&seeds))?;
    eprintln!("loaded in {:.2} s; generated in {:.2} s", load_time.as_secs_f64(), generating.elapsed().as_secs_f64());
    std::fs::create_dir_all(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    for (image, seed) in png::to_rgb(&(out.image * 2.0 - 1.0))?.iter().zip(&seeds) {
        let file = args.output.join(format!("{}-{seed}.png", slug(&args.prompt)));
        std::fs::write(&file, png::encode_plain(image)?).with_context(|| format!("writing {}", file.display()))?;
        println!("{}", file.display());
    }
    Ok(())
}

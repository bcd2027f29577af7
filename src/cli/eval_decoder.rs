//! `diffusiond eval-decoder`: whether an unCLIP cascade's decoder draws what
//! its CLIP image embedding shows, on held-out renders, as a markdown table.

use anyhow::Context;
use clap::Args;
use diffusiond::eval::decoder::{evaluate, DecoderEvalConfig};
use diffusiond::train::clip::FrozenClip;

use super::eval_clip::HeldOutArgs;
use super::generate::ModelArgs;

#[derive(Debug, Args)]
pub struct EvalDecoderArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub held_out: HeldOutArgs,
    /// The decoder's steps (default: the cascade's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// The decoder's classifier-free guidance scale (default: the cascade's).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Images per batched decoder call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

pub fn run(args: EvalDecoderArgs) -> anyhow::Result<()> {
    let cascade = args.model.load()?;
    let clip = cascade.manifest.clip.as_ref().context("the cascade names no CLIP: it is not an unCLIP cascade")?;
    let teacher = FrozenClip::load(&cascade.dir.join(&clip.path), cascade.device())?;
    let seed = args.held_out.seed(teacher.inputs.train_seed)?;
    let config = DecoderEvalConfig { samples: args.held_out.samples, candidates: args.held_out.candidates, seed, steps: args.steps, guidance_scale: args.guidance, batch: args.batch };
    let report = evaluate(&cascade, &teacher, &config)?;
    println!("{}", report.markdown());
    Ok(())
}

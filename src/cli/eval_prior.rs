//! `diffusiond eval-prior`: how close a trained diffusion prior's samples come
//! to the CLIP image embeddings of held-out renders, against the caption's
//! CLIP text embedding alone, as a markdown table.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use diffusiond::diffusion::{Scheduler, SchedulerConfig};
use diffusiond::eval::prior::{evaluate, PriorEvalConfig};
use diffusiond::nn::device::DeviceSetting;
use diffusiond::nn::unclip::LoadedPrior;
use diffusiond::train::clip::FrozenClip;
use tch::Kind;

use super::eval_clip::HeldOutArgs;

#[derive(Debug, Args)]
pub struct EvalPriorArgs {
    /// A folder with `prior/` and `prior_scheduler/` (what `train-prior --export` writes).
    #[arg(long)]
    pub model: PathBuf,
    /// The noised CLIP folder the prior was trained in.
    #[arg(long)]
    pub clip: PathBuf,
    #[command(flatten)]
    pub held_out: HeldOutArgs,
    /// The prior's DDPM steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// The prior's classifier-free guidance scales, one row each.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub guidance: Vec<f32>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSetting,
}

pub fn run(args: EvalPriorArgs) -> anyhow::Result<()> {
    let device = args.device.resolve();
    let teacher = FrozenClip::load(&args.clip, device)?;
    let seed = args.held_out.seed(teacher.inputs.train_seed)?;
    if let Some(bad) = args.guidance.iter().find(|g| !(g.is_finite() && **g >= 0.0)) {
        bail!("--guidance {bad}: must be a number ≥ 0");
    }
    let prior = LoadedPrior::load(&args.model.join("prior"), device, Kind::Float)?;
    let text = std::fs::read_to_string(args.model.join("prior_scheduler/scheduler_config.json"))?;
    let scheduler = Scheduler::new(SchedulerConfig::from_json_str(&text)?)?;
    let config = PriorEvalConfig { samples: args.held_out.samples, candidates: args.held_out.candidates, seed, steps: args.steps, guidance_scales: args.guidance };
    let report = evaluate(&prior, &scheduler, &teacher, &config)?;
    println!("{}", report.markdown());
    Ok(())
}

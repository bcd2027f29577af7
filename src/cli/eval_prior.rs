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
use diffusiond::train::prior::PriorTeacher;
use tch::Kind;

#[derive(Debug, Args)]
pub struct EvalPriorArgs {
    /// A folder with `prior/` and `prior_scheduler/` (what `train-prior --export` writes).
    #[arg(long)]
    pub model: PathBuf,
    /// The noised CLIP folder the prior was trained in.
    #[arg(long)]
    pub clip: PathBuf,
    /// Held-out renders to score.
    #[arg(long, default_value_t = 256)]
    pub samples: usize,
    /// Candidate renders per query, the right one included (chance is 1/K).
    #[arg(long, default_value_t = 8)]
    pub candidates: usize,
    /// The held-out dataset's seed (default: the bitwise complement of the
    /// CLIP's training seed); never the training seed.
    #[arg(long)]
    pub seed: Option<u64>,
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
    let teacher = PriorTeacher::load(&args.clip, device)?;
    let seed = args.seed.unwrap_or(!teacher.inputs.train_seed);
    if seed == teacher.inputs.train_seed {
        bail!("--seed {seed} is the training seed: the prior is scored on renders it never saw");
    }
    if let Some(bad) = args.guidance.iter().find(|g| !(g.is_finite() && **g >= 0.0)) {
        bail!("--guidance {bad}: must be a number ≥ 0");
    }
    let prior = LoadedPrior::load(&args.model.join("prior"), device, Kind::Float)?;
    let text = std::fs::read_to_string(args.model.join("prior_scheduler/scheduler_config.json"))?;
    let scheduler = Scheduler::new(SchedulerConfig::from_json_str(&text)?)?;
    let config = PriorEvalConfig { samples: args.samples, candidates: args.candidates, seed, steps: args.steps, guidance_scales: args.guidance };
    let report = evaluate(&prior, &scheduler, &teacher, &config)?;
    println!("{}", report.markdown());
    Ok(())
}

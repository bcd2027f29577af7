//! `diffusiond eval-clip`: zero-shot retrieval accuracy of a noised CLIP
//! model folder on held-out renders, per noise level, as a markdown table.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use diffusiond::eval::retrieval::{evaluate, RetrievalConfig, TIMESTEPS};
use diffusiond::nn::device::DeviceSetting;
use diffusiond::train::clip::{noise_schedule, FrozenClip};

#[derive(Debug, Args)]
pub struct EvalClipArgs {
    /// A model folder written by `train-clip --export`.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub held_out: HeldOutArgs,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSetting,
}

/// The held-out renders a retrieval is scored on, and its candidates.
#[derive(Debug, Args)]
pub struct HeldOutArgs {
    /// Held-out renders to score.
    #[arg(long, default_value_t = 256)]
    pub samples: usize,
    /// Candidates per query, the right one included (chance is 1/K).
    #[arg(long, default_value_t = 8)]
    pub candidates: usize,
    /// The held-out dataset's seed (default: the bitwise complement of the
    /// CLIP's training seed, as training's validation uses); never the training seed.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl HeldOutArgs {
    /// The held-out seed for a model trained with `train_seed`.
    pub fn seed(&self, train_seed: u64) -> anyhow::Result<u64> {
        let seed = self.seed.unwrap_or(!train_seed);
        if seed == train_seed {
            bail!("--seed {seed} is the training seed: scores are taken on renders the model never saw");
        }
        Ok(seed)
    }
}

pub fn run(args: EvalClipArgs) -> anyhow::Result<()> {
    let clip = FrozenClip::load(&args.model, args.device.resolve())?;
    let seed = args.held_out.seed(clip.inputs.train_seed)?;
    let schedule = noise_schedule(&clip.inputs.scheduler)?;
    let config = RetrievalConfig { samples: args.held_out.samples, candidates: args.held_out.candidates, seed, timesteps: TIMESTEPS.to_vec() };
    let report = evaluate(&clip.clip.model, &clip.encoder, &schedule, &config)?;
    println!("{}", report.markdown());
    Ok(())
}

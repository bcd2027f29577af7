//! `diffusiond train-prior`: trains DALL-E 2's diffusion prior from its config
//! file, resuming from the run folder's last checkpoint, and exports its
//! `prior/` and `prior_scheduler/` folders.

use std::path::PathBuf;

use clap::Args;
use diffusiond::nn::device::DeviceSetting;
use diffusiond::train::prior::{PriorRun, PriorTrainConfig};

use super::train::{check_max_seconds, StepBar};

#[derive(Debug, Args)]
pub struct TrainPriorArgs {
    /// The run's config (CLIP, model, schedule, optimiser, steps), e.g. models/default/train/prior.json.
    #[arg(long)]
    pub config: PathBuf,
    /// The run folder: checkpoint, train.log. An existing checkpoint is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSetting,
    /// Stop after this many seconds of training (with a checkpoint); resumable.
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// Write the EMA weights as DIR/prior/ and the scheduler as DIR/prior_scheduler/ when done.
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
}

pub fn run(args: TrainPriorArgs) -> anyhow::Result<()> {
    let config = PriorTrainConfig::from_file(&args.config)?;
    check_max_seconds(args.max_seconds)?;
    let bar = StepBar::new(config.steps);
    let run = PriorRun { config, out: args.out.clone(), device: args.device.resolve(), max_seconds: args.max_seconds };
    let step = run.train(None, &mut |step, loss, rate| bar.update(step, loss, rate))?;
    bar.finish();
    eprintln!("trained to step {step}; checkpoint in {}", args.out.join("checkpoint").display());
    if let Some(dir) = &args.export {
        run.export(dir)?;
        eprintln!("exported the prior to {}", dir.join("prior").display());
    }
    Ok(())
}

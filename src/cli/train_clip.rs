//! `diffusiond train-clip`: trains the noised CLIP from its config file,
//! resuming from the run folder's last checkpoint, and exports a model folder.

use std::path::PathBuf;

use clap::Args;
use diffusiond::nn::device::DeviceSetting;
use diffusiond::train::clip::{ClipRun, ClipTrainConfig};

use super::train::{check_max_seconds, StepBar};

#[derive(Debug, Args)]
pub struct TrainClipArgs {
    /// The run's config (model, schedule, data, optimiser, steps), e.g. models/default/train/noised-clip.json.
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
    /// Write the trained model folder (config.json, model.safetensors, inputs.json) here when done.
    #[arg(long)]
    pub export: Option<PathBuf>,
}

pub fn run(args: TrainClipArgs) -> anyhow::Result<()> {
    let config = ClipTrainConfig::from_file(&args.config)?;
    check_max_seconds(args.max_seconds)?;
    let bar = StepBar::new(config.steps);
    let run = ClipRun { config, out: args.out.clone(), device: args.device.resolve(), max_seconds: args.max_seconds };
    let step = run.train(None, &mut |step, loss, rate| bar.update(step, loss, rate))?;
    bar.finish();
    eprintln!("trained to step {step}; checkpoint in {}", args.out.join("checkpoint").display());
    if let Some(dir) = &args.export {
        run.export(dir)?;
        eprintln!("exported the model to {}", dir.display());
    }
    Ok(())
}

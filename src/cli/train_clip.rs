//! `diffusiond train-clip`: trains the noised CLIP from its config file,
//! resuming from the run folder's last checkpoint, and exports a model folder.

use std::path::PathBuf;

use clap::Args;
use diffusiond::train::clip::{ClipRun, ClipTrainConfig};

use super::train::{check_max_seconds, RunArgs, StepBar};

#[derive(Debug, Args)]
pub struct TrainClipArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Write the trained model folder (config.json, model.safetensors, inputs.json) here when done.
    #[arg(long)]
    pub export: Option<PathBuf>,
}

pub fn run(args: TrainClipArgs) -> anyhow::Result<()> {
    let config = ClipTrainConfig::from_file(&args.run.config)?;
    check_max_seconds(args.run.max_seconds)?;
    let bar = StepBar::new(config.steps);
    let run = ClipRun { config, out: args.run.out.clone(), device: args.run.device.resolve(), max_seconds: args.run.max_seconds };
    let step = run.train(None, &mut |step, loss, rate| bar.update(step, loss, rate))?;
    bar.finish();
    eprintln!("trained to step {step}; checkpoint in {}", args.run.out.join("checkpoint").display());
    if let Some(dir) = &args.export {
        run.export(dir)?;
        eprintln!("exported the model to {}", dir.display());
    }
    Ok(())
}

//! `diffusiond train-prior`: trains DALL-E 2's diffusion prior from its config
//! file, resuming from the run folder's last checkpoint, and exports its
//! `prior/` and `prior_scheduler/` folders.

use std::path::PathBuf;

use clap::Args;
use diffusiond::train::prior::{PriorRun, PriorTrainConfig};

use super::train::{check_max_seconds, RunArgs, StepBar};

#[derive(Debug, Args)]
pub struct TrainPriorArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Write the EMA weights as DIR/prior/ and the scheduler as DIR/prior_scheduler/ when done.
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
}

pub fn run(args: TrainPriorArgs) -> anyhow::Result<()> {
    let config = PriorTrainConfig::from_file(&args.run.config)?;
    check_max_seconds(args.run.max_seconds)?;
    let bar = StepBar::new(config.steps);
    let run = PriorRun { config, out: args.run.out.clone(), device: args.run.device.resolve(), max_seconds: args.run.max_seconds };
    let step = run.train(None, &mut |step, loss, rate| bar.update(step, loss, rate))?;
    bar.finish();
    eprintln!("trained to step {step}; checkpoint in {}", args.run.out.join("checkpoint").display());
    if let Some(dir) = &args.export {
        run.export(dir)?;
        eprintln!("exported the prior to {}", dir.join("prior").display());
    }
    Ok(())
}

//! `diffusiond train`: trains one stage from its `train.json`, resuming from the
//! run folder's last checkpoint, and exports the EMA weights as a stage folder.

use std::path::PathBuf;

use clap::Args;
use diffusiond::nn::device::DeviceSetting;
use diffusiond::train::run::{Run, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The stage's train.json (architecture, schedule, data, optimiser, steps).
    #[arg(long)]
    pub config: PathBuf,
    /// The run folder: checkpoints, train.log. An existing checkpoint is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSetting,
    /// Stop at this step (a bounded burst); the run resumes from there later.
    #[arg(long)]
    pub until: Option<u64>,
    /// Write the EMA weights as a stage folder here when done.
    #[arg(long)]
    pub export: Option<PathBuf>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let config = TrainConfig::from_file(&args.config)?;
    let total = args.until.unwrap_or(config.steps).min(config.steps);
    let run = Run { config, out: args.out.clone(), device: args.device.resolve() };
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps {elapsed_precise} {msg}").expect("valid template").progress_chars("=> "),
    );
    let step = run.train(args.until, &mut |step, loss, rate| {
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.4}, {rate:.1} images/s"));
    })?;
    bar.finish();
    eprintln!("trained to step {step}; checkpoint in {}", args.out.join("checkpoint").display());
    if let Some(dir) = &args.export {
        run.export(dir)?;
        eprintln!("exported the EMA weights to {}", dir.display());
    }
    Ok(())
}

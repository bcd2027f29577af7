//! `diffusiond train-decoder`: trains DALL-E 2's decoder from its config
//! file, resuming from the run folder's last checkpoint, and exports its
//! `decoder/`, `text_proj/` and `decoder_scheduler/` folders.

use std::path::PathBuf;

use clap::Args;
use diffusiond::train::decoder::{DecoderRun, DecoderTrainConfig};

use super::train::{check_max_seconds, RunArgs, StepBar};

#[derive(Debug, Args)]
pub struct TrainDecoderArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Write the EMA weights as DIR/decoder/ and DIR/text_proj/, and the scheduler as DIR/decoder_scheduler/, when done.
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
}

pub fn run(args: TrainDecoderArgs) -> anyhow::Result<()> {
    let config = DecoderTrainConfig::from_file(&args.run.config)?;
    check_max_seconds(args.run.max_seconds)?;
    let bar = StepBar::new(config.steps);
    let run = DecoderRun { config, out: args.run.out.clone(), device: args.run.device.resolve(), max_seconds: args.run.max_seconds };
    let step = run.train(None, &mut |step, loss, rate| bar.update(step, loss, rate))?;
    bar.finish();
    eprintln!("trained to step {step}; checkpoint in {}", args.run.out.join("checkpoint").display());
    if let Some(dir) = &args.export {
        run.export(dir)?;
        eprintln!("exported the decoder to {}", dir.join("decoder").display());
    }
    Ok(())
}

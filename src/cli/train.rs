//! `diffusiond train`: trains one stage from its `train.json`, resuming from the
//! run folder's last checkpoint, and exports the EMA weights as a stage folder.

use std::path::PathBuf;

use clap::Args;
use diffusiond::nn::device::DeviceSetting;
use diffusiond::train::run::{Run, RunOptions, TrainConfig};
use diffusiond::train::trainer::Precision;
use indicatif::{ProgressBar, ProgressStyle};

/// What every training command takes: the run's config, its folder, the
/// device and a time limit.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The run's config file (model, schedule, data, optimiser, steps), e.g.
    /// models/default/train/base.json, noised-clip.json or prior.json.
    #[arg(long)]
    pub config: PathBuf,
    /// The run folder: checkpoints, train.log. An existing checkpoint is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSetting,
    /// Stop after this many seconds of training (with a checkpoint); resumable.
    #[arg(long)]
    pub max_seconds: Option<f64>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Stop at this step (a bounded burst); the run resumes from there later.
    #[arg(long)]
    pub until: Option<u64>,
    /// auto (fp16 mixed precision on CUDA; on the CPU bf16 products where it
    /// has bfloat16 instructions, else f32), f32, fp16 or bf16.
    #[arg(long, default_value = "auto")]
    pub precision: PrecisionSetting,
    /// Threads that render batches ahead of the training loop (default: 4 on
    /// CUDA, none on the CPU, where they would take cores from libtorch).
    #[arg(long)]
    pub data_threads: Option<usize>,
    /// Write the EMA weights as a stage folder here when done.
    #[arg(long)]
    pub export: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub enum PrecisionSetting {
    Auto,
    Fixed(Precision),
}

impl std::str::FromStr for PrecisionSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            Ok(PrecisionSetting::Auto)
        } else {
            s.parse().map(PrecisionSetting::Fixed)
        }
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let config = TrainConfig::from_file(&args.run.config)?;
    let total = args.until.unwrap_or(config.steps).min(config.steps);
    let device = args.run.device.resolve();
    let precision = match args.precision {
        PrecisionSetting::Fixed(p) => p,
        PrecisionSetting::Auto if device.is_cuda() => Precision::Fp16,
        PrecisionSetting::Auto if diffusiond::nn::precision::cpu_has_bf16() => Precision::Bf16,
        PrecisionSetting::Auto => Precision::F32,
    };
    check_max_seconds(args.run.max_seconds)?;
    let data_threads = args.data_threads.unwrap_or(if device.is_cuda() { 4 } else { 0 });
    let options = RunOptions { precision, max_seconds: args.run.max_seconds, data_threads };
    let run = Run { config, out: args.run.out.clone(), device, options };
    let bar = StepBar::new(total);
    let step = run.train(args.until, &mut |step, loss, rate| bar.update(step, loss, rate))?;
    bar.finish();
    eprintln!("trained to step {step}; checkpoint in {}", args.run.out.join("checkpoint").display());
    if let Some(dir) = &args.export {
        run.export(dir)?;
        eprintln!("exported the EMA weights to {}", dir.display());
    }
    Ok(())
}

/// `--max-seconds`, when given, must be a positive number.
pub(crate) fn check_max_seconds(max_seconds: Option<f64>) -> anyhow::Result<()> {
    if let Some(s) = max_seconds.filter(|s| !(s.is_finite() && *s > 0.0)) {
        anyhow::bail!("--max-seconds {s}: expected a positive number of seconds");
    }
    Ok(())
}

/// The progress line of a training run: steps, elapsed time, loss and throughput.
pub(crate) struct StepBar(ProgressBar);

impl StepBar {
    pub(crate) fn new(total: u64) -> Self {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps {elapsed_precise} {msg}").expect("valid template").progress_chars("=> "),
        );
        Self(bar)
    }

    pub(crate) fn update(&self, step: u64, loss: f64, images_per_second: f64) {
        self.0.set_position(step);
        self.0.set_message(format!("loss {loss:.4}, {images_per_second:.1} images/s"));
    }

    pub(crate) fn finish(&self) {
        self.0.finish();
    }
}

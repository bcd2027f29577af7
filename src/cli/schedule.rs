//! `diffusiond schedule`: the timesteps a sampler visits under a scheduler config,
//! with ᾱ_t and log-SNR at each — for checking a stage's settings by eye.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use diffusiond::diffusion::{SamplerKind, SamplerOptions, Scheduler, SchedulerConfig};

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// A diffusers `scheduler_config.json`; without it, diffusers' DDPM defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// ddpm, ddim or dpmsolver++.
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    /// Number of sampling steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Print the list only, comma-separated.
    #[arg(long)]
    pub list: bool,
}

pub fn run(args: ScheduleArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => SchedulerConfig::from_file(path)
            .with_context(|| format!("reading {}", path.display()))?
            .with_context(|| format!("in {}", path.display()))?,
        None => SchedulerConfig::default(),
    };
    let kind: SamplerKind = args.sampler.parse()?;
    let scheduler = Scheduler::new(config)?;
    let timesteps = scheduler.timesteps(&SamplerOptions::new(kind, args.steps))?;
    if args.list {
        let list: Vec<String> = timesteps.iter().map(i64::to_string).collect();
        println!("{}", list.join(","));
        return Ok(());
    }
    let schedule = scheduler.schedule();
    let snr = schedule.snr();
    println!("{:>5} {:>9} {:>12} {:>10}", "step", "t", "alpha_bar", "log_snr");
    for (i, &t) in timesteps.iter().enumerate() {
        let ab = schedule.alpha_bar(t);
        println!("{:>5} {:>9} {:>12.6e} {:>10.4}", i, t, ab, snr[t as usize].ln());
    }
    Ok(())
}

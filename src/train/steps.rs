//! The step loop of the small training runs (the noised CLIP's and the
//! prior's): steps until the run's end or its time limit, one log line a
//! step, a checkpoint every so many steps, at the end, and wherever the time
//! limit stops the run, so that a resumed run starts exactly where this one
//! stopped.

use std::io::Write;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tch::Device;

/// Seconds since the Unix epoch, for the log.
fn unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What one step reports.
pub(crate) struct Stepped {
    /// The optimiser's step count after the step.
    pub done: u64,
    pub loss: f64,
    /// The log line's fields after `step N` (`loss … lr …`), without the rate.
    pub fields: String,
}

/// How a run's steps go.
pub(crate) struct StepLoop<'a> {
    /// The run folder (its `train.log` is appended to).
    pub out: &'a Path,
    pub resuming: bool,
    pub device: Device,
    pub parameters: i64,
    /// The step the run starts from, and the one it stops at.
    pub first: u64,
    pub end: u64,
    pub checkpoint_every: u64,
    /// Samples a step, for the rate, and what they are called in the log.
    pub batch: usize,
    pub unit: &'static str,
    pub max_seconds: Option<f64>,
}

impl StepLoop<'_> {
    /// Runs `step` until the end or the time limit; `checkpoint` saves the
    /// run's state; `progress` gets (step, loss, samples/s). Returns the last step.
    pub fn run(
        &self,
        step: &mut dyn FnMut() -> anyhow::Result<Stepped>,
        checkpoint: &mut dyn FnMut() -> anyhow::Result<()>,
        progress: &mut dyn FnMut(u64, f64, f64),
    ) -> anyhow::Result<u64> {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(self.out.join("train.log"))?;
        let verb = if self.resuming { "resumed" } else { "started" };
        writeln!(log, "# {verb} at step {} on {:?}, {} parameters, unix {}", self.first, self.device, self.parameters, unix())?;
        let started = Instant::now();
        let out_of_time = || self.max_seconds.is_some_and(|s| started.elapsed().as_secs_f64() >= s);
        let mut done = self.first;
        while done < self.end && !out_of_time() {
            let r = step()?;
            done = r.done;
            let rate = (done - self.first) as f64 * self.batch as f64 / started.elapsed().as_secs_f64();
            progress(done, r.loss, rate);
            writeln!(log, "step {done} {} {}/s {rate:.1} unix {}", r.fields, self.unit, unix())?;
            if done.is_multiple_of(self.checkpoint_every) || done == self.end {
                checkpoint()?;
            }
        }
        if done > self.first && !done.is_multiple_of(self.checkpoint_every) && done != self.end {
            // Stopped by the time limit between checkpoints.
            checkpoint()?;
        }
        Ok(done)
    }
}

//! Held-out validation of a stage during training: how well the model
//! recovers the clean image x_0 from x_t at a fixed grid of noise levels, on
//! renders the run never trains on, with the caption and without it.
//!
//! The training loss is a poor guide to what a sampler will draw: it averages
//! over uniformly drawn timesteps, most of which are low-noise steps where
//! x_0 is nearly visible, and it is measured on a fresh batch every step. The
//! x̂_0 error at fixed timesteps on fixed samples and noise is comparable from
//! one checkpoint to the next and from one run to another, and it is split by
//! noise level: the high-noise steps decide a sample's layout and shapes
//! (Ho et al. 2020, §4.3), the low-noise ones its edges. The gap between the
//! error without the caption and with it measures how much the model reads
//! the prompt at each level — a model that ignores the text has no gap, and
//! classifier-free guidance (which amplifies exactly this difference) then
//! has nothing to amplify. Both are also reported over the objects' pixels
//! alone: the flat background is most of a render and is easy to infer from
//! x_t itself, so the whole-image error hides how well shapes are drawn.
//!
//! Relations get their own probe. On the held-out pairs ("a red circle above
//! a blue square"), the objects' x̂_0 error is measured again with the
//! relation word replaced by its opposite ("… below …"): the same picture,
//! described falsely in one word. A model that places objects by the relation
//! does worse with the false caption; one that ignores relation words does
//! equally well with both, and no amount of guidance will then place them.
//! Scores use the EMA weights, which are what a run exports.

use std::fmt::Write as _;

use super::caption::with_opposite_relation;
use super::dataset::Dataset;
use super::trainer::{BatchSource, StageTrainer, StepConfig, X0Error};

/// The validation set of a run and the noise levels it is scored at.
pub struct Validation {
    source: BatchSource,
    batches: u64,
    timesteps: Vec<i64>,
}

/// Mean squared x̂_0 error at one noise level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Level {
    pub t: i64,
    /// Over all pixels, with the caption and with the empty prompt.
    pub x0: f64,
    pub null: f64,
    /// Over the objects' pixels (those that differ from the background), alike.
    pub object: f64,
    pub object_null: f64,
    /// The held-out pairs' objects alone, with their captions and with the
    /// relation word swapped for its opposite.
    pub pair: f64,
    pub pair_swapped: f64,
}

/// The validation scores of one checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationReport {
    pub levels: Vec<Level>,
}

impl ValidationReport {
    fn mean(&self, f: impl Fn(&Level) -> f64) -> f64 {
        self.levels.iter().map(f).sum::<f64>() / self.levels.len().max(1) as f64
    }

    /// One `key value` log line, like the training log's: for each level T,
    /// `x0_T`, `null_T`, `obj_T` and `objnull_T`, then their means over the levels.
    pub fn log_line(&self, step: u64) -> String {
        let mut line = format!("val step {step}");
        for l in &self.levels {
            let t = l.t;
            let _ = write!(
                line,
                " x0_{t} {:.5} null_{t} {:.5} obj_{t} {:.5} objnull_{t} {:.5} pair_{t} {:.5} pairswap_{t} {:.5}",
                l.x0, l.null, l.object, l.object_null, l.pair, l.pair_swapped
            );
        }
        let _ = write!(
            line,
            " x0_mean {:.5} null_mean {:.5} obj_mean {:.5} objnull_mean {:.5} pair_mean {:.5} pairswap_mean {:.5}",
            self.mean(|l| l.x0),
            self.mean(|l| l.null),
            self.mean(|l| l.object),
            self.mean(|l| l.object_null),
            self.mean(|l| l.pair),
            self.mean(|l| l.pair_swapped)
        );
        line
    }
}

impl Validation {
    /// `samples` held-out samples (rounded up to whole training batches),
    /// drawn like the run's batches but from a dataset seed the run never
    /// uses; scored at t = T/10, 3T/10, …, 9T/10 for `train_steps` = T.
    pub fn new(train: &BatchSource, samples: usize) -> Self {
        let seed = !train.config.seed;
        let batch = train.config.batch.max(1);
        let source = BatchSource {
            dataset: Dataset::new(!train.dataset.seed()),
            config: StepConfig { batch, uncond_prob: 0.0, seed },
            ..train.clone()
        };
        let t = train.train_steps;
        let timesteps = [1, 3, 5, 7, 9].iter().map(|k| (k * t / 10).min(t - 1)).collect();
        Self { source, batches: samples.div_ceil(batch).max(1) as u64, timesteps }
    }

    /// Scores the trainer's model as its weights are now.
    pub fn run(&self, trainer: &StageTrainer) -> anyhow::Result<ValidationReport> {
        let mut sums = vec![(X0Error::default(), X0Error::default()); self.timesteps.len()];
        let mut pairs = vec![(X0Error::default(), X0Error::default()); self.timesteps.len()];
        // Every batch has the same size, so the empty prompts' encoding serves
        // them all; each batch's captions are encoded once for every noise level.
        let null = trainer.encode(&vec![String::new(); self.source.config.batch])?;
        for k in 0..self.batches {
            let host = self.source.draw(k)?;
            let text = trainer.encode(&host.prompts)?;
            let (rows, swapped): (Vec<usize>, Vec<String>) = host
                .samples()
                .iter()
                .enumerate()
                .filter_map(|(r, s)| with_opposite_relation(&s.description, &host.prompts[r]).map(|w| (r, w)))
                .unzip();
            let pair_text = if rows.is_empty() {
                None
            } else {
                let prompts: Vec<String> = rows.iter().map(|&r| host.prompts[r].clone()).collect();
                // The true captions are rows of the batch's encoding already.
                let index = tch::Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()).to_device(text.device());
                Some((text.index_select(0, &index), trainer.encode(&swapped)?, host.select(&rows, prompts)))
            };
            for (i, &t) in self.timesteps.iter().enumerate() {
                let at = host.at_timestep(t);
                sums[i].1 += trainer.x0_error(at.shallow_clone(), &null)?;
                sums[i].0 += trainer.x0_error(at, &text)?;
                if let Some((true_text, false_text, batch)) = &pair_text {
                    let at = batch.at_timestep(t);
                    pairs[i].0 += trainer.x0_error(at.shallow_clone(), true_text)?;
                    pairs[i].1 += trainer.x0_error(at, false_text)?;
                }
            }
        }
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let levels = self
            .timesteps
            .iter()
            .zip(sums)
            .zip(pairs)
            .map(|((&t, (c, u)), (p, q))| Level {
                t,
                x0: ratio(c.sum, c.count),
                null: ratio(u.sum, u.count),
                object: ratio(c.object_sum, c.object_count),
                object_null: ratio(u.object_sum, u.object_count),
                pair: ratio(p.object_sum, p.object_count),
                pair_swapped: ratio(q.object_sum, q.object_count),
            })
            .collect();
        Ok(ValidationReport { levels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_line_names_every_level_and_the_means() {
        let level = |t, x0, object| Level { t, x0, null: 2.0 * x0, object, object_null: 2.0 * object, pair: object, pair_swapped: 3.0 * object };
        let report = ValidationReport { levels: vec![level(100, 0.01, 0.1), level(900, 0.3, 0.5)] };
        assert_eq!(
            report.log_line(7),
            "val step 7 x0_100 0.01000 null_100 0.02000 obj_100 0.10000 objnull_100 0.20000 pair_100 0.10000 pairswap_100 0.30000 \
             x0_900 0.30000 null_900 0.60000 obj_900 0.50000 objnull_900 1.00000 pair_900 0.50000 pairswap_900 1.50000 \
             x0_mean 0.15500 null_mean 0.31000 obj_mean 0.30000 objnull_mean 0.60000 pair_mean 0.30000 pairswap_mean 0.90000"
        );
    }
}

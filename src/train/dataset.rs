//! The dataset: an endless, seekable stream of captioned scenes.
//!
//! Sample `i` of seed `s` depends on `(s, i)` alone, through its own
//! xoshiro256++ generators seeded from a SplitMix64 mix of the pair, so any
//! index can be drawn directly (shuffled epochs, data-parallel workers taking
//! strides, resuming mid-run) and always gives the same scene and caption.
//! The layout and the wording draw from separate streams, so changing the
//! caption templates does not move any object.

use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::caption::{worded, Mention};
use super::claims::Claim;
use super::layout::{self, Description, Mix};
use super::render;
use super::scene::Scene;

/// Largest image side the dataset renders (a guard against typos, not a limit
/// of the renderer).
pub const MAX_SIZE: u32 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("invalid image size {0}: expected 1 to {MAX_SIZE} pixels")]
    Size(u32),
    #[error("tensor conversion failed: {0}")]
    Torch(#[from] tch::TchError),
}

/// One captioned scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub index: u64,
    pub scene: Scene,
    pub description: Description,
    pub caption: String,
    /// Where the caption names each referent's count, colour and shape.
    pub mentions: Vec<Mention>,
    /// What the caption asserts; each holds for `scene` (see [`Claim::verify`]).
    pub claims: Vec<Claim>,
}

impl Sample {
    /// The scene drawn at `size × size` pixels.
    pub fn image(&self, size: u32) -> image::RgbImage {
        render::render(&self.scene, size)
    }
}

/// The synthetic captioned-shapes dataset for one seed and description mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dataset {
    seed: u64,
    mix: Mix,
}

/// Which of a sample's random streams.
#[derive(Clone, Copy)]
enum Stream {
    Layout = 0,
    Caption = 1,
}

impl Dataset {
    /// The dataset with the default description mix.
    pub fn new(seed: u64) -> Self {
        Self { seed, mix: Mix::default() }
    }

    /// The dataset drawing its kinds of description by `mix`.
    pub fn with_mix(seed: u64, mix: Mix) -> Result<Self, layout::MixError> {
        mix.validate()?;
        Ok(Self { seed, mix })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Sample `index`: always the same for the same seed.
    pub fn sample(&self, index: u64) -> Sample {
        let (scene, description) = layout::sample_mixed(&mut self.rng(index, Stream::Layout), &self.mix);
        let worded = worded(&description, &mut self.rng(index, Stream::Caption));
        let claims = description.claims();
        Sample { index, scene, description, caption: worded.text, mentions: worded.mentions, claims }
    }

    /// Samples `start`, `start + 1`, … without end.
    pub fn iter_from(&self, start: u64) -> Samples {
        Samples { dataset: *self, next: start }
    }

    /// Samples 0, 1, … without end.
    pub fn iter(&self) -> Samples {
        self.iter_from(0)
    }

    /// The samples at `indices`, their images as one `[B, 3, size, size]`
    /// tensor in [-1, 1], and their captions in the same order.
    pub fn batch(&self, indices: &[u64], size: u32) -> Result<(Tensor, Vec<String>), DatasetError> {
        let (images, samples) = self.batch_samples(indices, size)?;
        Ok((images, samples.into_iter().map(|s| s.caption).collect()))
    }

    /// As [`Dataset::batch`], keeping the whole samples (scenes and claims).
    pub fn batch_samples(&self, indices: &[u64], size: u32) -> Result<(Tensor, Vec<Sample>), DatasetError> {
        if size == 0 || size > MAX_SIZE {
            return Err(DatasetError::Size(size));
        }
        let samples: Vec<Sample> = indices.iter().map(|&i| self.sample(i)).collect();
        let images = render::render_batch(samples.iter().map(|s| &s.scene), size)?;
        Ok((images, samples))
    }

    fn rng(&self, index: u64, stream: Stream) -> Xoshiro256PlusPlus {
        let key = splitmix64(splitmix64(splitmix64(self.seed) ^ index) ^ stream as u64);
        Xoshiro256PlusPlus::seed_from_u64(key)
    }
}

/// The endless iterator of [`Dataset::iter`].
#[derive(Debug, Clone)]
pub struct Samples {
    dataset: Dataset,
    next: u64,
}

impl Iterator for Samples {
    type Item = Sample;

    fn next(&mut self) -> Option<Sample> {
        let sample = self.dataset.sample(self.next);
        self.next = self.next.wrapping_add(1);
        Some(sample)
    }
}

/// SplitMix64's output function: a bijective avalanche mix, so nearby seeds
/// and indices give unrelated generator states.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::layout::Content;

    #[test]
    fn samples_depend_on_seed_and_index_only() {
        let data = Dataset::new(11);
        let direct = data.sample(5);
        let streamed = data.iter().nth(5).unwrap();
        assert_eq!(direct, streamed);
        assert_eq!(data.iter_from(5).next().unwrap(), direct);
        assert_ne!(data.sample(6).caption, direct.caption);
    }

    #[test]
    fn batches_have_the_requested_shape_and_bad_sizes_are_errors() {
        let (images, captions) = Dataset::new(1).batch(&[3, 1, 4], 16).unwrap();
        assert_eq!(images.size(), [3, 3, 16, 16]);
        assert_eq!(captions.len(), 3);
        assert!(matches!(Dataset::new(1).batch(&[0], 0), Err(DatasetError::Size(0))));
    }

    fn kind(sample: &Sample) -> &'static str {
        match &sample.description.content {
            Content::Single { .. } => "single",
            Content::Pair { .. } => "pair",
            Content::Groups { groups } if groups.len() == 2 => "two_kinds",
            Content::Groups { .. } => "counted",
        }
    }

    #[test]
    fn the_mix_sets_how_often_each_kind_of_description_is_drawn() {
        let count = |data: Dataset, what: &str| (0..2000).filter(|&i| kind(&data.sample(i)) == what).count();
        let pairs_only = Dataset::with_mix(3, Mix { single: 0, pair: 1, two_kinds: 0, counted: 0 }).unwrap();
        assert_eq!(count(pairs_only, "pair"), 2000);
        // Default weights 25/30/20/25: 500/600/400/500 expected of 2000.
        let default = Dataset::new(3);
        for (what, expected) in [("single", 500.0), ("pair", 600.0), ("two_kinds", 400.0), ("counted", 500.0)] {
            let n = count(default, what) as f64;
            assert!((n - expected).abs() < 4.0 * expected.sqrt(), "{what}: {n} of 2000");
        }
        let shifted = Dataset::with_mix(3, Mix { single: 10, pair: 40, two_kinds: 25, counted: 25 }).unwrap();
        let (s, p) = (count(shifted, "single") as f64, count(shifted, "pair") as f64);
        assert!((s - 200.0).abs() < 60.0 && (p - 800.0).abs() < 120.0, "single {s}, pair {p}");
        assert!(Dataset::with_mix(3, Mix { single: 0, pair: 0, two_kinds: 0, counted: 0 }).is_err());
    }

    #[test]
    fn the_default_mix_written_out_draws_the_same_samples() {
        let explicit = Dataset::with_mix(5, Mix { single: 25, pair: 30, two_kinds: 20, counted: 25 }).unwrap();
        for i in 0..50 {
            assert_eq!(explicit.sample(i), Dataset::new(5).sample(i));
        }
    }
}

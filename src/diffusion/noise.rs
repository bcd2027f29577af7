//! Per-image randomness.
//!
//! Every image owns a random stream seeded by its own seed (a request's image i
//! uses seed + i). A batch's noise is the stack of each image's draw, so an image
//! receives the same noise whatever else shares its batch, and batching can never
//! change an image. The streams are ChaCha8 on the CPU, so an image is also the
//! same on every machine and device: only the finished tensor moves to the GPU.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::VecDeque;
use tch::{Device, Kind, Tensor};

use super::error::{DiffusionError, Result};

/// A stream of standard-normal tensors for one image.
pub trait NoiseSource: Send {
    /// The next draw, of `shape` (one image, no batch dimension), float32 on the CPU.
    fn draw(&mut self, shape: &[i64]) -> Result<Tensor>;
}

/// The seeded stream every real request uses.
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }
}

impl NoiseSource for SeededNoise {
    fn draw(&mut self, shape: &[i64]) -> Result<Tensor> {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect();
        Ok(Tensor::from_slice(&values).view(shape))
    }
}

/// Replays recorded tensors in order: lets tests feed a reference implementation's
/// noise through exactly the code path real requests use.
pub struct ReplayNoise {
    queue: VecDeque<Tensor>,
}

impl ReplayNoise {
    pub fn new(draws: impl IntoIterator<Item = Tensor>) -> Self {
        Self { queue: draws.into_iter().collect() }
    }

    /// Draws not consumed yet.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn draw(&mut self, shape: &[i64]) -> Result<Tensor> {
        let t = self.queue.pop_front().ok_or_else(|| DiffusionError::invalid("noise", "replayed noise ran out"))?;
        if t.size() != shape {
            return Err(DiffusionError::invalid("noise", format!("replayed {:?}, wanted {shape:?}", t.size())));
        }
        Ok(t.to_kind(Kind::Float))
    }
}

/// The noise streams of a batch, one per image, in batch order.
pub struct BatchNoise {
    images: Vec<Box<dyn NoiseSource>>,
}

impl BatchNoise {
    pub fn new(images: Vec<Box<dyn NoiseSource>>) -> Self {
        Self { images }
    }

    /// One [`SeededNoise`] per seed.
    pub fn seeded(seeds: &[u64]) -> Self {
        Self::new(seeds.iter().map(|&s| Box::new(SeededNoise::new(s)) as Box<dyn NoiseSource>).collect())
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Appends another batch's streams (a job joining a running batch).
    pub fn extend(&mut self, other: BatchNoise) {
        self.images.extend(other.images);
    }

    /// Draws a [B, …] tensor, image b's slice from stream b, as `kind` on `device`.
    pub fn draw(&mut self, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let (batch, image_shape) = shape.split_first().ok_or_else(|| DiffusionError::invalid("noise", "empty shape"))?;
        if *batch != self.images.len() as i64 {
            return Err(DiffusionError::invalid("noise", format!("{} streams for a batch of {batch}", self.images.len())));
        }
        let draws = self.images.iter_mut().map(|s| s.draw(image_shape)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&draws, 0).to_device(device).to_kind(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_gets_the_same_noise_alone_or_batched() {
        let alone = BatchNoise::seeded(&[7]).draw(&[1, 3, 4, 4], Kind::Float, Device::Cpu).unwrap();
        let batched = BatchNoise::seeded(&[3, 7, 9]).draw(&[3, 3, 4, 4], Kind::Float, Device::Cpu).unwrap();
        assert!(alone.get(0).equal(&batched.get(1)));
        assert!(!batched.get(0).equal(&batched.get(1)));
    }

    #[test]
    fn seeded_noise_is_standard_normal() {
        let x = SeededNoise::new(1).draw(&[200_000]).unwrap();
        let mean = x.mean(Kind::Double).double_value(&[]);
        let std = x.std(true).double_value(&[]);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((std - 1.0).abs() < 0.01, "std {std}");
    }

    #[test]
    fn mismatched_batch_is_an_error() {
        assert!(BatchNoise::seeded(&[1, 2]).draw(&[3, 2], Kind::Float, Device::Cpu).is_err());
    }
}

//! Zero-shot retrieval with a noised CLIP ([`crate::nn::noised_clip`]), the
//! evaluation CLIP reports (Radford et al. 2021, §3.1) at the noise levels
//! GLIDE's guidance uses it at (Nichol et al. 2022, §2.4).
//!
//! Held-out renders (a dataset seed the model never trained on) are each
//! given K candidate captions: their own and K − 1 captions of other held-out
//! samples whose descriptions differ (an equal description would be a correct
//! answer too). Image → text: is the own caption the most similar of the K?
//! Text → image: is the own render the most similar of the K renders of the
//! same samples? Ties count as misses. Each render is scored clean (t = 0, as
//! the clean share of training sees it) and noised to t = 250, 500, 750 with
//! one fixed draw of noise per render, so the rows differ only in t; chance
//! is 1/K. A noised CLIP that guides well keeps a useful accuracy deep into
//! the noise, where a clean CLIP would fall to chance.

use std::fmt::Write as _;

use anyhow::bail;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Kind, Tensor};

use crate::diffusion::forward::q_sample;
use crate::diffusion::NoiseSchedule;
use crate::nn::noised_clip::NoisedClip;
use crate::nn::text::TextEncoder;
use crate::train::clip::pooled_text;
use crate::train::dataset::{Dataset, Sample};
use crate::train::trainer::randn;

/// The noise levels scored by default.
pub const TIMESTEPS: [i64; 4] = [0, 250, 500, 750];

/// Renders embedded per forward pass.
const CHUNK: usize = 64;

#[derive(Debug, Clone)]
pub struct RetrievalConfig {
    /// Held-out samples (indices 0..samples of the dataset of `seed`).
    pub samples: usize,
    /// Candidates per query, the right one included (K ≥ 2).
    pub candidates: usize,
    /// The held-out dataset's seed; it also seeds the choice of candidates and the noise.
    pub seed: u64,
    pub timesteps: Vec<i64>,
}

/// Top-1 accuracies at one noise level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrievalRow {
    pub t: i64,
    pub image_to_text: f64,
    pub text_to_image: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalReport {
    pub samples: usize,
    pub candidates: usize,
    pub rows: Vec<RetrievalRow>,
}

impl RetrievalReport {
    /// A markdown table, one row per t, after a line with the chance level.
    pub fn markdown(&self) -> String {
        let chance = 1.0 / self.candidates as f64;
        let mut out = format!("{} held-out samples, {} candidates each (chance {chance:.3})\n\n", self.samples, self.candidates);
        out.push_str("| t | image→text top-1 | text→image top-1 |\n|---:|---:|---:|\n");
        for r in &self.rows {
            let _ = writeln!(out, "| {} | {:.3} | {:.3} |", r.t, r.image_to_text, r.text_to_image);
        }
        out
    }
}

/// For each sample, its candidate set: itself first, then `k − 1` others
/// whose descriptions differ from its own, drawn without replacement.
pub fn candidate_sets(samples: &[Sample], k: usize, rng: &mut Xoshiro256PlusPlus) -> anyhow::Result<Vec<Vec<usize>>> {
    if k < 2 {
        bail!("--candidates {k}: at least 2 (one right, one wrong)");
    }
    samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let others: Vec<usize> = (0..samples.len()).filter(|&j| samples[j].description != s.description).collect();
            if others.len() < k - 1 {
                bail!("sample {i} has only {} held-out samples with another description; use more samples or fewer candidates", others.len());
            }
            let mut set = vec![i];
            set.extend(rand::seq::index::sample(rng, others.len(), k - 1).into_iter().map(|n| others[n]));
            Ok(set)
        })
        .collect()
}

/// The share of queries whose own item (first in its set) scores strictly
/// above every other candidate; `score(query, candidate)`.
pub(crate) fn top1(sets: &[Vec<usize>], score: impl Fn(usize, usize) -> f32) -> f64 {
    let hits = sets
        .iter()
        .enumerate()
        .filter(|(q, set)| {
            let own = score(*q, set[0]);
            set[1..].iter().all(|&c| score(*q, c) < own)
        })
        .count();
    hits as f64 / sets.len().max(1) as f64
}

/// Scores `clip` (with the `encoder` it was trained on, and the `schedule`
/// its t refers to) on held-out renders.
pub fn evaluate(clip: &NoisedClip, encoder: &TextEncoder, schedule: &NoiseSchedule, config: &RetrievalConfig) -> anyhow::Result<RetrievalReport> {
    let n = config.samples;
    if n < config.candidates {
        bail!("--samples {n} is fewer than --candidates {}", config.candidates);
    }
    let device = encoder.device();
    let size = clip.config().image_size;
    let indices: Vec<u64> = (0..n as u64).collect();
    let (images, samples) = Dataset::new(config.seed).batch_samples(&indices, size as u32)?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let sets = candidate_sets(&samples, config.candidates, &mut rng)?;
    let noise = randn(&mut rng, &[n as i64, 3, size, size]);
    let text = tch::no_grad(|| -> anyhow::Result<Tensor> {
        let parts = samples
            .chunks(CHUNK)
            .map(|chunk| {
                let prompts: Vec<&str> = chunk.iter().map(|s| s.caption.as_str()).collect();
                Ok(clip.text_embeds(&pooled_text(encoder, &prompts)?)?)
            })
            .collect::<anyhow::Result<Vec<Tensor>>>()?;
        Ok(Tensor::cat(&parts, 0))
    })?;
    let mut rows = Vec::with_capacity(config.timesteps.len());
    for &t in &config.timesteps {
        let image = tch::no_grad(|| -> anyhow::Result<Tensor> {
            let mut parts = Vec::new();
            for start in (0..n).step_by(CHUNK) {
                let len = CHUNK.min(n - start) as i64;
                let x0 = images.narrow(0, start as i64, len).to_device(device);
                let steps = vec![t; len as usize];
                // t = 0 is the clean render, as training's clean share has it.
                let x_t = if t == 0 { x0 } else { q_sample(schedule, &x0, &steps, &noise.narrow(0, start as i64, len).to_device(device))? };
                parts.push(clip.image_embeds(&x_t, &Tensor::from_slice(&steps).to_device(device))?);
            }
            Ok(Tensor::cat(&parts, 0))
        })?;
        // Cosine similarities [images, texts] on the host.
        let scores: Vec<f32> = Vec::try_from(image.matmul(&text.tr()).to_kind(Kind::Float).to_device(tch::Device::Cpu).reshape([-1]))?;
        let at = |img: usize, txt: usize| scores[img * n + txt];
        rows.push(RetrievalRow { t, image_to_text: top1(&sets, |q, c| at(q, c)), text_to_image: top1(&sets, |q, c| at(c, q)) });
    }
    Ok(RetrievalReport { samples: n, candidates: config.candidates, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_the_own_sample_then_other_descriptions() {
        let samples: Vec<Sample> = Dataset::new(9).iter().take(40).collect();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
        let sets = candidate_sets(&samples, 5, &mut rng).unwrap();
        for (i, set) in sets.iter().enumerate() {
            assert_eq!((set.len(), set[0]), (5, i));
            let mut unique = set.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), 5, "distinct candidates");
            assert!(set[1..].iter().all(|&j| samples[j].description != samples[i].description));
        }
        assert!(candidate_sets(&samples, 1, &mut rng).is_err());
        assert!(candidate_sets(&samples[..3], 5, &mut rng).is_err());
    }

    #[test]
    fn top1_counts_strict_wins_only() {
        let sets = vec![vec![0, 1, 2], vec![1, 0, 2], vec![2, 0, 1]];
        // Query 0 wins, query 1 ties with candidate 0, query 2 loses.
        let table = [[0.9f32, 0.1, 0.2], [0.5, 0.5, 0.1], [0.3, 0.1, 0.2]];
        assert!((top1(&sets, |q, c| table[q][c]) - 1.0 / 3.0).abs() < 1e-12);
        let report = RetrievalReport { samples: 3, candidates: 3, rows: vec![RetrievalRow { t: 250, image_to_text: 0.5, text_to_image: 0.25 }] };
        let md = report.markdown();
        assert!(md.contains("| 250 | 0.500 | 0.250 |") && md.contains("chance 0.333"), "{md}");
    }
}

//! How well a diffusion prior (DALL-E 2, Ramesh et al. 2022, §2.2 and §5.1)
//! turns captions into CLIP image embeddings, on held-out renders.
//!
//! For each held-out render, the query is an embedding made from its caption
//! alone: the CLIP text embedding itself (what a decoder conditioned on text
//! embeddings would get: the "no prior" baseline), or the prior's sample from
//! it at each configured guidance scale. Scores: image retrieval top-1 among
//! K candidate renders (its own and K − 1 renders of other descriptions, as in
//! `eval::retrieval`) by cosine similarity to the candidates' CLIP image
//! embeddings, and the mean cosine between the query and its own render's
//! embedding. A prior that works brings the query into the image side of
//! CLIP's space: a higher cosine than the text embedding has, at a retrieval
//! accuracy at least as high.

use std::fmt::Write as _;

use anyhow::bail;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Device, Kind, Tensor};

use super::retrieval::{candidate_sets, top1};
use crate::diffusion::{BatchNoise, Scheduler};
use crate::nn::noised_clip::model::l2_normalise;
use crate::nn::unclip::LoadedPrior;
use crate::pipeline::unclip::{sample_prior, PriorCondition};
use crate::train::dataset::Dataset;
use crate::train::clip::FrozenClip;

#[derive(Debug, Clone)]
pub struct PriorEvalConfig {
    /// Held-out samples (indices 0..samples of the dataset of `seed`).
    pub samples: usize,
    /// Candidates per query, the right one included (K ≥ 2).
    pub candidates: usize,
    /// The held-out dataset's seed; it also seeds the candidates and the prior's noise.
    pub seed: u64,
    pub steps: usize,
    /// Classifier-free guidance scales of the prior, one row each (≤ 1: unguided).
    pub guidance_scales: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PriorRow {
    pub label: String,
    /// Image retrieval top-1 among the candidates.
    pub top1: f64,
    /// Mean cosine between the query and its own render's image embedding.
    pub cosine: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PriorReport {
    pub samples: usize,
    pub candidates: usize,
    pub rows: Vec<PriorRow>,
}

impl PriorReport {
    pub fn markdown(&self) -> String {
        let chance = 1.0 / self.candidates as f64;
        let mut out = format!("{} held-out samples, {} candidate renders each (chance {chance:.3})\n\n", self.samples, self.candidates);
        out.push_str("| query | image top-1 | cosine to own render |\n|---|---:|---:|\n");
        for r in &self.rows {
            let _ = writeln!(out, "| {} | {:.3} | {:.3} |", r.label, r.top1, r.cosine);
        }
        out
    }
}

/// Scores queries `[n, D]` against the image embeddings `[n, D]` of the same renders.
fn row(label: String, queries: &Tensor, images: &Tensor, sets: &[Vec<usize>]) -> anyhow::Result<PriorRow> {
    let n = images.size()[0] as usize;
    let scores: Vec<f32> = Vec::try_from(l2_normalise(queries).matmul(&l2_normalise(images).tr()).to_kind(Kind::Float).reshape([-1]))?;
    let at = |q: usize, c: usize| scores[q * n + c];
    let cosine = (0..n).map(|q| f64::from(at(q, q))).sum::<f64>() / n as f64;
    Ok(PriorRow { label, top1: top1(sets, at), cosine })
}

/// Scores `prior` (sampled with `scheduler`) against the CLIP of `teacher`.
pub fn evaluate(prior: &LoadedPrior, scheduler: &Scheduler, teacher: &FrozenClip, config: &PriorEvalConfig) -> anyhow::Result<PriorReport> {
    let n = config.samples;
    if n < config.candidates {
        bail!("--samples {n} is fewer than --candidates {}", config.candidates);
    }
    let size = teacher.clip.model.config().image_size as u32;
    let indices: Vec<u64> = (0..n as u64).collect();
    let (images, samples) = Dataset::new(config.seed).batch_samples(&indices, size)?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let sets = candidate_sets(&samples, config.candidates, &mut rng)?;
    let image = teacher.image_embeds(&images)?.to_device(Device::Cpu);
    let prompts: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    let text = teacher.text_embeds(&prompts)?;
    let mut rows = vec![row("CLIP text embedding (no prior)".into(), &text.to_device(Device::Cpu), &image, &sets)?];
    let empty = teacher.text_embeds(&[""])?;
    let device = prior.vs.device();
    for &scale in &config.guidance_scales {
        let guided = scale > 1.0;
        let cond = text.to_device(device);
        let proj = if guided { Tensor::cat(&[empty.to_device(device).expand_as(&cond), cond.shallow_clone()], 0) } else { cond };
        let condition = PriorCondition { proj_embedding: &proj, hidden: None, mask: None, guided };
        let seeds: Vec<u64> = (0..n as u64).map(|i| config.seed.wrapping_mul(1_000_003).wrapping_add(i)).collect();
        let sampled = sample_prior(&prior.model, scheduler, &condition, config.steps, scale, &mut BatchNoise::seeded(&seeds))?;
        let label = format!("prior, DDPM {} steps, guidance {scale}", config.steps);
        rows.push(row(label, &sampled.to_device(Device::Cpu), &image, &sets)?);
    }
    Ok(PriorReport { samples: n, candidates: config.candidates, rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_count_strict_wins_and_average_the_own_cosine() {
        // Three renders along the axes; query 0 is render 0, query 1 is
        // between renders 1 and 2 (a tie), query 2 points at render 0.
        let images = Tensor::eye(3, (Kind::Float, Device::Cpu));
        let queries = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]).view([3, 3]);
        let sets = vec![vec![0, 1, 2], vec![1, 0, 2], vec![2, 0, 1]];
        let r = row("q".into(), &queries, &images, &sets).unwrap();
        assert!((r.top1 - 1.0 / 3.0).abs() < 1e-12, "{r:?}");
        let want = (1.0 + 0.5f64.sqrt() + 0.0) / 3.0;
        assert!((r.cosine - want).abs() < 1e-6, "{r:?}");
        let md = PriorReport { samples: 3, candidates: 3, rows: vec![r] }.markdown();
        assert!(md.contains("| q | 0.333 | 0.569 |") && md.contains("chance 0.333"), "{md}");
    }
}

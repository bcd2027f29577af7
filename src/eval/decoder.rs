//! Whether an unCLIP cascade's decoder draws what its CLIP image embedding
//! shows (DALL-E 2, Ramesh et al. 2022, §3.1: a decoder that inverts the
//! CLIP image encoder is what makes variations, and what the prior's samples
//! are for).
//!
//! Held-out renders are embedded by the cascade's CLIP (clean, t = 0). The
//! decoder draws one image per render from its embedding with the empty
//! caption, from its caption with the learned null embedding instead (what a
//! text-only decoder would get), from both, and from neither (the
//! unconditional baseline), each with the same noise and no layout guidance
//! (the decoder itself is measured). Each drawn image is
//! embedded again and scored as in `eval::prior`: retrieval top-1 of its own
//! render among K candidates, and the mean cosine to its render's embedding.
//! A decoder that reads its embedding scores far above the unconditional row
//! from the embedding alone.

use std::fmt::Write as _;

use anyhow::{bail, Context};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Kind, Tensor};

use super::batch::step;
use super::retrieval::{candidate_sets, top1};
use crate::nn::noised_clip::model::l2_normalise;
use crate::pipeline::stage::{Network, StageKind};
use crate::pipeline::{Cascade, RequestSpec, StageOverride};
use crate::train::clip::FrozenClip;
use crate::train::dataset::Dataset;

#[derive(Debug, Clone)]
pub struct DecoderEvalConfig {
    /// Held-out samples (indices 0..samples of the dataset of `seed`).
    pub samples: usize,
    /// Candidates per query, the right one included (K ≥ 2).
    pub candidates: usize,
    /// The held-out dataset's seed; it also seeds the candidates and the decoder's noise.
    pub seed: u64,
    /// The decoder's steps and guidance (absent: the cascade's defaults).
    pub steps: Option<usize>,
    pub guidance_scale: Option<f32>,
    /// Images per batched decoder call.
    pub batch: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderRow {
    pub label: String,
    /// Retrieval top-1 of the source render among the candidates.
    pub top1: f64,
    /// Mean cosine between the drawn image's embedding and its render's.
    pub cosine: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderReport {
    pub samples: usize,
    pub candidates: usize,
    pub rows: Vec<DecoderRow>,
}

impl DecoderReport {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "{} held-out renders, {} candidates each (chance {:.3})\n\n| decoder conditioned on | image top-1 | cosine to the render |\n|---|---:|---:|\n",
            self.samples,
            self.candidates,
            1.0 / self.candidates as f64
        );
        for r in &self.rows {
            let _ = writeln!(out, "| {} | {:.3} | {:.3} |", r.label, r.top1, r.cosine);
        }
        out
    }
}

/// Scores `cascade`'s decoder (an unCLIP cascade's stage 1) with `teacher`,
/// the cascade's CLIP.
pub fn evaluate(cascade: &Cascade, teacher: &FrozenClip, config: &DecoderEvalConfig) -> anyhow::Result<DecoderReport> {
    if config.candidates < 2 || config.samples < config.candidates || config.batch == 0 {
        bail!("need at least 2 candidates, as many samples, and a batch of at least 1");
    }
    let (Some(prior), Some(decoder)) = (cascade.stages.first(), cascade.stages.get(1).filter(|s| s.kind == StageKind::Decoder)) else {
        bail!("{} is not an unCLIP cascade (a prior, then a decoder)", cascade.manifest.name);
    };
    let Network::Prior(prior) = &prior.network else { bail!("stage 0 is not a prior") };
    let null = decoder.text_proj.as_ref().context("the decoder has no text projection")?.model.null_image_embedding().to_kind(Kind::Float);
    let size = decoder.size.0 as u32;
    let dataset = Dataset::new(config.seed);
    let samples: Vec<_> = (0..config.samples as u64).map(|i| dataset.sample(i)).collect();
    let (images, _) = dataset.batch_samples(&(0..config.samples as u64).collect::<Vec<_>>(), size)?;
    let targets = teacher.image_embeds(&images)?.to_device(tch::Device::Cpu);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(config.seed);
    let sets = candidate_sets(&samples, config.candidates, &mut rng)?;
    let rows: [(&str, bool, bool); 4] = [
        ("its CLIP image embedding (empty caption)", true, false),
        ("its caption (null embedding)", false, true),
        ("both", true, true),
        ("neither (unconditional)", false, false),
    ];
    let mut report = DecoderReport { samples: config.samples, candidates: config.candidates, rows: Vec::new() };
    for (label, image, caption) in rows {
        let mut drawn = Vec::new();
        for start in (0..config.samples).step_by(config.batch) {
            let end = (start + config.batch).min(config.samples);
            let mut jobs = Vec::new();
            for i in start..end {
                let over = StageOverride { steps: config.steps, guidance_scale: config.guidance_scale, ..Default::default() };
                // The decoder alone: no layout guidance, whatever the cascade's default.
                let spec = RequestSpec {
                    prompt: samples[i].caption.clone(),
                    n: 1,
                    seed: Some(config.seed.wrapping_add(i as u64)),
                    stages: Some(2),
                    stage_overrides: vec![(1, over)],
                    layout_guidance_scale: Some(0.0),
                    ..Default::default()
                };
                let mut request = cascade.plan(&spec)?;
                if !caption {
                    request.prompt = String::new();
                }
                let embedding = if image { targets.narrow(0, i as i64, 1) } else { null.unsqueeze(0) };
                let latents = prior.to_latents(&embedding.to_device(prior.vs.device()));
                let text = cascade.request_text(&request)?;
                jobs.push(cascade.start_stage(&request, 1, &text, Some(&latents))?);
            }
            while jobs.iter().any(|j| !j.is_done()) {
                step(cascade, decoder, &mut jobs)?;
            }
            for job in &jobs {
                drawn.push(job.sample().clamp(-1.0, 1.0).to_device(tch::Device::Cpu));
            }
        }
        let embeds = teacher.image_embeds(&Tensor::cat(&drawn, 0))?.to_device(tch::Device::Cpu);
        let similarity = l2_normalise(&embeds).matmul(&l2_normalise(&targets).tr());
        let score = |q: usize, c: usize| similarity.double_value(&[q as i64, c as i64]) as f32;
        let own: f64 = (0..config.samples).map(|i| f64::from(score(i, i))).sum::<f64>() / config.samples as f64;
        report.rows.push(DecoderRow { label: label.to_owned(), top1: top1(&sets, score), cosine: own });
    }
    Ok(report)
}

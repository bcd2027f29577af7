//! The grounding loss: each word that names an object should attend to that
//! object. TokenCompose's token loss (Wang et al. 2024, §3.2), on the
//! attention maps the UNet's text-attending layers record
//! ([`AttentionMaps`](crate::nn::unet::AttentionMaps)).
//!
//! The dataset knows what each caption word refers to ([`Mention`]) and where
//! that referent's objects are (the scene), so there is no segmentation model
//! in the loop: for a word `w` naming referent `r`, and a layer's map `a_w`
//! (the attention every image position pays to `w`'s tokens),
//!
//! ```text
//! L = (1 − Σ_p a_w(p)·m_r(p) / Σ_p a_w(p))²
//! ```
//!
//! where `m_r` is 1 on the positions of that layer's grid that hold part of
//! `r`'s objects. It is 0 when all of the word's attention falls on its
//! objects and 1 when none does, whatever the attention's total mass; it is
//! averaged over words, samples and layers. This is the most direct signal a
//! small model can get for binding ("a red circle and a blue square" puts red
//! on the circle), which the diffusion loss only teaches indirectly.

use tch::{Kind, Tensor};

use super::caption::Mention;
use super::dataset::Sample;
use super::render;
use crate::nn::text::tokenizer::covering;
use crate::nn::text::Tokenizer;

/// The pixels of an object that count as "on" it when masks are coarsened.
const INSIDE: f32 = 0.5;

/// What a batch's words should attend to.
#[derive(Debug)]
pub struct GroundingTargets {
    /// `[B, R, S, S]`: 1 on the pixels (of the stage's `S × S` image) inside
    /// referent `r`'s objects, 0 elsewhere and for referents a sample lacks.
    pub masks: Tensor,
    /// `[B, R, L]`: 1 where text token `l` is part of a word naming referent `r`.
    pub tokens: Tensor,
}

impl GroundingTargets {
    /// Targets for `samples` at `size` px, with `prompts[i]` what sample `i` was
    /// captioned with (an empty prompt, for classifier-free guidance, names
    /// nothing and gets no loss).
    pub fn new(samples: &[Sample], prompts: &[String], tokenizer: &Tokenizer, size: u32) -> anyhow::Result<Self> {
        let referents = samples.iter().map(|s| s.description.wanted().len()).max().unwrap_or(0).max(1);
        let (b, side, length) = (samples.len(), size as usize, tokenizer.max_length());
        let mut masks = vec![0.0f32; b * referents * side * side];
        let mut tokens = vec![0.0f32; b * referents * length];
        for (i, (sample, prompt)) in samples.iter().zip(prompts).enumerate() {
            if prompt.is_empty() {
                continue;
            }
            anyhow::ensure!(*prompt == sample.caption, "sample {}: grounding needs the sample's own caption", sample.index);
            for (r, (what, _)) in sample.description.wanted().iter().enumerate() {
                let objects: Vec<_> = sample.scene.objects.iter().filter(|o| what.matches(o)).collect();
                let at = (i * referents + r) * side * side;
                let coverage = render::coverage(&objects, side);
                for (m, c) in masks[at..at + side * side].iter_mut().zip(coverage) {
                    *m = if c >= INSIDE { 1.0 } else { 0.0 };
                }
            }
            let offsets = tokenizer.offsets(prompt)?;
            for Mention { referent, start, end, .. } in &sample.mentions {
                for (l, _) in covering(&offsets, &[(*start, *end)]).iter().enumerate().take(length).filter(|(_, &on)| on) {
                    tokens[(i * referents + referent) * length + l] = 1.0;
                }
            }
        }
        let (b, r, s, l) = (b as i64, referents as i64, side as i64, length as i64);
        Ok(Self {
            masks: Tensor::f_from_slice(&masks)?.f_view([b, r, s, s])?,
            tokens: Tensor::f_from_slice(&tokens)?.f_view([b, r, l])?,
        })
    }

    pub fn to_device(&self, device: tch::Device) -> Self {
        Self { masks: self.masks.to_device(device), tokens: self.tokens.to_device(device) }
    }

    /// The token loss over `maps` (each `[B, H·W, L]`, square grids that
    /// divide the stage's size), averaged over layers; 0 when no word is
    /// grounded in the batch.
    pub fn loss(&self, maps: &[Tensor]) -> Tensor {
        let device = self.masks.device();
        let words = self.tokens.sum(Kind::Float);
        if maps.is_empty() || words.double_value(&[]) == 0.0 {
            return Tensor::zeros([], (Kind::Float, device));
        }
        let (b, r, side, _) = self.masks.size4().expect("[B, R, S, S] masks");
        let per_layer: Vec<Tensor> = maps
            .iter()
            .map(|map| {
                let map = map.to_kind(Kind::Float);
                let positions = map.size()[1];
                let grid = (positions as f64).sqrt().round() as i64;
                // A grid cell is on an object when any of its pixels is.
                let factor = side / grid;
                let coarse = self.masks.max_pool2d([factor, factor], [factor, factor], [0, 0], [1, 1], false);
                let masks = coarse.view([b, r, grid * grid]);
                // [B, R, L]: the share of each token's attention that lands on each referent.
                let on = masks.matmul(&map);
                let total = map.sum_dim_intlist([1i64].as_slice(), true, Kind::Float).clamp_min(1e-8);
                let outside: Tensor = 1.0 - on / total;
                (outside.square() * &self.tokens).sum(Kind::Float) / &words
            })
            .collect();
        Tensor::stack(&per_layer, 0).mean(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Masks and token marks by hand: one sample, one referent on the left
    /// half of a 4×4 image, named by text token 1 of 3.
    fn left_half() -> GroundingTargets {
        let mut masks = vec![0.0f32; 16];
        for y in 0..4 {
            masks[y * 4] = 1.0;
            masks[y * 4 + 1] = 1.0;
        }
        GroundingTargets {
            masks: Tensor::from_slice(&masks).view([1, 1, 4, 4]),
            tokens: Tensor::from_slice(&[0.0f32, 1.0, 0.0]).view([1, 1, 3]),
        }
    }

    /// A `[1, 4, 3]` map at 2×2: token 1's attention per cell, others uniform.
    fn map(cells: [f32; 4]) -> Tensor {
        let mut values = Vec::new();
        for c in cells {
            values.extend([0.1, c, 0.1]);
        }
        Tensor::from_slice(&values).view([1, 4, 3])
    }

    #[test]
    fn attention_on_the_object_costs_nothing_and_off_it_costs_one() {
        let targets = left_half();
        let loss = |cells| targets.loss(&[map(cells)]).double_value(&[]);
        // Cells 0 and 2 are the left column of the 2×2 grid.
        assert!(loss([0.4, 0.0, 0.3, 0.0]).abs() < 1e-9);
        assert!((loss([0.0, 0.4, 0.0, 0.3]) - 1.0).abs() < 1e-9);
        // Half on, half off, at any total mass: (1 − ½)².
        assert!((loss([0.2, 0.2, 0.1, 0.1]) - 0.25).abs() < 1e-6);
        assert!((loss([0.02, 0.02, 0.01, 0.01]) - 0.25).abs() < 1e-6);
        // Layers average; a finer layer sees the same mask at its own grid.
        let fine: Vec<f32> = (0..16).flat_map(|p| [0.1, if p % 4 == 0 { 0.5 } else { 0.0 }, 0.1]).collect();
        let fine = Tensor::from_slice(&fine).view([1, 16, 3]);
        let both = targets.loss(&[map([0.0, 0.4, 0.0, 0.3]), fine]).double_value(&[]);
        assert!((both - 0.5).abs() < 1e-6, "{both}");
    }

    #[test]
    fn no_grounded_word_means_no_loss() {
        let mut targets = left_half();
        targets.tokens = targets.tokens.zeros_like();
        assert_eq!(targets.loss(&[map([0.0, 0.4, 0.0, 0.3])]).double_value(&[]), 0.0);
    }

    #[test]
    fn the_gradient_moves_attention_onto_the_object() {
        let targets = left_half();
        let logits = Tensor::zeros([1, 4, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let loss = targets.loss(&[logits.softmax(1, Kind::Float)]);
        loss.backward();
        let grad = logits.grad();
        // Descending the gradient raises token 1's logits on the left cells (0, 2), lowers them on the right.
        let g = |cell: i64| grad.double_value(&[0, cell, 1]);
        assert!(g(0) < 0.0 && g(2) < 0.0 && g(1) > 0.0 && g(3) > 0.0, "{grad}");
    }
}

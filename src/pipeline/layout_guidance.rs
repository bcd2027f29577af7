//! Layout guidance of the base stage: where a prompt's things go ("a red
//! circle above a blue square"), and that each single thing is drawn once,
//! enforced through the UNet's own cross-attention. After Epstein et al.
//! 2023 ("Diffusion Self-Guidance for Controllable Image Generation", §3: an
//! object's position is the centroid of its words' attention, its size the
//! attention's extent) and Chen et al. 2024 ("Training-Free Layout Control
//! with Cross-Attention Guidance", backward guidance).
//!
//! Why: a small text-to-image model learns what its words draw long before it
//! learns what relation words say (for ours, the held-out x̂_0 error is the
//! same with a pair's relation word swapped for its opposite: it does not
//! read them), and it often draws a named thing twice or not at all. Its
//! cross-attention still knows where each named thing is being drawn, the
//! grounding loss having trained exactly that. So the layout is read from the
//! prompt (`pipeline::prompt_layout`), and at each early step the sample is
//! moved down the gradient of
//!
//! ```text
//! g(x_t) = mean over layers of
//!            Σ_single things v_k                              (each drawn in one place)
//!          + Σ_groups of n  w·(v_k^(n) + Σ_i<j max(0, m − |c_ki − c_kj|)
//!                              + Σ_i max(0, 1/2n − a_ki))     (a group in n places)
//!          + max(0, m − d) + max(0, |d⊥| − d/2)               (a relation: the subject on its side)
//!          or Σ_pairs max(0, m − |c_j − c_k|)                 (no relation: things apart)
//! ε̂' = ε̂ + s·√(1 − ᾱ_t)·∇_{x_t} g
//! ```
//!
//! with c_k the centroid of thing k's attention in [0, 1] image coordinates,
//! v_k the attention's mean squared distance from it, v_k^(n) its mean
//! squared distance from the nearest of n cluster centres c_k1 … c_kn (a
//! group counted as n: "three stars") and a_ki the share of its attention
//! in cluster i, w a weight (`COUNTED`), d and d⊥ the offset
//! from the subject's centroid to the object's along and across the
//! relation's axis, and m a margin (ADM's classifier-guidance form with
//! log p = −g). Only steps with t at or above a threshold are guided: layout
//! is decided in the noisy steps (Ho et al. 2020, §4.3), and guiding the late
//! ones only distorts shapes.
//!
//! Batching: each image's gradient is taken alone with the conditional prompt
//! (a batch of one, always the same computation), so a guided image gets the
//! same bits whichever jobs share its UNet call.

use std::sync::Arc;

use tch::{Kind, Tensor};

use super::error::{PipelineError, Result};
use super::prompt_layout::PromptLayout;
use super::stage::{Stage, IMAGE_CHANNELS};
use crate::diffusion::forward::NoiseLevel;
use crate::diffusion::guidance::classifier_guided_output;
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::nn::text::tokenizer::covering;
use crate::nn::text::Tokenizer;
use crate::nn::unet::{AttentionMaps, UNetInput};
use crate::train::claims::Relation;

/// The request field every layout-guidance error names.
pub const FIELD: &str = "layout_guidance_scale";

/// Scales beyond this only push images off the data.
pub const MAX_LAYOUT_GUIDANCE: f32 = 1000.0;

/// How far apart (in image widths) the two centroids should be.
pub const MARGIN: f64 = 0.25;

/// The offset across the relation's axis may be at most this share of the
/// offset along it before g grows.
pub const ACROSS: f64 = 0.5;

/// Weight of the two sides' attention spread in g.
pub const COMPACT: f64 = 1.0;

/// Weight of a counted group's terms in g. Counts need a firmer push than
/// places: on the default model's 32 counting prompts at 32 px, these terms
/// at layout guidance 300 drew 87.5% of the counts right with weight 1,
/// 96.9% at twice that scale and 100% at 1000/300 of it, shapes intact.
pub const COUNTED: f64 = 3.0;

/// Lloyd iterations refining a counted group's cluster centres.
const LLOYD_ITERATIONS: usize = 3;

/// The share of the schedule, from its noisy end, whose steps are guided.
pub const GUIDED_SHARE: f64 = 0.5;

/// One job's layout guidance at the base stage (or unCLIP's decoder).
pub struct LayoutJob {
    /// `[K, L]`: 1 on the tokens of the words naming thing k.
    named: Tensor,
    /// How many objects thing k is: one (its attention should be compact),
    /// n (in n compact places), or a group of no stated size.
    counts: Vec<Option<u32>>,
    /// `named[0]` stands in this relation to `named[1]`.
    relation: Option<Relation>,
    scale: f32,
    /// `[n, L, D]`: each image's prompt tokens, in the UNet's kind and device.
    text: Tensor,
    /// `[n, time_embed_dim]`: each image's class-embedding rows, for a UNet
    /// that takes them (unCLIP's decoder: its image embedding's projection).
    class_labels: Option<Tensor>,
    /// Steps with t at or above this are guided.
    from_t: i64,
    prediction: PredictionType,
    schedule: Arc<NoiseSchedule>,
}

impl LayoutJob {
    /// Guidance of `prompt`'s `layout` at `scale`, for images conditioned on
    /// `text` (`[n, L, D]`) by a model predicting `prediction` on
    /// `schedule`; `None` when nothing is left to guide (a thing's words fall
    /// beyond the tokenizer's `max_length`, or only groups are named).
    pub fn new(
        prompt: &str,
        layout: &PromptLayout,
        tokenizer: &Tokenizer,
        text: Tensor,
        scale: f32,
        prediction: PredictionType,
        schedule: Arc<NoiseSchedule>,
    ) -> Result<Option<Self>> {
        if !layout.guided() {
            return Ok(None);
        }
        let offsets = tokenizer.offsets(prompt).map_err(|e| PipelineError::invalid("prompt", e.to_string()))?;
        let rows: Vec<Vec<f32>> = layout.named.iter().map(|n| covering(&offsets, &n.words).into_iter().map(|on| f32::from(u8::from(on))).collect()).collect();
        if rows.iter().any(|r| !r.contains(&1.0)) {
            return Ok(None);
        }
        let counts: Vec<Option<u32>> = layout.named.iter().map(|n| n.count).collect();
        let device = text.device();
        let (k, l) = (rows.len() as i64, offsets.len() as i64);
        let named = Tensor::from_slice(&rows.concat()).view([k, l]).to_device(device);
        let steps = schedule.len() as i64;
        let from_t = ((1.0 - GUIDED_SHARE) * steps as f64).round() as i64;
        Ok(Some(Self { named, counts, relation: layout.relation, scale, text, class_labels: None, from_t, prediction, schedule }))
    }

    /// For unCLIP's decoder: its context is `extra` tokens of the image
    /// embedding's ahead of the prompt's (`text` was built with them), which
    /// name no thing, and its time embedding takes `class_labels`
    /// (`[n, time_embed_dim]`, the image embedding's projection) per image.
    pub fn after_image_tokens(mut self, extra: i64, class_labels: Tensor) -> Self {
        let k = self.named.size()[0];
        let lead = Tensor::zeros([k, extra], (self.named.kind(), self.named.device()));
        self.named = Tensor::cat(&[&lead, &self.named], 1);
        self.class_labels = Some(class_labels);
        self
    }

    /// Whether the step at timestep `t` is guided.
    pub fn guides(&self, t: i64) -> bool {
        t >= self.from_t
    }

    /// g(x_t) of every row of `x_t` (`[n, 3, H, W]`) at timestep `t`, and its
    /// gradient, one image at a time: (`[n]`, `[n, 3, H, W]` f32).
    pub fn gradient(&self, stage: &Stage, x_t: &Tensor, t: i64) -> Result<(Vec<f64>, Tensor)> {
        let n = x_t.size()[0];
        if self.text.size()[0] != n {
            return Err(PipelineError::invalid(FIELD, format!("prompt tokens for {} images, {n} images", self.text.size()[0])));
        }
        let kind = stage.weight_kind();
        let device = self.text.device();
        let timestep = Tensor::from_slice(&[t]).to_device(device);
        let mut losses = Vec::with_capacity(n as usize);
        let mut grads = Vec::with_capacity(n as usize);
        for i in 0..n {
            let (loss, grad) = tch::with_grad(|| -> Result<(f64, Tensor)> {
                let x = x_t.narrow(0, i, 1).to_device(device).to_kind(Kind::Float).detach().set_requires_grad(true);
                let sample = x.to_kind(kind);
                let text = self.text.narrow(0, i, 1);
                let class = self.class_labels.as_ref().map(|c| c.narrow(0, i, 1));
                let input = UNetInput { sample: &sample, timesteps: &timestep, encoder_hidden_states: &text, class_labels: class.as_ref(), text_mask: None };
                let maps = AttentionMaps::default();
                // Only the attention maps matter; the prediction itself is unused.
                let _prediction = stage.unet()?.model.forward_probed(&input, false, Some(&maps))?;
                let maps = maps.take();
                // A UNet without text attention has no layout to move.
                if maps.is_empty() {
                    return Ok((0.0, x.zeros_like()));
                }
                let loss = layout_loss(&maps, &self.named, &self.counts, self.relation);
                let value = loss.double_value(&[]);
                let mut g = Tensor::f_run_backward(&[loss], &[&x], false, false)?;
                Ok((value, g.remove(0)))
            })?;
            losses.push(loss);
            grads.push(grad);
        }
        Ok((losses, Tensor::cat(&grads, 0)))
    }

    /// The model `output` for `sample` at timestep `t` (after classifier-free
    /// guidance; `[n, 3 or 6, H, W]`) shifted by this guidance, in the same
    /// parameterisation, f32; unchanged at steps it does not guide.
    pub fn guide(&self, stage: &Stage, output: &Tensor, sample: &Tensor, t: i64) -> Result<Tensor> {
        if !self.guides(t) {
            return Ok(output.shallow_clone());
        }
        let n = sample.size()[0];
        let (_, grad) = self.gradient(stage, sample, t)?;
        let level = NoiseLevel::new(self.schedule.alpha_bar(t));
        // log p = −g: the gradient of log p is −∇g.
        let grad_log_prob = grad.to_device(sample.device()).neg();
        Ok(classifier_guided_output(output, sample, self.prediction, level, IMAGE_CHANNELS, &grad_log_prob, &vec![self.scale; n as usize])?)
    }
}

/// The attention centroid (y, x), in [0, 1] image coordinates, of the tokens
/// marked by `tokens` (`[L]`) in each row of `map` (`[B, H·W, L]`, a square
/// grid): `[B, 2]`.
pub fn centroid(map: &Tensor, tokens: &Tensor) -> Tensor {
    spread(map, tokens).0
}

/// [`centroid`], and the attention's mean squared distance from it (`[B]`):
/// small when the words attend one compact place, large when their attention
/// is split between two (a duplicated object) or smeared over the image.
pub fn spread(map: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
    let (weights, cells) = attention(map, tokens);
    let b = weights.size()[0];
    let ys = cells.select(1, 0).unsqueeze(0);
    let xs = cells.select(1, 1).unsqueeze(0);
    let y = (&weights * &ys).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let x = (&weights * &xs).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let distance = (ys - y.view([b, 1])).square() + (xs - x.view([b, 1])).square();
    let dispersion = (&weights * distance).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    (Tensor::stack(&[y, x], 1).view([b, 2]), dispersion)
}

/// The attention of the tokens marked by `tokens` (`[L]`) in each row of
/// `map` (`[B, H·W, L]`, a square grid) as weights summing to one over the
/// cells (`[B, H·W]`, f32), and each cell's centre (y, x) in [0, 1] image
/// coordinates (`[H·W, 2]`).
fn attention(map: &Tensor, tokens: &Tensor) -> (Tensor, Tensor) {
    let (_, positions, _) = map.size3().expect("[B, H·W, L] attention map");
    let side = (positions as f64).sqrt().round() as i64;
    let weights = map.to_kind(Kind::Float).matmul(&tokens.to_kind(Kind::Float)); // [B, H·W]
    let weights = &weights / weights.sum_dim_intlist([1i64].as_slice(), true, Kind::Float).clamp_min(1e-12);
    let coord = (Tensor::arange(side, (Kind::Float, map.device())) + 0.5) / side as f64;
    let ys = coord.view([side, 1]).expand([side, side], false).reshape([positions, 1]);
    let xs = coord.view([1, side]).expand([side, side], false).reshape([positions, 1]);
    (weights, Tensor::cat(&[ys, xs], 1))
}

/// g for `named` things (`[K, L]` token marks, `counts[k]` how many objects
/// thing k is, if stated) in `relation` (of thing 0 to thing 1, if any),
/// averaged over the layers' `maps` (each `[1, H·W, L]`).
pub fn layout_loss(maps: &[Tensor], named: &Tensor, counts: &[Option<u32>], relation: Option<Relation>) -> Tensor {
    let per_layer: Vec<Tensor> = maps
        .iter()
        .map(|map| {
            let parts: Vec<(Tensor, Tensor)> = (0..named.size()[0]).map(|k| spread(map, &named.get(k))).collect();
            let mut g = Tensor::zeros([1], (Kind::Float, map.device()));
            for (k, ((_, v), &count)) in parts.iter().zip(counts).enumerate() {
                match count {
                    Some(1) => g += v * COMPACT,
                    Some(n) => {
                        // Weighed apart from the spread's: sharing them would
                        // reorder the gradient's sums and change the images'
                        // last bits.
                        let (centres, shares, v_n) = clusters(map, &named.get(k as i64), i64::from(n));
                        g += (v_n + separation(&centres, MARGIN) + shortfall(&shares)) * COUNTED;
                    }
                    None => {}
                }
            }
            match relation {
                Some(relation) if parts.len() >= 2 => g += relation_term(&parts[0].0, &parts[1].0, relation, MARGIN),
                _ => {
                    for j in 0..parts.len() {
                        for k in j + 1..parts.len() {
                            let distance = (&parts[j].0 - &parts[k].0).square().sum_dim_intlist([1i64].as_slice(), false, Kind::Float).sqrt();
                            g += (distance.neg() + MARGIN).relu();
                        }
                    }
                }
            }
            g.mean(Kind::Float)
        })
        .collect();
    Tensor::stack(&per_layer, 0).mean(Kind::Float)
}

/// The attention of the tokens marked by `tokens` (`[L]`) in each row of
/// `map` (`[B, H·W, L]`, a square grid) as `n` clusters: their centres (y, x)
/// in [0, 1] image coordinates (`[B, n, 2]`), each cluster's share of the
/// attention (`[B, n]`), and the attention's mean squared distance from the
/// nearest centre (`[B]`). The distance is small when the words attend n
/// compact places and large when they attend more (one cluster spans two
/// objects); when they attend fewer, two centres share one place (which
/// [`separation`] penalises) or a cluster holds next to nothing (which
/// [`shortfall`] does). With n = 1 the distance is [`spread`]'s.
///
/// Weighted k-means: seeded at the heaviest cell, then each time at the cell
/// whose weight times squared distance to the nearest seed is largest (a
/// deterministic k-means++, so a map always gives the same clusters), then
/// refined by Lloyd iterations. Which cell belongs to which cluster is
/// chosen without gradient; the centres and distances carry it.
pub fn clusters(map: &Tensor, tokens: &Tensor, n: i64) -> (Tensor, Tensor, Tensor) {
    let (weights, cells) = attention(map, tokens);
    let (b, positions) = weights.size2().expect("[B, H·W] weights");
    let n = n.clamp(1, positions);
    // Squared distance of every cell to every centre: [B, H·W, n].
    let distances = |centres: &Tensor| {
        let k = centres.size()[1];
        (cells.view([1, positions, 1, 2]) - centres.view([b, 1, k, 2])).square().sum_dim_intlist([3i64].as_slice(), false, Kind::Float)
    };
    // The weighted mean of each cluster's cells, where it has any weight
    // (`previous` where it has none).
    let means = |assigned: &Tensor, previous: &Tensor, w: &Tensor| {
        let mass = w.unsqueeze(2) * assigned.one_hot(n).to_kind(Kind::Float); // [B, H·W, n]
        let total = mass.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).unsqueeze(2); // [B, n, 1]
        let centres = mass.transpose(1, 2).matmul(&cells) / total.clamp_min(1e-12);
        centres.where_self(&total.gt(0.0), previous)
    };
    let assigned = tch::no_grad(|| {
        let w = weights.detach();
        let mut centres = cells.index_select(0, &w.argmax(1, false)).view([b, 1, 2]);
        for _ in 1..n {
            let nearest = distances(&centres).amin(&[2i64][..], false);
            let next = cells.index_select(0, &(&w * nearest).argmax(1, false)).view([b, 1, 2]);
            centres = Tensor::cat(&[centres, next], 1);
        }
        let mut assigned = distances(&centres).argmin(2, false);
        for _ in 0..LLOYD_ITERATIONS {
            centres = means(&assigned, &centres, &w);
            assigned = distances(&centres).argmin(2, false);
        }
        assigned
    });
    // A cluster left with no weight has no centre of its own: it sits at the
    // origin, where only the other centres' distances to it carry gradient.
    let centres = means(&assigned, &Tensor::zeros([b, n, 2], (Kind::Float, weights.device())), &weights);
    let nearest = distances(&centres).gather(2, &assigned.unsqueeze(2), false).squeeze_dim(2); // [B, H·W]
    let dispersion = (&weights * nearest).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let shares = (weights.unsqueeze(2) * assigned.one_hot(n).to_kind(Kind::Float)).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    (centres, shares, dispersion)
}

/// How far each of n clusters' `shares` of the attention (`[B, n]`) falls
/// short of half an even share, 1/2n, summed: `[B]`. A group drawn as fewer
/// objects than it counts leaves a cluster on a stray corner of the map.
pub fn shortfall(shares: &Tensor) -> Tensor {
    let n = shares.size()[1];
    (shares.neg() + 0.5 / n as f64).relu().sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
}

/// How far each pair of `centres` (`[B, n, 2]`) is from being `margin`
/// apart, summed (0 when every pair is): `[B]`.
pub fn separation(centres: &Tensor, margin: f64) -> Tensor {
    let (b, n, _) = centres.size3().expect("[B, n, 2] centres");
    let mut total = Tensor::zeros([b], (Kind::Float, centres.device()));
    for i in 0..n {
        for j in i + 1..n {
            // The small floor keeps the square root's gradient finite where
            // two centres meet.
            let distance = (centres.select(1, i) - centres.select(1, j)).square().sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
            total += ((distance + 1e-8).sqrt().neg() + margin).relu();
        }
    }
    total
}

/// How far centroid `s` (`[B, 2]`, y then x) is from lying `margin` on the
/// relation's side of centroid `o`, and mostly along the relation's axis
/// (0 when it does): `[B]`.
pub fn relation_term(s: &Tensor, o: &Tensor, relation: Relation, margin: f64) -> Tensor {
    // Image y grows downwards: "above" wants the object's y larger.
    let (dy, dx) = (o.select(1, 0) - s.select(1, 0), o.select(1, 1) - s.select(1, 1));
    let (gap, across) = match relation {
        Relation::Above => (dy, dx),
        Relation::Below => (dy.neg(), dx),
        Relation::LeftOf => (dx, dy),
        Relation::RightOf => (dx.neg(), dy),
    };
    // Apart along the axis, and more along it than across it (a diagonal
    // pair is neither above nor beside).
    let apart = (gap.neg() + margin).relu();
    let aligned = (across.abs() - gap * ACROSS).relu();
    apart + aligned
}

#[cfg(test)]
mod tests {
    use super::*;

    /// g of a relation alone: two group-like things (no compactness term).
    fn relation_loss(maps: &[Tensor], s: &Tensor, o: &Tensor, relation: Relation) -> Tensor {
        let named = Tensor::stack(&[s, o], 0);
        layout_loss(maps, &named, &[None, None], Some(relation))
    }

    /// A 4×4 map over 3 tokens: token 0 attends cell `a`, token 1 cell `b`
    /// (row-major), token 2 nothing.
    fn map_at(a: usize, b: usize) -> Tensor {
        let mut values = vec![0.0f32; 16 * 3];
        values[a * 3] = 1.0;
        values[b * 3 + 1] = 1.0;
        Tensor::from_slice(&values).view([1, 16, 3])
    }

    /// Token 0 top-left, token 1 bottom-right.
    fn map() -> Tensor {
        map_at(0, 15)
    }

    #[test]
    fn centroids_are_in_image_coordinates() {
        let c = centroid(&map(), &Tensor::from_slice(&[1.0f32, 0.0, 0.0]));
        assert_eq!(Vec::<f32>::try_from(c.view([-1])).unwrap(), [0.125, 0.125]);
        let c = centroid(&map(), &Tensor::from_slice(&[0.0f32, 1.0, 0.0]));
        assert_eq!(Vec::<f32>::try_from(c.view([-1])).unwrap(), [0.875, 0.875]);
    }

    #[test]
    fn split_attention_is_spread_out() {
        let one = Tensor::from_slice(&[1.0f32, 0.0, 0.0]);
        let (_, compact) = spread(&map(), &one);
        assert_eq!(compact.double_value(&[0]), 0.0);
        // Token 0 split evenly between cells 0 and 15: 0.75 apart on both
        // axes, each half 0.375 from the centre on each: 2·0.375² = 0.28125.
        let mut values = vec![0.0f32; 16 * 3];
        values[0] = 0.5;
        values[15 * 3] = 0.5;
        let split = Tensor::from_slice(&values).view([1, 16, 3]);
        let (c, spread) = spread(&split, &one);
        assert_eq!(Vec::<f32>::try_from(c.view([-1])).unwrap(), [0.5, 0.5]);
        assert!((spread.double_value(&[0]) - 0.28125).abs() < 1e-6);
    }

    #[test]
    fn the_loss_is_zero_when_the_relation_holds_by_the_margin() {
        let (a, b) = (Tensor::from_slice(&[1.0f32, 0.0, 0.0]), Tensor::from_slice(&[0.0f32, 1.0, 0.0]));
        // Token 0 in row 0, token 1 in row 3 of the same column: 0.75 apart.
        let column = map_at(1, 13);
        let at = |m: &Tensor, s: &Tensor, o: &Tensor, r| relation_loss(&[m.shallow_clone()], s, o, r).double_value(&[]);
        assert_eq!(at(&column, &a, &b, Relation::Above), 0.0);
        assert_eq!(at(&column, &b, &a, Relation::Below), 0.0);
        // Side by side in one row, 0.5 apart: right of, not above.
        let row = map_at(4, 6);
        assert_eq!(at(&row, &b, &a, Relation::RightOf), 0.0);
        // Above: 0.25 short of the margin, and 0.5 across the axis.
        assert!((at(&row, &a, &b, Relation::Above) - 0.75).abs() < 1e-6);
        let loss = |s: &Tensor, o: &Tensor, r| relation_loss(&[map()], s, o, r).double_value(&[]);
        // Token 0 is top-left of token 1, 0.75 apart on both axes: apart
        // enough, but diagonal, so |d⊥| − d/2 = 0.375 remains.
        assert!((loss(&a, &b, Relation::Above) - 0.375).abs() < 1e-6);
        assert!((loss(&a, &b, Relation::LeftOf) - 0.375).abs() < 1e-6);
        // The wrong way round: 0.25 + 0.75 short of the margin, and 0.75 + 0.375 off the axis.
        assert!((loss(&a, &b, Relation::Below) - 2.125).abs() < 1e-6);
        assert!((loss(&b, &a, Relation::Above) - 2.125).abs() < 1e-6);
        assert!((loss(&a, &b, Relation::RightOf) - 2.125).abs() < 1e-6);
    }

    #[test]
    fn the_gradient_moves_the_subject_up() {
        // Attention from a learnable score per cell: descending g moves token
        // 0's mass (spread evenly, centroid 0.5) towards the top rows when it
        // must be above token 1 (all in row 1, centroid 0.375).
        let scores = Tensor::zeros([1, 16, 1], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let fixed = Tensor::zeros([1, 16, 1], (Kind::Float, tch::Device::Cpu));
        let row_one: Vec<f32> = (0..16).map(|p| if (4..8).contains(&p) { 0.25 } else { 0.0 }).collect();
        let object = Tensor::from_slice(&row_one).view([1, 16, 1]);
        let map = Tensor::cat(&[scores.softmax(1, Kind::Float), fixed, object], 2);
        let (s, o) = (Tensor::from_slice(&[1.0f32, 0.0, 0.0]), Tensor::from_slice(&[0.0f32, 0.0, 1.0]));
        let loss = relation_loss(&[map], &s, &o, Relation::Above);
        let grad = Tensor::run_backward(&[loss], &[&scores], false, false).remove(0).view([4, 4]);
        // The loss falls as the top row's scores rise and the bottom row's fall.
        assert!(grad.get(0).sum(Kind::Float).double_value(&[]) < 0.0);
        assert!(grad.get(3).sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn without_a_relation_single_things_are_kept_compact_and_apart() {
        let (a, b) = (Tensor::from_slice(&[1.0f32, 0.0, 0.0]), Tensor::from_slice(&[0.0f32, 1.0, 0.0]));
        let named = Tensor::stack(&[&a, &b], 0);
        // Far apart and each in one cell: nothing to do.
        assert_eq!(layout_loss(&[map()], &named, &[Some(1), Some(1)], None).double_value(&[]), 0.0);
        // In neighbouring cells (0.25 apart): exactly at the margin.
        assert!(layout_loss(&[map_at(5, 6)], &named, &[Some(1), Some(1)], None).double_value(&[]).abs() < 1e-6);
        // In the same cell: the whole margin.
        assert!((layout_loss(&[map_at(5, 5)], &named, &[Some(1), Some(1)], None).double_value(&[]) - MARGIN).abs() < 1e-6);
        // Token 0 split over two far cells: its spread counts when it is one object, not when a group.
        let mut values = vec![0.0f32; 16 * 3];
        values[0] = 0.5;
        values[15 * 3] = 0.5;
        values[5 * 3 + 1] = 1.0;
        let split = Tensor::from_slice(&values).view([1, 16, 3]);
        let one = layout_loss(&[split.shallow_clone()], &named.narrow(0, 0, 1), &[Some(1)], None).double_value(&[]);
        let group = layout_loss(&[split], &named.narrow(0, 0, 1), &[None], None).double_value(&[]);
        assert!((one - 0.28125 * COMPACT).abs() < 1e-6 && group == 0.0, "{one} {group}");
    }

    /// An 8×8 map over one token attending `cells` evenly.
    fn attending(cells: &[usize]) -> Tensor {
        let mut values = vec![0.0f32; 64];
        for &c in cells {
            values[c] = 1.0 / cells.len() as f32;
        }
        Tensor::from_slice(&values).view([1, 64, 1])
    }

    #[test]
    fn a_counted_group_is_kept_in_as_many_places_as_it_counts() {
        let token = Tensor::from_slice(&[1.0f32]).view([1, 1]);
        let loss = |cells: &[usize], n| layout_loss(&[attending(cells)], &token, &[Some(n)], None).double_value(&[]);
        // Three far-apart cells (corners and the bottom middle) counted as three: nothing to do.
        let three = [0, 7, 60];
        let (centres, shares, v) = clusters(&attending(&three), &token.get(0), 3);
        assert_eq!(v.double_value(&[0]), 0.0);
        let mut found: Vec<Vec<f32>> = (0..3).map(|i| Vec::<f32>::try_from(centres.get(0).get(i)).unwrap()).collect();
        found.sort_by(|a, b| a.partial_cmp(b).unwrap());
        assert_eq!(found, [vec![0.0625, 0.0625], vec![0.0625, 0.9375], vec![0.9375, 0.5625]]);
        assert!(Vec::<f32>::try_from(shares.view([-1])).unwrap().iter().all(|&a| (a - 1.0 / 3.0).abs() < 1e-6));
        assert_eq!(loss(&three, 3), 0.0);
        // A fourth place: one cluster spans two of them.
        assert!(loss(&[0, 7, 60, 63], 3) > 0.01);
        // Two places: the third cluster holds nothing.
        assert!((loss(&[9, 54], 3) - COUNTED / 6.0).abs() < 1e-6);
        // Two neighbouring cells counted as two: closer than the margin.
        assert!((loss(&[27, 28], 2) - COUNTED * (MARGIN - 0.125)).abs() < 1e-6);
        assert_eq!(loss(&[9, 54], 2), 0.0);
    }

    #[test]
    fn one_cluster_is_the_spread() {
        let token = Tensor::from_slice(&[1.0f32]).view([1, 1]);
        let map = attending(&[0, 9, 10, 44]);
        let (centre, shares, v) = clusters(&map, &token.get(0), 1);
        let (centroid, spread) = spread(&map, &token.get(0));
        assert!((v - spread).abs().max().double_value(&[]) < 1e-6);
        assert!((centre.view([1, 2]) - centroid).abs().max().double_value(&[]) < 1e-6);
        assert!((shares.double_value(&[0, 0]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn meeting_centres_have_a_finite_gradient() {
        let centres = Tensor::from_slice(&[0.5f32, 0.5, 0.5, 0.5]).view([1, 2, 2]).set_requires_grad(true);
        let apart = separation(&centres, MARGIN);
        assert!((apart.double_value(&[0]) - MARGIN).abs() < 1e-3);
        let grad = Tensor::run_backward(&[apart.sum(Kind::Float)], &[&centres], false, false).remove(0);
        assert!(grad.isfinite().all().int64_value(&[]) == 1);
    }
}

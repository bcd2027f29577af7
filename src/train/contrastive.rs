//! CLIP's symmetric InfoNCE loss (Radford et al. 2021, Fig. 3), with
//! several positives per row.
//!
//! Our captions describe a small closed world, so a batch often holds two
//! renders of the same description ("a red circle"); plain InfoNCE would push
//! each away from the other's caption, a contradiction the model can only
//! meet by ignoring what the captions say. Samples whose descriptions are
//! equal are positives of each other instead: each row's target is the
//! uniform distribution over its positives (its own pair included), and the
//! loss is the cross-entropy against it, in both directions.

use tch::{Kind, Tensor};

/// The `[B, B]` target distributions: row i spreads its mass uniformly over
/// the j with `same(i, j)` (always including i itself).
pub fn multi_positive_targets<T>(items: &[T], same: impl Fn(&T, &T) -> bool) -> Tensor {
    let b = items.len();
    let mut mass = vec![0f32; b * b];
    for i in 0..b {
        let positives: Vec<usize> = (0..b).filter(|&j| j == i || same(&items[i], &items[j])).collect();
        for &j in &positives {
            mass[i * b + j] = 1.0 / positives.len() as f32;
        }
    }
    Tensor::from_slice(&mass).view([b as i64, b as i64])
}

/// The two directions of the loss and their mean.
pub struct ContrastiveLoss {
    /// What is minimised: the mean of both directions.
    pub total: Tensor,
    pub image_to_text: f64,
    pub text_to_image: f64,
    /// The share of images whose highest-scoring caption is a positive.
    pub accuracy: f64,
}

/// Symmetric multi-positive InfoNCE of `logits` `[B, B]` (images × texts)
/// against `targets` from [`multi_positive_targets`], which is symmetric, so
/// the text-to-image direction reads its rows from the transposed logits.
pub fn contrastive_loss(logits: &Tensor, targets: &Tensor) -> ContrastiveLoss {
    let targets = targets.to_device(logits.device()).to_kind(Kind::Float);
    let logits = logits.to_kind(Kind::Float);
    let cross_entropy = |l: &Tensor| -(l.log_softmax(1, Kind::Float) * &targets).sum_dim_intlist([1i64].as_slice(), false, Kind::Float).mean(Kind::Float);
    let (i2t, t2i) = (cross_entropy(&logits), cross_entropy(&logits.tr()));
    let best = logits.argmax(1, true);
    let accuracy = targets.gather(1, &best, false).gt(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    ContrastiveLoss {
        image_to_text: i2t.double_value(&[]),
        text_to_image: t2i.double_value(&[]),
        total: (i2t + t2i) * 0.5,
        accuracy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_descriptions_share_their_mass() {
        let t = multi_positive_targets(&["a", "b", "a", "c"], |x, y| x == y);
        let want = Tensor::from_slice(&[
            0.5f32, 0.0, 0.5, 0.0, //
            0.0, 1.0, 0.0, 0.0, //
            0.5, 0.0, 0.5, 0.0, //
            0.0, 0.0, 0.0, 1.0,
        ])
        .view([4, 4]);
        assert!(t.equal(&want), "{t}");
        // All different: the identity, plain InfoNCE.
        assert!(multi_positive_targets(&[1, 2, 3], |x, y| x == y).equal(&Tensor::eye(3, (Kind::Float, tch::Device::Cpu))));
    }

    #[test]
    fn the_loss_of_a_hand_made_matrix() {
        // Images × texts; texts 0 and 1 describe the same thing.
        let logits = Tensor::from_slice(&[2.0f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0]).view([3, 3]);
        let targets = multi_positive_targets(&["x", "x", "y"], |a, b| a == b);
        let loss = contrastive_loss(&logits, &targets);
        let lse = |v: &[f64]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        // Image rows: 0 and 1 average −log p over texts {0, 1}, row 2 is plain.
        let row0 = lse(&[2.0, 0.0, 0.0]) - 0.5 * (2.0 + 0.0);
        let row1 = lse(&[1.0, 1.0, 0.0]) - 0.5 * (1.0 + 1.0);
        let row2 = lse(&[0.0, 0.0, 3.0]) - 3.0;
        let i2t = (row0 + row1 + row2) / 3.0;
        // Text rows are the columns.
        let col0 = lse(&[2.0, 1.0, 0.0]) - 0.5 * (2.0 + 1.0);
        let col1 = lse(&[0.0, 1.0, 0.0]) - 0.5 * (0.0 + 1.0);
        let col2 = lse(&[0.0, 0.0, 3.0]) - 3.0;
        let t2i = (col0 + col1 + col2) / 3.0;
        assert!((loss.image_to_text - i2t).abs() < 1e-5, "{} vs {i2t}", loss.image_to_text);
        assert!((loss.text_to_image - t2i).abs() < 1e-5, "{} vs {t2i}", loss.text_to_image);
        assert!((loss.total.double_value(&[]) - (i2t + t2i) / 2.0).abs() < 1e-5);
        // Row 1's best text (a tie at 0 and 1, argmax takes 0) is a positive: every image is right.
        assert_eq!(loss.accuracy, 1.0);
        // Swapping the two descriptions' captions makes the matrix wrong, and costlier.
        let wrong = contrastive_loss(&logits, &multi_positive_targets(&["x", "y", "y"], |a, b| a == b));
        assert!(wrong.total.double_value(&[]) > loss.total.double_value(&[]) && wrong.accuracy < 1.0);
    }
}

//! Sentence embeddings from token states: the attention-masked mean of the
//! last hidden state, which is exactly the sentence embedding of
//! sentence-transformers models such as all-MiniLM-L6-v2 (their `Pooling`
//! module with `pooling_mode_mean_tokens`; Reimers & Gurevych 2019).

use tch::{Kind, Tensor};

use crate::nn::error::{NnError, Result};

/// The mean of `hidden` `[B, L, D]` over the tokens where `mask` `[B, L]` is
/// non-zero: `[B, D]` in f32. A row without tokens pools to zeros (its count
/// is clamped, as sentence-transformers clamps it at 1e-9).
///
/// Why a mask: the padding positions still carry hidden states (BERT attends
/// from them), and a prompt's embedding must not depend on how much padding
/// the batch gave it.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (h, m) = (hidden.size(), mask.size());
    if h.len() != 3 || m.len() != 2 || h[..2] != m[..] {
        return Err(NnError::input("mask", format!("hidden {h:?} and mask {m:?}: expected [B, L, D] and [B, L]")));
    }
    let weights = mask.to_kind(Kind::Float).to_device(hidden.device()).unsqueeze(-1);
    let summed = (hidden.to_kind(Kind::Float) * &weights).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    let counts = weights.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).clamp_min(1e-9);
    Ok(summed / counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_left_out_of_the_mean() {
        // Two prompts of 2 and 3 tokens in 4 positions; the padding holds large values.
        let hidden = Tensor::from_slice(&[
            1.0f32, 2.0, 3.0, 4.0, 100.0, 100.0, 100.0, 100.0, //
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -50.0, 50.0,
        ])
        .view([2, 4, 2]);
        let mask = Tensor::from_slice(&[1i64, 1, 0, 0, 1, 1, 1, 0]).view([2, 4]);
        let pooled = mean_pool(&hidden, &mask).unwrap();
        let want = Tensor::from_slice(&[2.0f32, 3.0, 2.0, 3.0]).view([2, 2]);
        assert!(pooled.allclose(&want, 1e-6, 1e-6, false), "{pooled}");
        // No tokens at all: zeros, not NaN.
        let empty = mean_pool(&hidden, &Tensor::zeros([2, 4], (Kind::Int64, tch::Device::Cpu))).unwrap();
        assert_eq!(empty.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(mean_pool(&hidden, &mask.narrow(1, 0, 3)).is_err());
    }
}

//! Pieces the text encoders share: bias-optional linear layers and LayerNorm that
//! return errors instead of panicking, the additive attention mask, and a cheap
//! look at a checkpoint's tensor names.
//!
//! Why not `tch::nn::Linear` / `LayerNorm`: their `Module::forward` unwraps, and an
//! out-of-memory on the GPU must come back as an error the server can report
//! (TORCH-NOTES, "Behaviour"); `nn::LayerNorm` also hides its `eps`.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::nn::Init;
use tch::{Kind, Tensor};

use crate::nn::error::{NnError, Result};

/// transformers' `nn.Linear` initialisation does not matter here (weights are
/// always loaded); a small normal keeps an unloaded model finite.
const WEIGHT_INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

/// `y = x Wᵀ + b`, parameters `<path>.weight` [out, in] and optionally `<path>.bias`.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(p: tch::nn::Path<'_>, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let weight = p.var("weight", &[out_dim, in_dim], WEIGHT_INIT);
        let bias = bias.then(|| p.var("bias", &[out_dim], Init::Const(0.0)));
        Self { weight, bias }
    }

    /// One product per sample (see `crate::nn::layers::Linear` for why): a
    /// prompt's embedding must not depend on the prompts encoded with it.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut size = x.size();
        let (batch, in_dim) = (size[0], size[size.len() - 1]);
        let out_dim = self.weight.size()[0];
        let rows = x.f_reshape([batch, -1, in_dim])?;
        let weight = self.weight.f_tr()?.f_unsqueeze(0)?.f_expand([batch, in_dim, out_dim], false)?;
        let mut y = rows.f_bmm(&weight)?;
        if let Some(bias) = &self.bias {
            y = y.f_add(bias)?;
        }
        let last = size.len() - 1;
        size[last] = out_dim;
        Ok(y.f_reshape(size)?)
    }

    /// The weight's kind: T5 keeps `wo` in f32 under f16 and casts its input to match.
    pub(crate) fn kind(&self) -> Kind {
        self.weight.kind()
    }
}

/// `torch.nn.LayerNorm` over the last dimension, with weight and bias.
#[derive(Debug)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn new(p: tch::nn::Path<'_>, dim: i64, eps: f64) -> Self {
        Self { weight: p.var("weight", &[dim], Init::Const(1.0)), bias: p.var("bias", &[dim], Init::Const(0.0)), eps }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dim = self.weight.size();
        Ok(x.f_layer_norm(dim.as_slice(), Some(&self.weight), Some(&self.bias), self.eps, true)?)
    }
}

/// An embedding table `<path>.weight` [num, dim].
pub(crate) fn embedding(p: tch::nn::Path<'_>, num: i64, dim: i64) -> Tensor {
    p.var("weight", &[num, dim], Init::Randn { mean: 0.0, stdev: 1.0 })
}

/// The most negative finite value of `kind`: what transformers adds to the scores
/// of masked keys (`torch.finfo(dtype).min`), so that their softmax weight is zero
/// while a row with every key masked still gets a finite (uniform) softmax.
pub(crate) fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// The key mask [B, L] (1 = attend, 0 = padding) as an additive bias [B, 1, 1, L]
/// in `kind`: 0 where attended, `lowest(kind)` where masked.
pub(crate) fn additive_mask(attention_mask: &Tensor, kind: Kind) -> Result<Tensor> {
    let keep = attention_mask.f_to_kind(kind)?;
    let masked = keep.f_neg()?.f_add_scalar(1.0)?;
    Ok(masked.f_mul_scalar(lowest(kind))?.f_unsqueeze(1)?.f_unsqueeze(1)?)
}

/// Checks that `input_ids` and `attention_mask` are [B, L] integer tensors of the
/// same shape with B, L ≥ 1, and returns (B, L).
pub(crate) fn check_inputs(input_ids: &Tensor, attention_mask: &Tensor) -> Result<(i64, i64)> {
    let size = input_ids.size();
    let &[b, l] = size.as_slice() else {
        return Err(NnError::input("input_ids", format!("expected [batch, length], got {size:?}")));
    };
    if b < 1 || l < 1 {
        return Err(NnError::input("input_ids", format!("empty batch or sequence: {size:?}")));
    }
    if !matches!(input_ids.kind(), Kind::Int64 | Kind::Int) {
        return Err(NnError::input("input_ids", format!("expected integer ids, got {:?}", input_ids.kind())));
    }
    if attention_mask.size() != size {
        return Err(NnError::input(
            "attention_mask",
            format!("shape {:?} differs from input_ids {size:?}", attention_mask.size()),
        ));
    }
    Ok((b, l))
}

/// The tensor names stored in `files`, read from the safetensors headers only
/// (8-byte little-endian length, then a JSON object keyed by tensor name).
/// Models whose variable names depend on the checkpoint (T5's tied embedding)
/// decide with this before building their `VarStore`.
pub(crate) fn checkpoint_names(files: &[PathBuf]) -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for file in files {
        names.extend(header_names(file)?);
    }
    Ok(names)
}

/// safetensors itself refuses headers above 100 MB.
const MAX_HEADER: u64 = 100_000_000;

fn header_names(file: &Path) -> Result<Vec<String>> {
    let bad = |reason: String| NnError::Safetensors { file: file.display().to_string(), reason };
    let mut handle = std::fs::File::open(file).map_err(|e| NnError::io(file, e))?;
    let mut len = [0u8; 8];
    handle.read_exact(&mut len).map_err(|e| NnError::io(file, e))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(bad(format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    handle.read_exact(&mut header).map_err(|e| NnError::io(file, e))?;
    let parsed: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    let map = parsed.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    Ok(map.keys().filter(|k| *k != "__metadata__").cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn additive_mask_is_zero_where_attended_and_lowest_where_masked() {
        let mask = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
        let add = additive_mask(&mask, Kind::Half).unwrap();
        assert_eq!(add.size(), [1, 1, 1, 3]);
        let values: Vec<f32> = add.to_kind(Kind::Float).flatten(0, -1).try_into().unwrap();
        assert_eq!(values, [0.0, 0.0, -65504.0]);
        // The bf16 constant is representable exactly (finfo(bfloat16).min).
        let bf = Tensor::from_slice(&[lowest(Kind::BFloat16)]).to_kind(Kind::BFloat16).double_value(&[0]);
        assert_eq!(bf, lowest(Kind::BFloat16));
    }

    #[test]
    fn inputs_are_checked() {
        let ids = Tensor::zeros([2, 4], (Kind::Int64, tch::Device::Cpu));
        assert_eq!(check_inputs(&ids, &ids).unwrap(), (2, 4));
        let msg = check_inputs(&ids, &ids.view([8])).unwrap_err().to_string();
        assert!(msg.contains("attention_mask"), "{msg}");
        let msg = check_inputs(&ids.to_kind(Kind::Float), &ids).unwrap_err().to_string();
        assert!(msg.contains("input_ids"), "{msg}");
    }
}

//! What is done to the predicted x̂_0 before the sampler uses it.
//!
//! Static clipping to [−r, r] (DDPM's reference sampler) and Imagen's dynamic
//! thresholding (Saharia et al. 2022, §2.3): s = the p-th percentile of |x̂_0| per
//! sample, clamped to [1, max]; x̂_0 ← clamp(x̂_0, −s, s) / s. Dynamic thresholding
//! keeps large guidance scales from saturating pixels. Matches diffusers'
//! `_threshold_sample` (which upcasts half precision for the quantile).

use tch::{Kind, Tensor};

use super::error::{DiffusionError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum X0Treatment {
    None,
    Clip { range: f64 },
    Dynamic { ratio: f64, max: f64 },
}

impl X0Treatment {
    /// From diffusers' flags: `thresholding` wins over `clip_sample`, as there.
    pub fn new(thresholding: bool, ratio: f64, max: f64, clip: bool, range: f64) -> Result<Self> {
        if thresholding {
            if !(ratio > 0.0 && ratio <= 1.0) {
                return Err(DiffusionError::invalid("dynamic_thresholding_ratio", format!("must be in (0, 1], got {ratio}")));
            }
            if max.is_nan() || max < 1.0 {
                return Err(DiffusionError::invalid("sample_max_value", format!("must be at least 1, got {max}")));
            }
            Ok(Self::Dynamic { ratio, max })
        } else if clip {
            if range.is_nan() || range <= 0.0 {
                return Err(DiffusionError::invalid("clip_sample_range", format!("must be positive, got {range}")));
            }
            Ok(Self::Clip { range })
        } else {
            Ok(Self::None)
        }
    }

    pub fn apply(&self, x0: &Tensor) -> Tensor {
        match *self {
            Self::None => x0.shallow_clone(),
            Self::Clip { range } => x0.clamp(-range, range),
            Self::Dynamic { ratio, max } => dynamic_threshold(x0, ratio, max),
        }
    }
}

fn dynamic_threshold(x0: &Tensor, ratio: f64, max: f64) -> Tensor {
    let kind = x0.kind();
    let shape = x0.size();
    let flat = x0.to_kind(Kind::Float).reshape([shape[0], -1]);
    let s = flat.abs().quantile_scalar(ratio, 1, false, "linear").clamp(1.0, max).unsqueeze(1);
    let out = flat.clamp_tensor(Some(&(-&s)), Some(&s)) / s;
    out.reshape(shape.as_slice()).to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn dynamic_threshold_is_per_sample() {
        // Sample 0 stays inside [-1, 1]: untouched. Sample 1 is scaled by its own percentile.
        let a = Tensor::from_slice(&[0.5f32, -0.25, 0.1, 0.9]);
        let b = Tensor::from_slice(&[4.0f32, -2.0, 1.0, 3.0]);
        let x = Tensor::stack(&[a.shallow_clone(), b], 0);
        let y = X0Treatment::Dynamic { ratio: 0.5, max: 10.0 }.apply(&x);
        assert!(y.get(0).equal(&a));
        // median of |b| = 2.5 (linear interpolation): clamp to ±2.5 then divide.
        let want = Tensor::from_slice(&[1.0f32, -0.8, 0.4, 1.0]);
        assert!(y.get(1).allclose(&want, 1e-6, 1e-6, false));
    }

    #[test]
    fn threshold_never_exceeds_max_and_clip_clips() {
        let x = Tensor::randn([4, 3, 8, 8], (Kind::Float, Device::Cpu)) * 10.0;
        let y = X0Treatment::Dynamic { ratio: 0.995, max: 1.5 }.apply(&x);
        assert!(y.abs().max().double_value(&[]) <= 1.0 + 1e-6);
        let c = X0Treatment::Clip { range: 2.0 }.apply(&x);
        assert!(c.abs().max().double_value(&[]) <= 2.0);
    }

    #[test]
    fn bad_settings_name_the_field() {
        let e = X0Treatment::new(true, 1.5, 1.0, false, 1.0).unwrap_err();
        assert!(e.to_string().contains("dynamic_thresholding_ratio"));
        let e = X0Treatment::new(true, 0.9, 0.5, false, 1.0).unwrap_err();
        assert!(e.to_string().contains("sample_max_value"));
        assert_eq!(X0Treatment::new(true, 0.9, 1.5, true, 1.0).unwrap(), X0Treatment::Dynamic { ratio: 0.9, max: 1.5 });
    }
}

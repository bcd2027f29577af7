//! Small pieces shared by the networks: activations by their config names, and a
//! linear layer whose result for one sample does not depend on the batch.
//!
//! Activation names follow diffusers' `get_activation` and transformers'
//! `ACT2FN`, so a config's `act_fn` / `hidden_act` / `dense_act_fn` maps one to one.

use tch::{nn, Tensor};

/// A linear layer (`weight` [out, in], `bias` [out], as in PyTorch) computed as
/// one matrix product per sample.
///
/// Why: a plain linear folds the batch into the rows of one GEMM, and BLAS picks
/// its kernel (and so its summation order) by the row count, so a sample's
/// result changes in the last bits with the batch around it. Batched products
/// of a fixed per-sample shape give the same bits for every batch of two or
/// more samples (measured over 120 shapes on the CPU), at the same speed; the
/// pipeline never runs the UNet on a single row. An image is then bit-identical
/// whether generated alone or batched with other requests.
#[derive(Debug)]
pub struct Linear {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
}

impl Linear {
    /// Creates `weight` and `bias` under `p` with PyTorch's default initialisation.
    pub fn new(p: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        let plain = nn::linear(p, in_dim, out_dim, Default::default());
        Self { ws: plain.ws, bs: plain.bs }
    }

    /// `[B, …, in] -> [B, …, out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut size = x.size();
        let (batch, in_dim) = (size[0], size[size.len() - 1]);
        let out_dim = self.ws.size()[0];
        let rows = if size.len() == 1 { x.reshape([1, 1, in_dim]) } else { x.reshape([batch, -1, in_dim]) };
        let weight = self.ws.tr().unsqueeze(0).expand([rows.size()[0], in_dim, out_dim], false);
        let mut y = rows.bmm(&weight);
        if let Some(bs) = &self.bs {
            y += bs;
        }
        let last = size.len() - 1;
        size[last] = out_dim;
        y.reshape(size)
    }
}

/// An element-wise activation as named in diffusers and transformers configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// The exact, erf-based GELU (`nn.GELU()`, transformers' `"gelu"`).
    Gelu,
    /// The tanh approximation (transformers' `"gelu_new"`, `"gelu_pytorch_tanh"`; T5 v1.1).
    GeluTanh,
    Mish,
    Relu,
}

impl Activation {
    /// Parses a config name; `None` for names we do not implement.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "mish" => Self::Mish,
            "relu" => Self::Relu,
            _ => return None,
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::Mish => x.mish(),
            Self::Relu => x.relu(),
        }
    }
}

/// `x.apply_linear(&layer)`, reading like tch's `x.apply(&module)`.
pub trait ApplyLinear {
    fn apply_linear(&self, layer: &Linear) -> Tensor;
}

impl ApplyLinear for Tensor {
    fn apply_linear(&self, layer: &Linear) -> Tensor {
        layer.forward(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_pytorch_and_ignores_the_batch() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let ours = Linear::new(vs.root() / "a", 384, 256);
        let x = Tensor::randn([5, 7, 384], (tch::Kind::Float, tch::Device::Cpu));
        let want = x.linear(&ours.ws, ours.bs.as_ref());
        let got = ours.forward(&x);
        assert!((&got - want).abs().max().double_value(&[]) < 1e-5);
        for n in [2, 3, 4] {
            let part = ours.forward(&x.narrow(0, 0, n)).get(1);
            assert!(part.equal(&got.get(1)), "batch {n} changed sample 1");
        }
        assert_eq!(ours.forward(&Tensor::ones([3, 384], (tch::Kind::Float, tch::Device::Cpu))).size(), [3, 256]);
    }

    #[test]
    fn names_map_to_the_right_functions() {
        let x = Tensor::from_slice(&[-1.0f32, 0.5, 2.0]);
        let exact = Activation::from_name("gelu").unwrap().forward(&x);
        let approx = Activation::from_name("gelu_new").unwrap().forward(&x);
        // gelu(-1) = -0.158655 exactly; the tanh form gives -0.158808.
        assert!((exact.double_value(&[0]) + 0.158_655).abs() < 1e-6);
        assert!((approx.double_value(&[0]) + 0.158_808).abs() < 1e-6);
        assert_eq!(Activation::from_name("swish"), Some(Activation::Silu));
        assert_eq!(Activation::from_name("quick_gelu"), None);
    }
}

//! Small pieces shared by the networks: activations by their config names.
//!
//! Names follow diffusers' `get_activation` and transformers' `ACT2FN`, so a
//! config's `act_fn` / `hidden_act` / `dense_act_fn` string maps one to one.

use tch::Tensor;

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

#[cfg(test)]
mod tests {
    use super::*;

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

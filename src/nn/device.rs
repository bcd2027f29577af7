//! Where models run and in which precision.
//!
//! Models are always built and loaded on the CPU in f32, then moved: this keeps
//! loading independent of the accelerator and lets one checkpoint (stored in
//! f16, f32 or bf16) serve every target. On CPU we compute in f32 (libtorch's
//! half-precision CPU kernels are slow and some are missing); on CUDA the
//! default is f16, as DeepFloyd IF and diffusers' pipelines run it.

use std::fmt;
use std::str::FromStr;

use tch::{Device, Kind};

/// The `--device` setting: `auto` picks CUDA when libtorch sees a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSetting {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceSetting {
    pub fn resolve(self) -> Device {
        match self {
            DeviceSetting::Auto => Device::cuda_if_available(),
            DeviceSetting::Cpu => Device::Cpu,
            DeviceSetting::Cuda(i) => Device::Cuda(i),
        }
    }
}

impl FromStr for DeviceSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)")),
        }
    }
}

impl fmt::Display for DeviceSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The `--precision` setting for model weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 on CPU, f16 on CUDA.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn kind_for(self, device: Device) -> Kind {
        match (self, device) {
            (Precision::Auto, Device::Cpu) => Kind::Float,
            (Precision::Auto, _) => Kind::Half,
            (Precision::F32, _) => Kind::Float,
            (Precision::F16, _) => Kind::Half,
            (Precision::Bf16, _) => Kind::BFloat16,
        }
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!("unknown precision `{s}` (expected auto, f32, f16 or bf16)")),
        }
    }
}

/// Moves every variable of `vs` to `device` and casts floating-point ones to `kind`.
/// (`vs.kind()` keeps reporting the kind the store was created with: ask a
/// variable for its kind.)
pub fn place(vs: &mut tch::nn::VarStore, device: Device, kind: Kind) {
    vs.set_device(device);
    match kind {
        Kind::Half => vs.half(),
        Kind::BFloat16 => vs.bfloat16(),
        _ => vs.float(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_precisions() {
        assert_eq!("cuda:1".parse::<DeviceSetting>().unwrap(), DeviceSetting::Cuda(1));
        assert_eq!("cpu".parse::<DeviceSetting>().unwrap().resolve(), Device::Cpu);
        assert!("gpu".parse::<DeviceSetting>().unwrap_err().contains("gpu"));
        assert_eq!(Precision::Auto.kind_for(Device::Cpu), Kind::Float);
        assert_eq!(Precision::Auto.kind_for(Device::Cuda(0)), Kind::Half);
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    }
}

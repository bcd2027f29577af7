//! `scheduler_config.json` exactly as diffusers writes it, and its resolution into
//! concrete settings for one of our samplers.
//!
//! diffusers' `Scheduler.from_config` semantics: keys present in the file win; keys
//! absent take the defaults of the *target* scheduler class. A DDPM-trained stage
//! can thus be sampled with DDIM or DPM-Solver++ from the same file, as diffusers
//! users do with `DDIMScheduler.from_config(pipe.scheduler.config)`.
//!
//! Options diffusers has but we do not implement are accepted only at their neutral
//! value; anything else is an error naming the field, never silently ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::dpm_solver::SolverType;
use super::error::{DiffusionError, Result};
use super::forward::PredictionType;
use super::sampler::SamplerKind;
use super::schedule::BetaSchedule;
use super::spacing::TimestepSpacing;
use super::threshold::X0Treatment;
use super::variance::VarianceType;

/// The raw file: every field optional, unknown keys collected for validation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    #[serde(rename = "_diffusers_version", skip_serializing_if = "Option::is_none")]
    pub diffusers_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_train_timesteps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_schedule: Option<BetaSchedule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rescale_betas_zero_snr: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variance_type: Option<VarianceType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_sample_range: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thresholding: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_thresholding_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_max_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<TimestepSpacing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps_offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_alpha_to_one: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver_type: Option<SolverType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
    /// Everything else; checked against [`NEUTRAL_OPTIONS`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Options of diffusers' DDPM/DDIM/DPM-Solver classes that we accept only at the
/// value that makes them a no-op.
const NEUTRAL_OPTIONS: &[(&str, &str)] = &[
    ("algorithm_type", "\"dpmsolver++\""),
    ("use_karras_sigmas", "false"),
    ("use_exponential_sigmas", "false"),
    ("use_beta_sigmas", "false"),
    ("use_lu_lambdas", "false"),
    ("use_flow_sigmas", "false"),
    ("euler_at_final", "false"),
    ("final_sigmas_type", "\"zero\""),
    ("lambda_min_clipped", "\"-inf\""),
    ("timestep_type", "\"discrete\""),
];

/// Karlo's scheduler class (DALL-E 2's unCLIP in diffusers), read as DDPM.
const UNCLIP_CLASS: &str = "UnCLIPScheduler";

/// Options whose value does not change what we compute (bookkeeping keys).
const IGNORED_OPTIONS: &[&str] = &["flow_shift", "skip_prk_steps", "_use_default_values"];

impl SchedulerConfig {
    /// Parses a diffusers scheduler config. diffusers writes `-inf` as the bare
    /// token `-Infinity`, which is not JSON; it is read as the string "-inf".
    pub fn from_json_str(text: &str) -> Result<Self> {
        let text = text.replace("-Infinity", "\"-inf\"").replace("Infinity", "\"inf\"").replace("NaN", "\"nan\"");
        let mut config: Self = serde_json::from_str(&text)?;
        config.check_other_fields()?;
        if config.class_name.as_deref() == Some(UNCLIP_CLASS) {
            config.as_ddpm_of_unclip()?;
        }
        Ok(config)
    }

    /// Rewrites an `UnCLIPScheduler` file (Karlo's prior, decoder and
    /// super-resolution stages) as the `DDPMScheduler` file that computes the
    /// same steps, filling its absent keys with UnCLIP's defaults.
    ///
    /// UnCLIP's timesteps, round(i·(T−1)/(S−1)), are DDPM's `linspace`
    /// spacing (equal for every S ≤ T ≤ 1000, checked with numpy); its step
    /// recomputes β from ᾱ of the two timesteps as DDPM's does, and its two
    /// variance types are DDPM's `fixed_small_log` and `learned_range`
    /// (diffusers itself marks the class as superseded by DDPM). What differs
    /// is float32 arithmetic, which [`ResolvedConfig::unclip_arithmetic`] keeps.
    fn as_ddpm_of_unclip(&mut self) -> Result<()> {
        if let Some(other) = self.beta_schedule.filter(|&b| b != BetaSchedule::SquaredCosCapV2) {
            let name = serde_json::to_string(&other).unwrap_or_default();
            return Err(DiffusionError::unsupported("beta_schedule", format!("UnCLIPScheduler has only squaredcos_cap_v2, got {name}")));
        }
        if let Some(other) = self.variance_type.filter(|v| !matches!(v, VarianceType::FixedSmallLog | VarianceType::LearnedRange)) {
            return Err(DiffusionError::unsupported("variance_type", format!("UnCLIPScheduler has fixed_small_log and learned_range, got {}", serde_json::to_string(&other).unwrap_or_default())));
        }
        if self.prediction_type == Some(PredictionType::VPrediction) {
            return Err(DiffusionError::unsupported("prediction_type", "UnCLIPScheduler predicts epsilon or sample"));
        }
        self.beta_schedule = Some(BetaSchedule::SquaredCosCapV2);
        self.variance_type.get_or_insert(VarianceType::FixedSmallLog);
        self.timestep_spacing = Some(TimestepSpacing::Linspace);
        self.steps_offset = Some(0);
        self.thresholding = Some(false);
        Ok(())
    }

    pub fn from_file(path: &Path) -> std::io::Result<Result<Self>> {
        Ok(Self::from_json_str(&std::fs::read_to_string(path)?))
    }

    fn check_other_fields(&self) -> Result<()> {
        for (key, value) in &self.other {
            if IGNORED_OPTIONS.contains(&key.as_str()) {
                continue;
            }
            match NEUTRAL_OPTIONS.iter().find(|(k, _)| k == key) {
                None => return Err(DiffusionError::UnknownField { field: key.clone() }),
                Some((_, neutral)) => {
                    let neutral: Value = serde_json::from_str(neutral).expect("neutral values are valid JSON");
                    if *value != neutral {
                        return Err(DiffusionError::unsupported(key, format!("only {neutral} is supported, got {value}")));
                    }
                }
            }
        }
        Ok(())
    }

    /// The sampler kind this file was written for, from `_class_name`.
    pub fn native_kind(&self) -> Option<SamplerKind> {
        match self.class_name.as_deref()? {
            "DDPMScheduler" | UNCLIP_CLASS => Some(SamplerKind::Ddpm),
            "DDIMScheduler" => Some(SamplerKind::Ddim),
            "DPMSolverMultistepScheduler" => Some(SamplerKind::DpmSolverPlusPlus),
            _ => None,
        }
    }

    /// Fills absent keys with the defaults of `kind`'s diffusers class and checks ranges.
    pub fn resolve(&self, kind: SamplerKind) -> Result<ResolvedConfig> {
        let dpm = kind == SamplerKind::DpmSolverPlusPlus;
        let n = self.num_train_timesteps.unwrap_or(1000);
        if n < 2 {
            return Err(DiffusionError::invalid("num_train_timesteps", format!("must be at least 2, got {n}")));
        }
        let thresholding = self.thresholding.unwrap_or(false);
        // diffusers' DPM-Solver has no clip_sample at all; DDPM and DDIM default it on.
        let clip = if dpm { false } else { self.clip_sample.unwrap_or(true) };
        let x0 = X0Treatment::new(
            thresholding,
            self.dynamic_thresholding_ratio.unwrap_or(0.995),
            self.sample_max_value.unwrap_or(1.0),
            clip,
            self.clip_sample_range.unwrap_or(1.0),
        )?;
        let solver_order = self.solver_order.unwrap_or(2);
        if dpm && !(1..=2).contains(&solver_order) {
            return Err(DiffusionError::unsupported("solver_order", format!("1 or 2 are supported, got {solver_order}")));
        }
        let default_variance = if kind == SamplerKind::Ddpm { Some(VarianceType::FixedSmall) } else { None };
        Ok(ResolvedConfig {
            num_train_timesteps: n,
            beta_start: self.beta_start.unwrap_or(0.0001),
            beta_end: self.beta_end.unwrap_or(0.02),
            beta_schedule: self.beta_schedule.unwrap_or(BetaSchedule::Linear),
            trained_betas: self.trained_betas.clone(),
            rescale_betas_zero_snr: self.rescale_betas_zero_snr.unwrap_or(false),
            variance_type: self.variance_type.or(default_variance),
            prediction_type: self.prediction_type.unwrap_or(PredictionType::Epsilon),
            x0,
            timestep_spacing: self
                .timestep_spacing
                .unwrap_or(if dpm { TimestepSpacing::Linspace } else { TimestepSpacing::Leading }),
            steps_offset: self.steps_offset.unwrap_or(0),
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(true),
            solver_order,
            solver_type: self.solver_type.unwrap_or(SolverType::Midpoint),
            lower_order_final: self.lower_order_final.unwrap_or(true),
            unclip_arithmetic: kind == SamplerKind::Ddpm && self.class_name.as_deref() == Some(UNCLIP_CLASS),
        })
    }
}

/// Concrete settings for one sampler kind; see [`SchedulerConfig::resolve`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
    /// DDPM's variance; `learned_range` also tells DDIM and DPM-Solver that the
    /// model's second half of channels is a variance to drop.
    pub variance_type: Option<VarianceType>,
    pub prediction_type: PredictionType,
    pub x0: X0Treatment,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub set_alpha_to_one: bool,
    pub solver_order: usize,
    pub solver_type: SolverType,
    /// Read for compatibility; with the final step always first order (σ = 0),
    /// it changes nothing for orders 1 and 2.
    pub lower_order_final: bool,
    /// DDPM steps with `UnCLIPScheduler`'s float32 arithmetic: α = 1 − β
    /// rather than ᾱ_t/ᾱ_prev (they part in the 4th digit where β is near 1,
    /// the first steps of a cosine schedule), and the precomputed β_t for a
    /// step to t − 1 (the last one).
    pub unclip_arithmetic: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_deepfloyd_if_style_config() {
        let text = r#"{"_class_name": "DDPMScheduler", "_diffusers_version": "0.16.0",
            "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001,
            "clip_sample": true, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.95,
            "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.5,
            "steps_offset": 0, "thresholding": true, "timestep_spacing": "leading",
            "trained_betas": null, "variance_type": "learned_range"}"#;
        let config = SchedulerConfig::from_json_str(text).unwrap();
        assert_eq!(config.native_kind(), Some(SamplerKind::Ddpm));
        let r = config.resolve(SamplerKind::Ddpm).unwrap();
        assert_eq!(r.variance_type, Some(VarianceType::LearnedRange));
        assert_eq!(r.x0, X0Treatment::Dynamic { ratio: 0.95, max: 1.5 });
        // The same file drives DPM-Solver++, which never clips.
        let d = config.resolve(SamplerKind::DpmSolverPlusPlus).unwrap();
        assert_eq!(d.x0, X0Treatment::Dynamic { ratio: 0.95, max: 1.5 });
        assert_eq!(d.timestep_spacing, TimestepSpacing::Leading);
    }

    #[test]
    fn reads_dpm_solver_config_with_infinity() {
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
            "lambda_min_clipped": -Infinity, "use_karras_sigmas": false, "final_sigmas_type": "zero"}"#;
        let r = SchedulerConfig::from_json_str(text).unwrap().resolve(SamplerKind::DpmSolverPlusPlus).unwrap();
        assert_eq!(r.timestep_spacing, TimestepSpacing::Linspace);
        assert_eq!(r.x0, X0Treatment::None);
    }

    #[test]
    fn unsupported_and_unknown_options_name_the_field() {
        let err = SchedulerConfig::from_json_str(r#"{"use_karras_sigmas": true}"#).unwrap_err();
        assert!(err.to_string().contains("`use_karras_sigmas`"), "{err}");
        let err = SchedulerConfig::from_json_str(r#"{"frobnicate": 1}"#).unwrap_err();
        assert!(matches!(err, DiffusionError::UnknownField { ref field } if field == "frobnicate"));
        let err = SchedulerConfig::from_json_str(r#"{"beta_schedule": "warmup10"}"#).unwrap_err();
        assert!(err.to_string().contains("warmup10"), "{err}");
        let err = SchedulerConfig::from_json_str(r#"{"solver_order": 3}"#)
            .unwrap()
            .resolve(SamplerKind::DpmSolverPlusPlus)
            .unwrap_err();
        assert!(err.to_string().contains("`solver_order`"), "{err}");
    }

    #[test]
    fn reads_unclip_configs_as_the_ddpm_they_equal() {
        // Karlo's prior: x_0 prediction clipped to ±5, UnCLIP's defaults elsewhere.
        let text = r#"{"_class_name": "UnCLIPScheduler", "_diffusers_version": "0.12.0",
            "clip_sample": true, "clip_sample_range": 5.0, "num_train_timesteps": 1000,
            "prediction_type": "sample", "variance_type": "fixed_small_log"}"#;
        let config = SchedulerConfig::from_json_str(text).unwrap();
        assert_eq!(config.native_kind(), Some(SamplerKind::Ddpm));
        let r = config.resolve(SamplerKind::Ddpm).unwrap();
        assert_eq!(r.beta_schedule, BetaSchedule::SquaredCosCapV2);
        assert_eq!(r.timestep_spacing, TimestepSpacing::Linspace);
        assert_eq!(r.prediction_type, PredictionType::Sample);
        assert_eq!(r.x0, X0Treatment::Clip { range: 5.0 });
        assert!(r.unclip_arithmetic && !config.resolve(SamplerKind::Ddim).unwrap().unclip_arithmetic);
        let bare = SchedulerConfig::from_json_str(r#"{"_class_name": "UnCLIPScheduler"}"#).unwrap();
        assert_eq!(bare.resolve(SamplerKind::Ddpm).unwrap().variance_type, Some(VarianceType::FixedSmallLog));
        for bad in [r#""beta_schedule": "linear""#, r#""variance_type": "fixed_large""#, r#""prediction_type": "v_prediction""#] {
            let text = format!(r#"{{"_class_name": "UnCLIPScheduler", {bad}}}"#);
            let field = bad.split('"').nth(1).unwrap();
            let err = SchedulerConfig::from_json_str(&text).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn defaults_follow_the_target_class() {
        let c = SchedulerConfig::default();
        assert_eq!(c.resolve(SamplerKind::Ddim).unwrap().x0, X0Treatment::Clip { range: 1.0 });
        assert_eq!(c.resolve(SamplerKind::Ddpm).unwrap().variance_type, Some(VarianceType::FixedSmall));
        assert_eq!(c.resolve(SamplerKind::Ddim).unwrap().variance_type, None);
    }
}

//! The mathematics of diffusion that every model, sampler and stage shares.
//!
//! - [`schedule`]: β schedules and ᾱ, β̃, posterior coefficients, SNR.
//! - [`forward`]: q(x_t | x_0) in closed form; ε / x_0 / v conversions.
//! - [`spacing`]: which timesteps an S-step sampler visits.
//! - [`sampler`]: the [`Sampler`] trait and the per-stage [`Scheduler`]; one file
//!   per sampler: [`ddpm`], [`ddim`], [`dpm_solver`].
//! - [`variance`]: fixed and learned reverse-step variances.
//! - [`guidance`]: classifier-free and classifier guidance.
//! - [`threshold`]: static clipping and dynamic thresholding of x̂_0.
//! - [`noise`]: per-image seeded noise (batching never changes an image).
//! - [`inversion`]: DDIM inversion and spherical interpolation.
//!
//! Parity: schedules, timestep lists and sampler trajectories match Hugging Face
//! diffusers (see `scripts/gen_fixtures.py` and `tests/diffusion_parity.rs`).

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
mod error;
pub mod forward;
pub mod guidance;
pub mod inversion;
pub mod noise;
pub mod sampler;
pub mod schedule;
pub mod spacing;
pub mod threshold;
pub mod variance;

pub use config::{ResolvedConfig, SchedulerConfig};
pub use error::{DiffusionError, Result};
pub use forward::PredictionType;
pub use noise::{BatchNoise, NoiseSource, ReplayNoise, SeededNoise};
pub use sampler::{Sampler, SamplerKind, SamplerOptions, Scheduler, StepOutput};
pub use schedule::{BetaSchedule, NoiseSchedule};
pub use spacing::TimestepSpacing;
pub use threshold::X0Treatment;
pub use variance::VarianceType;

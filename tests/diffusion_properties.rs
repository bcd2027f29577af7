//! Properties of the diffusion core that examples alone would not show.
mod common;

use common::{dummy_model, final_samples, if_like_scheduler};
use diffusiond::diffusion::forward::{q_sample, PredictionType};
use diffusiond::diffusion::inversion::ddim_invert;
use diffusiond::diffusion::{BatchNoise, SamplerKind, SamplerOptions, Scheduler, SchedulerConfig};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

fn scheduler(json: &str) -> Scheduler {
    Scheduler::new(SchedulerConfig::from_json_str(json).unwrap()).unwrap()
}

fn cosine() -> Scheduler {
    scheduler(r#"{"beta_schedule": "squaredcos_cap_v2", "clip_sample": false}"#)
}

fn image(seed: i64, batch: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::rand([batch, 3, 8, 8], (Kind::Float, Device::Cpu)) * 1.6 - 0.8
}

/// The exact ε for data ~ N(0, σ_d² I): E[ε | x_t] = √(1−ᾱ)·x_t / (ᾱσ_d² + 1 − ᾱ).
/// With it the DDIM ODE is well-posed, so its discretisation error is all we see.
fn gaussian_eps(x: &Tensor, alpha_bar: f64, sigma_d: f64) -> Tensor {
    x * ((1.0 - alpha_bar).sqrt() / (alpha_bar * sigma_d * sigma_d + 1.0 - alpha_bar))
}

/// Sampling the DDIM-inverted latent with DDIM (η = 0) on the same timesteps
/// returns the image; the error shrinks as the steps get finer (an ODE's Euler
/// discretisation, DDIM §4.3).
#[test]
fn ddim_inversion_then_sampling_round_trips() {
    let s = scheduler(r#"{"beta_schedule": "linear", "clip_sample": false}"#);
    let sched = s.schedule().clone();
    let x0 = image(5, 2) * 0.5;
    let mut model = |x: &Tensor, t: i64| Ok(gaussian_eps(x, sched.alpha_bar(t) as f64, 0.5));
    let mut errors = vec![];
    for steps in [10, 50, 250] {
        let options = SamplerOptions::new(SamplerKind::Ddim, steps);
        let timesteps = s.timesteps(&options).unwrap();
        let latent = ddim_invert(&sched, &timesteps, PredictionType::Epsilon, 1.0, &x0, &mut model).unwrap();
        let moved = (&latent - &x0).abs().max().double_value(&[]);
        assert!(moved > 0.3, "inversion left the image in place ({moved})");
        let mut sampler = s.sampler(&options).unwrap();
        let mut x = latent;
        while let Some(t) = sampler.current_timestep() {
            let out = model(&x, t).unwrap();
            x = sampler.step(&out, &x, &mut BatchNoise::seeded(&[0, 1])).unwrap().prev_sample;
        }
        errors.push((&x - &x0).abs().max().double_value(&[]));
    }
    println!("round-trip max error at 10/50/250 steps: {errors:?}");
    assert!(errors[0] > errors[1] && errors[1] > errors[2], "error must shrink with steps: {errors:?}");
    assert!(errors[2] < 1e-2, "250-step round trip error {errors:?}");
}

/// DDIM with η = 1 is DDPM with σ² = β̃ (DDIM eq. 16): same inputs and noise,
/// the same step.
#[test]
fn ddim_eta_one_equals_ddpm_fixed_small() {
    let s = scheduler(r#"{"beta_schedule": "linear", "clip_sample": false, "variance_type": "fixed_small"}"#);
    for steps in [10, 100] {
        let mut ddpm = s.sampler(&SamplerOptions::new(SamplerKind::Ddpm, steps)).unwrap();
        let mut ddim = s.sampler(&SamplerOptions { eta: 1.0, ..SamplerOptions::new(SamplerKind::Ddim, steps) }).unwrap();
        let x = image(1, 2) * 2.0;
        let cond = Tensor::from_slice(&[0.5f32, -1.0]);
        while let Some(t) = ddpm.current_timestep() {
            let out = dummy_model(&x, t, &cond, false);
            let a = ddpm.step(&out, &x, &mut BatchNoise::seeded(&[t as u64, 7])).unwrap().prev_sample;
            let b = ddim.step(&out, &x, &mut BatchNoise::seeded(&[t as u64, 7])).unwrap().prev_sample;
            let err = (&a - &b).abs().max().double_value(&[]);
            assert!(err < 1e-4, "steps {steps}, t {t}: {err}");
        }
    }
}

/// An image is bit-identical whether sampled alone or batched with others, for
/// every sampler, with per-sample guidance scales and learned variance.
#[test]
fn batching_never_changes_an_image() {
    let s = if_like_scheduler();
    for kind in SamplerKind::ALL {
        let options = SamplerOptions { eta: 0.7, ..SamplerOptions::new(kind, 12) };
        let x = BatchNoise::seeded(&[100, 200, 300]).draw(&[3, 3, 8, 8], Kind::Float, Device::Cpu).unwrap();
        let batched = final_samples(&s, &options, &x, (&[1, 2, 3], &[1.0, -1.0, 0.5], &[7.0, 1.0, 3.0]), Device::Cpu);
        let alone = final_samples(&s, &options, &x.narrow(0, 1, 1), (&[2], &[-1.0], &[1.0]), Device::Cpu);
        assert!(alone.get(0).equal(&batched.get(1)), "{kind}: batching changed an image");
        assert!(!batched.get(0).equal(&batched.get(2)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// q(x_t | x_0): mean √ᾱ_t x_0 and variance 1 − ᾱ_t, for any t and x_0.
    #[test]
    fn q_sample_statistics_match_alpha_bar(t in 0i64..1000, x0 in -1.0f64..1.0, seed in 0u64..1000) {
        let s = cosine();
        let n = 50_000;
        let clean = Tensor::full([1, n], x0, (Kind::Float, Device::Cpu));
        let noise = BatchNoise::seeded(&[seed]).draw(&[1, n], Kind::Float, Device::Cpu).unwrap();
        let xt = q_sample(s.schedule(), &clean, &[t], &noise).unwrap();
        let ab = s.schedule().alpha_bar(t) as f64;
        let mean = xt.mean(Kind::Double).double_value(&[]);
        let var = xt.var(true).double_value(&[]);
        // Standard errors: σ/√n for the mean, σ²·√(2/n) for the variance; allow 5 of each.
        let sd = (1.0 - ab).sqrt();
        prop_assert!((mean - ab.sqrt() * x0).abs() < 5.0 * sd / (n as f64).sqrt() + 1e-6, "mean {} vs {}", mean, ab.sqrt() * x0);
        prop_assert!((var - (1.0 - ab)).abs() < 5.0 * (1.0 - ab) * (2.0 / n as f64).sqrt() + 1e-7, "var {} vs {}", var, 1.0 - ab);
    }

    /// Any DDIM/DDPM/DPM run over an explicit descending list visits exactly that list.
    #[test]
    fn explicit_timesteps_are_visited_as_given(mut ts in proptest::collection::btree_set(0i64..1000, 1..30)) {
        let list: Vec<i64> = std::mem::take(&mut ts).into_iter().rev().collect();
        let s = cosine();
        for kind in SamplerKind::ALL {
            let options = SamplerOptions { timesteps: Some(list.clone()), ..SamplerOptions::new(kind, 1) };
            let mut sampler = s.sampler(&options).unwrap();
            let x = Tensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu));
            let mut visited = vec![];
            while let Some(t) = sampler.current_timestep() {
                visited.push(t);
                let out = x.zeros_like();
                sampler.step(&out, &x, &mut BatchNoise::seeded(&[0])).unwrap();
            }
            prop_assert_eq!(&visited, &list);
        }
    }
}

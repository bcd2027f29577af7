//! Parity of the diffusion core with Hugging Face diffusers.
//!
//! Fixtures: `tests/fixtures/diffusion/diffusers.{json,safetensors}`, written by
//! `scripts/gen_fixtures.py` (diffusers 0.42.1, torch 2.11.0). Tolerance: 1e-5 in
//! float32, absolute for values of order one and relative beyond (see
//! `common::scaled_error`). Documented deliberate differences:
//! - `fixed_large_log`: diffusers returns NaN (it takes √log β); not in the fixtures.
//! - DDIM's previous timestep is the next list element, not t − T/S; the fixtures
//!   only use spacings where the two agree, and `leading` with steps_offset = 1
//!   and S = T (which reaches t = T in diffusers) is refused instead.
mod common;

use common::{config_from, diffusers_cases, load_json, load_tensors, scaled_error, DIFFUSERS_FIXTURE as FIXTURE};
use diffusiond::diffusion::{BatchNoise, NoiseSource, SamplerKind, SamplerOptions, Scheduler};
use tch::{Device, Kind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tch::Tensor;

const TOL: f64 = 1e-5;

fn kind_of(name: &str) -> SamplerKind {
    name.parse().unwrap()
}

#[test]
fn beta_schedules_match_diffusers() {
    let meta = load_json(&format!("{FIXTURE}.json"));
    let tensors = load_tensors(&format!("{FIXTURE}.safetensors"));
    let schedules = meta["schedules"].as_object().unwrap();
    assert_eq!(schedules.len(), 7, "every schedule is covered");
    for (name, cfg) in schedules {
        let scheduler = Scheduler::new(config_from(cfg)).unwrap();
        let s = scheduler.schedule();
        for (field, ours) in [("betas", s.betas()), ("alphas_cumprod", s.alphas_cumprod())] {
            let want = &tensors[&format!("schedule/{name}/{field}")];
            let err = scaled_error(&Tensor::from_slice(ours), want);
            assert!(err <= TOL, "{name} {field}: max error {err:e}");
        }
    }
}

#[test]
fn derived_quantities_match_adm() {
    let tensors = load_tensors(&format!("{FIXTURE}.safetensors"));
    let cfg = serde_json::json!({"beta_schedule": "squaredcos_cap_v2"});
    let scheduler = Scheduler::new(config_from(&cfg)).unwrap();
    let s = scheduler.schedule();
    let checks: [(&str, Vec<f64>); 5] = [
        ("posterior_variance", s.posterior_variance()),
        ("posterior_log_variance_clipped", s.posterior_log_variance_clipped()),
        ("posterior_mean_coef1", s.posterior_mean_coef1()),
        ("posterior_mean_coef2", s.posterior_mean_coef2()),
        ("snr", s.snr()),
    ];
    for (name, ours) in checks {
        let want = &tensors[&format!("derived/{name}")];
        let err = scaled_error(&Tensor::from_slice(&ours), want);
        assert!(err <= 1e-9, "{name}: max error {err:e}");
    }
}

#[test]
fn timestep_lists_match_diffusers() {
    let meta = load_json(&format!("{FIXTURE}.json"));
    let lists = meta["timesteps"].as_array().unwrap();
    let mut compared = 0;
    for entry in lists {
        let kind = kind_of(entry["sampler"].as_str().unwrap());
        let cfg = serde_json::json!({
            "timestep_spacing": entry["spacing"], "steps_offset": entry["steps_offset"],
        });
        let scheduler = Scheduler::new(config_from(&cfg)).unwrap();
        let steps = entry["steps"].as_u64().unwrap() as usize;
        let want: Vec<i64> = serde_json::from_value(entry["timesteps"].clone()).unwrap();
        let got = scheduler.timesteps(&SamplerOptions::new(kind, steps));
        if want.iter().any(|&t| t >= 1000) {
            // diffusers hands out t = 1000 for a 1000-step schedule here and then indexes past ᾱ.
            let err = got.expect_err("out-of-range timesteps are refused");
            assert!(err.to_string().contains("steps_offset"), "{err}");
        } else {
            assert_eq!(got.unwrap(), want, "{entry}");
            compared += 1;
        }
    }
    assert!(compared >= 130, "only {compared} lists compared");
}

#[test]
fn sampler_trajectories_match_diffusers() {
    // Both images run in one batch, each with its own guidance scale and noise
    // stream; the reference ran them one at a time.
    let (conds, scales, cases) = diffusers_cases();
    assert!(cases.len() >= 40);
    let mut worst = (0.0f64, String::new());
    for case in &cases {
        let sampler = case.scheduler.sampler(&case.options).unwrap();
        assert_eq!(sampler.timesteps(), case.timesteps.as_slice(), "{}: timesteps", case.name);
        let ours = case.run(&conds, &scales, Device::Cpu, Kind::Float).unwrap();
        for (i, (got, want)) in ours.iter().zip(&case.expected).enumerate() {
            assert_eq!(got.size(), want.size(), "{}: trajectory length", case.name);
            let err = scaled_error(got, want);
            assert!(err <= TOL, "{} image {i}: max error {err:e}", case.name);
            if err > worst.0 {
                worst = (err, case.name.clone());
            }
        }
    }
    println!("worst trajectory error {:e} ({})", worst.0, worst.1);
}

#[test]
fn noise_is_drawn_exactly_when_diffusers_draws_it() {
    let (_, _, cases) = diffusers_cases();
    for case in &cases {
        let mut sampler = case.scheduler.sampler(&case.options).unwrap();
        let draws = Arc::new(AtomicU64::new(0));
        let mut noise = BatchNoise::new(vec![Box::new(Counting(Arc::clone(&draws)))]);
        let x = Tensor::zeros([1, 3, 4, 4], (Kind::Float, Device::Cpu));
        let channels = if case.var_channels { 6 } else { 3 };
        let out = Tensor::zeros([1, channels, 4, 4], (Kind::Float, Device::Cpu));
        while !sampler.is_done() {
            sampler.step(&out, &x, &mut noise).unwrap();
        }
        assert!(sampler.step(&out, &x, &mut noise).is_err(), "stepping past the end is an error");
        assert_eq!(draws.load(Ordering::SeqCst), case.noise_drawn, "{}", case.name);
    }
}

/// A noise source that counts its draws.
struct Counting(Arc<AtomicU64>);

impl NoiseSource for Counting {
    fn fill(&mut self, _shape: &[i64], out: &mut [f32]) -> diffusiond::diffusion::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        out.fill(0.0);
        Ok(())
    }
}

//! The cascade against diffusers' `IFPipeline` and `IFSuperResolutionPipeline` on
//! the same tiny weights, prompt, timesteps and noise (fixtures from
//! `scripts/fixtures_pipeline.py`): the stage outputs agree to 1e-3.

mod common;

use std::ops::ControlFlow;

use common::{fixture_dir, load_json, load_tensors, relative_error};
use diffusiond::diffusion::{BatchNoise, NoiseSource, ReplayNoise};
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, LoadOptions, RequestSpec};
use tch::Tensor;

/// The bound: max |ours − diffusers| over the stage output, in [-1, 1] units.
const TOLERANCE: f64 = 1e-3;

fn cascade() -> Cascade {
    let options = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };
    Cascade::load(&fixture_dir().join("cascade"), &options).unwrap()
}

/// Image b replays element b of each recorded draw in `range`.
fn replay(draws: &[Tensor], n: i64) -> BatchNoise {
    BatchNoise::new((0..n).map(|b| Box::new(ReplayNoise::new(draws.iter().map(|d| d.get(b)))) as Box<dyn NoiseSource>).collect())
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn stages_match_diffusers_if_pipelines() {
    let cascade = cascade();
    let meta = load_json("cascade/reference.json");
    let refs = load_tensors("cascade/reference.safetensors");
    let n = meta["n"].as_i64().unwrap();
    let split = meta["stage1_draws"].as_u64().unwrap() as usize;
    let draws: Vec<Tensor> = (0..meta["draws"].as_u64().unwrap()).map(|i| refs[&format!("draw.{i:03}")].shallow_clone()).collect();

    // The text embeddings diffusiond computes from the prompt are the ones diffusers was given.
    let prompt = meta["prompt"].as_str().unwrap();
    let (cond, uncond) = cascade.text_embeddings(prompt, None, n).unwrap();
    let text_err = relative_error(&cond.get(0), &refs["prompt_embeds"].get(0)).max(relative_error(&uncond.get(0), &refs["null_embeds"].get(0)));
    println!("text embeddings: max relative error {text_err:.2e}");
    assert!(text_err <= 1e-4, "{text_err:e}");

    let request = cascade.plan(&RequestSpec { prompt: prompt.into(), n: n as usize, seed: Some(0), ..Default::default() }).unwrap();
    let text = (cond.narrow(0, 0, 1), uncond.narrow(0, 0, 1));
    let run = |stage: usize, low_res: Option<&Tensor>, noise: BatchNoise| {
        let mut job = cascade.start_stage_with(&request, stage, (&text.0, &text.1), low_res, noise).unwrap();
        cascade.run_job(&cascade.stages[stage], &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();
        job.sample().shallow_clone()
    };

    let stage1 = run(0, None, replay(&draws[..split], n));
    let err1 = max_abs(&stage1, &refs["stage1"]);
    // Stage II from diffusers' stage-I images isolates its own error; from ours, the cascade's.
    let stage2 = run(1, Some(&refs["stage1"]), replay(&draws[split..], n));
    let err2 = max_abs(&stage2, &refs["stage2"]);
    let chained = run(1, Some(&stage1), replay(&draws[split..], n));
    let err_chain = max_abs(&chained, &refs["stage2"]);
    println!("stage I {err1:.2e}, stage II {err2:.2e}, stage II on our stage I {err_chain:.2e} (max abs)");
    assert!(err1 <= TOLERANCE, "stage I: {err1:e}");
    assert!(err2 <= TOLERANCE, "stage II: {err2:e}");
    assert!(err_chain <= TOLERANCE, "chained: {err_chain:e}");
}

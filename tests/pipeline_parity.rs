//! The cascade against diffusers' `IFPipeline` and `IFSuperResolutionPipeline` on
//! the same tiny weights, prompt, timesteps and noise (fixtures from
//! `scripts/fixtures_pipeline.py`): the stage outputs agree to 1e-3.

mod common;

use common::cascade::reference;
use common::{fixture_dir, relative_error};
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, LoadOptions};
use tch::Tensor;

/// The agreed bound: max |ours − diffusers| over the stage output, in [-1, 1] units.
const TOLERANCE: f64 = 1e-3;

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn stages_match_diffusers_if_pipelines() {
    let options = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };
    let cascade = Cascade::load(&fixture_dir().join("cascade"), &options).unwrap();
    let r = reference();
    let refs = &r.tensors;

    // The text embeddings diffusiond computes from the prompt are the ones diffusers was given.
    let text = cascade.request_text(&r.request(&cascade)).unwrap();
    let text_err = relative_error(&text.cond.get(0), &refs["prompt_embeds"].get(0)).max(relative_error(&text.uncond.get(0), &refs["null_embeds"].get(0)));
    println!("text embeddings: max relative error {text_err:.2e}");
    assert!(text_err <= 1e-4, "{text_err:e}");

    let stage1 = r.run_stage(&cascade, 0, None);
    let err1 = max_abs(&stage1, &refs["stage1"]);
    // Stage II from diffusers' stage-I images isolates its own error; from ours, the cascade's.
    let err2 = max_abs(&r.run_stage(&cascade, 1, Some(&refs["stage1"])), &refs["stage2"]);
    let err_chain = max_abs(&r.run_stage(&cascade, 1, Some(&stage1)), &refs["stage2"]);
    println!("stage I {err1:.2e}, stage II {err2:.2e}, stage II on our stage I {err_chain:.2e} (max abs)");
    assert!(err1 <= TOLERANCE, "stage I: {err1:e}");
    assert!(err2 <= TOLERANCE, "stage II: {err2:e}");
    assert!(err_chain <= TOLERANCE, "chained: {err_chain:e}");
}

//! The cascade on CUDA: the diffusers IF-pipeline fixtures replayed on the GPU in
//! float32 and float16, and how much an image changes with its batch there.
//!
//! These tests need a GPU. They are `#[ignore]`d so that CPU-only runs report them
//! as skipped; on a GPU machine run `cargo test --test pipeline_cuda -- --ignored`.
//! Each fails loudly, instead of passing vacuously, if CUDA is not there.

mod common;

use std::ops::ControlFlow;

use common::cascade::reference;
use common::fixture_dir;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, LoadOptions, RequestSpec};
use tch::Cuda;

fn cascade(precision: Precision) -> Cascade {
    assert!(Cuda::is_available(), "CUDA is not available: run these tests on a GPU machine");
    Cascade::load(&fixture_dir().join("cascade"), &LoadOptions { device: DeviceSetting::Cuda(0), precision }).unwrap()
}


/// Max abs error of stage I and stage II (on diffusers' stage I) against diffusers' CPU run.
fn stage_errors(precision: Precision) -> (f64, f64) {
    let cascade = cascade(precision);
    let r = reference();
    let refs = &r.tensors;
    let e1 = (r.run_stage(&cascade, 0, None) - &refs["stage1"]).abs().max().double_value(&[]);
    let e2 = (r.run_stage(&cascade, 1, Some(&refs["stage1"])) - &refs["stage2"]).abs().max().double_value(&[]);
    println!("{precision:?} on CUDA: stage I {e1:.2e}, stage II {e2:.2e} max abs vs diffusers (CPU)");
    (e1, e2)
}

#[test]
#[ignore = "needs CUDA"]
fn float32_stages_on_cuda_match_diffusers() {
    let (e1, e2) = stage_errors(Precision::F32);
    // cuDNN convolutions run in TF32 by default.
    assert!(e1 <= 1e-2 && e2 <= 1e-2, "{e1:e} {e2:e}");
}

#[test]
#[ignore = "needs CUDA"]
fn float16_stages_on_cuda_stay_close() {
    let (e1, e2) = stage_errors(Precision::F16);
    assert!(e1 <= 5e-2 && e2 <= 5e-2, "{e1:e} {e2:e}");
}

#[test]
#[ignore = "needs CUDA"]
fn batch_composition_on_cuda() {
    for precision in [Precision::F32, Precision::F16] {
        let c = cascade(precision);
        let spec = RequestSpec { prompt: "a red circle on top of a blue square".into(), n: 4, seed: Some(5), ..Default::default() };
        let run = |s: &RequestSpec| c.generate(&c.plan(s).unwrap(), &mut |_| ControlFlow::Continue(())).unwrap();
        let batch = run(&spec);
        let alone = run(&RequestSpec { n: 1, seed: Some(6), ..spec.clone() });
        let (a, b) = (alone[0].image.as_raw(), batch[1].image.as_raw());
        let differing = a.iter().zip(b).filter(|(x, y)| x != y).count();
        let worst = a.iter().zip(b).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
        println!("{precision:?}: image alone vs second of 4 on CUDA: {differing}/{} bytes differ, worst by {worst}", a.len());
        assert!(worst <= 8, "an image changed by {worst} levels with its batch");
    }
}

//! Image-to-image and inpainting against diffusers' `IFImg2ImgPipeline`,
//! `IFInpaintingPipeline` and `IFInpaintingSuperResolutionPipeline` on the tiny
//! fixture cascade: the same source PNGs, prompt, strength and recorded noise
//! (fixtures from `scripts/fixtures_edit.py`) give the same images to 1e-3. A
//! super-resolution stage with a strength below 1 matches
//! `IFImg2ImgSuperResolutionPipeline` given the previous output upsampled
//! bicubically as its `original_image`.
//!
//! The pictures enter through diffusiond's own path (PNG decoding, `plan`,
//! `Picture`/`Mask` tensors), so the preprocessing is under test too.

mod common;

use std::ops::ControlFlow;

use common::cascade::replay;
use common::{fixture_dir, load_json, load_tensors};
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::source::decode;
use diffusiond::pipeline::{Cascade, GenerationRequest, LoadOptions, Mask, Picture, PictureLimits, RequestSpec, SourceSpec, StageOverride};
use tch::Tensor;

const TOLERANCE: f64 = 1e-3;

fn cascade() -> Cascade {
    let options = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };
    Cascade::load(&fixture_dir().join("cascade"), &options).unwrap()
}

fn file(name: &str) -> image::DynamicImage {
    decode("image", &std::fs::read(fixture_dir().join("edit").join(name)).unwrap(), &PictureLimits::default()).unwrap()
}

/// The request diffusers ran: stage I only (or both stages) at the case's settings.
fn request(cascade: &Cascade, case: &serde_json::Value, source: SourceSpec, stages: usize) -> GenerationRequest {
    let meta = load_json("edit/reference.json");
    let sr = StageOverride { steps: Some(8), guidance_scale: Some(3.0), noise_level: Some(250), ..Default::default() };
    let spec = RequestSpec {
        prompt: meta["prompt"].as_str().unwrap().to_owned(),
        n: meta["n"].as_u64().unwrap() as usize,
        seed: Some(0),
        steps: Some(case["steps"].as_u64().unwrap() as usize),
        guidance_scale: Some(case["guidance_scale"].as_f64().unwrap() as f32),
        stage_overrides: vec![(1, sr)],
        stages: Some(stages),
        source: Some(source),
        ..Default::default()
    };
    cascade.plan(&spec).unwrap()
}

/// Runs stage k of `request` with the case's recorded draws.
fn run(cascade: &Cascade, request: &GenerationRequest, k: usize, name: &str, low_res: Option<&Tensor>) -> Tensor {
    let meta = load_json("edit/reference.json");
    let tensors = load_tensors("edit/reference.safetensors");
    let count = meta["cases"][name]["draws"].as_u64().unwrap();
    let draws: Vec<Tensor> = (0..count).map(|i| tensors[&format!("{name}.draw.{i:03}")].shallow_clone()).collect();
    let text = cascade.request_text(request).unwrap();
    let mut job = cascade.start_stage_with(request, k, &text, low_res, replay(&draws, request.n as i64)).unwrap();
    let stage = &cascade.stages[request.stages[k].index];
    cascade.run_job(stage, &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();
    let out = job.sample().shallow_clone();
    let err = (&out - &tensors[&format!("{name}.out")]).abs().max().double_value(&[]);
    println!("{name}: {} steps, max abs error {err:.2e}", job.total_steps());
    assert!(err <= TOLERANCE, "{name}: {err:e}");
    out
}

#[test]
fn image_to_image_matches_if_img2img() {
    let cascade = cascade();
    let meta = load_json("edit/reference.json");
    let case = &meta["cases"]["img2img"];
    let strength = case["strength"].as_f64();
    let request = request(&cascade, case, SourceSpec::Image { image: Picture::from_image(&file("image16.png")), strength }, 1);
    let _ = run(&cascade, &request, 0, "img2img", None);
}

#[test]
fn a_super_resolution_stage_below_full_strength_matches_if_img2img_superresolution() {
    let cascade = cascade();
    let meta = load_json("edit/reference.json");
    let case = &meta["cases"]["sr_strength"];
    let strength = case["strength"].as_f64().unwrap();
    let over = StageOverride {
        steps: Some(case["steps"].as_u64().unwrap() as usize),
        guidance_scale: Some(case["guidance_scale"].as_f64().unwrap() as f32),
        noise_level: case["noise_level"].as_i64(),
        strength: Some(strength),
        ..Default::default()
    };
    let spec = RequestSpec {
        prompt: meta["prompt"].as_str().unwrap().to_owned(),
        n: meta["n"].as_u64().unwrap() as usize,
        seed: Some(0),
        stage_overrides: vec![(1, over)],
        ..Default::default()
    };
    let request = cascade.plan(&spec).unwrap();
    assert_eq!(request.stages[1].strength, strength);
    // Half of the 8 steps run, and the progress the job reports says so.
    assert_eq!(request.stage_steps(1, 8), 4);
    let tensors = load_tensors("edit/reference.safetensors");
    let _ = run(&cascade, &request, 1, "sr_strength", Some(&tensors["img2img.out"]));
}

#[test]
fn inpainting_matches_if_inpainting_at_both_stages() {
    let cascade = cascade();
    let meta = load_json("edit/reference.json");
    let case = &meta["cases"]["inpaint"];
    // The request carries the pictures at the output size (32 px); stage I takes them at 16.
    let source = |size: u32| SourceSpec::Inpaint {
        image: Picture::from_image(&file(&format!("image{size}.png"))),
        mask: Mask::from_image(&file(&format!("mask{size}.png"))),
        strength: case["strength"].as_f64(),
    };
    let base_only = request(&cascade, case, source(16), 1);
    let stage1 = run(&cascade, &base_only, 0, "inpaint", None);
    // Outside the mask the image is kept exactly.
    let original = Picture::from_image(&file("image16.png")).tensor((16, 16), tch::Device::Cpu).unwrap();
    let keep = Mask::from_image(&file("mask16.png")).tensor((16, 16), tch::Device::Cpu).unwrap().neg() + 1.0;
    let kept = ((&stage1 - &original) * &keep).abs().max().double_value(&[]);
    assert!(kept < 1e-6, "the known region moved by {kept}");

    let both = request(&cascade, case, source(32), 2);
    let tensors = load_tensors("edit/reference.safetensors");
    let _ = run(&cascade, &both, 1, "inpaint_sr", Some(&tensors["inpaint.out"]));
}

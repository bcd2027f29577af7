//! The cascade end to end on the tiny fixture cascade: seeds, batch invariance,
//! previews, PNG records, cancellation, request validation and bad directories.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use common::{copy_dir, fixture_dir};
use diffusiond::diffusion::SamplerKind;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::png::read_text_chunks;
use diffusiond::pipeline::{Cascade, GeneratedImage, LoadOptions, Mask, Picture, PipelineError, RequestSpec, SourceSpec, StageOverride};

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

fn cascade() -> Cascade {
    Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap()
}

fn spec(n: usize, seed: u64) -> RequestSpec {
    RequestSpec { prompt: "a red circle on top of a blue square".into(), n, seed: Some(seed), ..Default::default() }
}

fn generate(c: &Cascade, spec: &RequestSpec) -> Vec<GeneratedImage> {
    c.generate(&c.plan(spec).unwrap(), &mut |_| ControlFlow::Continue(())).unwrap()
}

#[test]
fn seeds_make_images_reproducible_and_batch_invariant() {
    let c = cascade();
    let mut s = spec(3, 10);
    s.sampler = Some(SamplerKind::Ddim);
    s.eta = Some(0.5); // stochastic steps too, so every noise draw is exercised
    let batch = generate(&c, &s);
    assert_eq!(batch.len(), 3);
    assert_eq!(batch.iter().map(|g| g.seed).collect::<Vec<_>>(), [10, 11, 12]);
    assert!(batch.iter().all(|g| g.image.dimensions() == (32, 32)));
    assert_ne!(batch[0].image.as_raw(), batch[1].image.as_raw(), "different seeds give different images");
    // Image 1 of the batch is bit-identical to the same seed generated alone.
    let alone = generate(&c, &RequestSpec { n: 1, seed: Some(11), ..s.clone() });
    assert_eq!(alone[0].image.as_raw(), batch[1].image.as_raw());
    // And the whole run repeats exactly.
    let again = generate(&c, &s);
    assert!(batch.iter().zip(&again).all(|(a, b)| a.png().unwrap() == b.png().unwrap()));

    // Without guidance an image alone is a single UNet row: still the same bits.
    let unguided = StageOverride { guidance_scale: Some(1.0), ..Default::default() };
    let s = RequestSpec { guidance_scale: Some(1.0), stage_overrides: vec![(1, unguided)], ..s };
    let batch = generate(&c, &s);
    let alone = generate(&c, &RequestSpec { n: 1, seed: Some(12), ..s });
    assert_eq!(alone[0].image.as_raw(), batch[2].image.as_raw());
}

#[test]
fn a_preview_stops_after_the_base_stage_and_records_its_settings() {
    let c = cascade();
    let s = RequestSpec { stages: Some(1), negative_prompt: Some("green".into()), steps: Some(4), guidance_scale: Some(2.5), ..spec(1, 3) };
    let images = generate(&c, &s);
    assert_eq!(images[0].image.dimensions(), (16, 16));
    let chunks = read_text_chunks(&images[0].png().unwrap()).unwrap();
    let get = |k: &str| chunks.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(get("negative_prompt"), "green");
    assert_eq!(get("model"), "tiny-if");
    let record: serde_json::Value = serde_json::from_str(&get("diffusiond")).unwrap();
    assert_eq!(record["stages"][0]["steps"], 4);
    assert_eq!(record["stages"][0]["guidance_scale"], 2.5);
    assert_eq!(record["stages"].as_array().unwrap().len(), 1);
}

#[test]
fn the_observer_sees_every_step_and_can_cancel() {
    let c = cascade();
    let request = c.plan(&spec(1, 1)).unwrap();
    let mut seen = Vec::new();
    c.generate(&request, &mut |p| {
        seen.push((p.stage, p.step, p.total_steps));
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(seen.len(), 10 + 8);
    assert_eq!(seen.last(), Some(&(1, 8, 8)));
    let mut calls = 0;
    let err = c
        .generate(&request, &mut |_| {
            calls += 1;
            if calls == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap_err();
    assert!(matches!(err, PipelineError::Cancelled));
    assert_eq!(calls, 3);
}

#[test]
fn invalid_requests_name_the_field_and_range() {
    let c = cascade();
    let err = |s: RequestSpec| c.plan(&s).unwrap_err().to_string();
    assert!(err(spec(0, 1)).contains("`n`: 0 is outside 1..=16"));
    assert!(err(RequestSpec { prompt: "  ".into(), ..spec(1, 1) }).contains("`prompt`"));
    assert!(err(RequestSpec { steps: Some(0), ..spec(1, 1) }).contains("`steps`: 0 is outside 1..=1000"));
    assert!(err(RequestSpec { guidance_scale: Some(f32::NAN), ..spec(1, 1) }).contains("`guidance_scale`"));
    assert!(err(RequestSpec { guidance_scale: Some(-1.0), ..spec(1, 1) }).contains("`guidance_scale`: -1 is outside"));
    assert!(err(RequestSpec { eta: Some(1.5), ..spec(1, 1) }).contains("`eta`"));
    assert!(err(RequestSpec { stages: Some(3), ..spec(1, 1) }).contains("`stages`: 3 is outside 1..=2"));
    let sr = |o: StageOverride| err(RequestSpec { stage_overrides: vec![(1, o)], ..spec(1, 1) });
    assert!(sr(StageOverride { noise_level: Some(1000), ..Default::default() }).contains("`stages[1].noise_level`: 1000 is outside 0..=999"));
    assert!(sr(StageOverride { steps: Some(2000), ..Default::default() }).contains("`stages[1].steps`"));
    let base = StageOverride { noise_level: Some(5), ..Default::default() };
    assert!(err(RequestSpec { stage_overrides: vec![(0, base)], ..spec(1, 1) }).contains("`noise_level`"));
    assert!(err(RequestSpec { stage_overrides: vec![(2, StageOverride::default())], ..spec(1, 1) }).contains("`stage_overrides`"));
}

/// A copy of the fixture cascade whose manifest points at the fixture encoder.
fn copy_cascade(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffusiond-cascade-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixture_dir().join("cascade"), &dir);
    let encoder = std::fs::canonicalize(fixture_dir().join("text/tiny-bert")).unwrap();
    edit_json(&dir.join("cascade.json"), |m| m["text_encoder"]["path"] = encoder.display().to_string().into());
    dir
}

fn edit_json(file: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(file, v.to_string()).unwrap();
}

#[test]
fn bad_cascade_directories_fail_at_load_naming_the_file() {
    let load_err = |dir: &Path| {
        let e = Cascade::load(dir, &CPU).unwrap_err().to_string();
        std::fs::remove_dir_all(dir).unwrap();
        e
    };
    let dir = copy_cascade("ok");
    Cascade::load(&dir, &CPU).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = copy_cascade("missing");
    std::fs::remove_file(dir.join("sr/image_noising_scheduler/scheduler_config.json")).unwrap();
    assert!(load_err(&dir).contains("sr/image_noising_scheduler/scheduler_config.json"));

    let dir = copy_cascade("option");
    edit_json(&dir.join("base/unet/config.json"), |c| c["time_cond_proj_dim"] = 4.into());
    let e = load_err(&dir);
    assert!(e.contains("base/unet/config.json") && e.contains("`time_cond_proj_dim`"), "{e}");

    let dir = copy_cascade("order");
    edit_json(&dir.join("cascade.json"), |m| m["stages"].as_array_mut().unwrap().reverse());
    assert!(load_err(&dir).contains("first stage must be a base model"));

    let dir = copy_cascade("sampler");
    edit_json(&dir.join("cascade.json"), |m| m["stages"][1]["sampler"] = "euler".into());
    let e = load_err(&dir);
    assert!(e.contains("cascade.json") && e.contains("stage `sr`: `sampler`"), "{e}");

    // A strength is for super-resolution stages, within (0, 1].
    for (stage, value, says) in [(0, 0.5, "only for super-resolution stages"), (1, 0.0, "outside (0, 1]"), (1, 1.5, "outside (0, 1]")] {
        let dir = copy_cascade(&format!("strength{stage}{value}"));
        edit_json(&dir.join("cascade.json"), |m| m["stages"][stage]["strength"] = value.into());
        let e = load_err(&dir);
        assert!(e.contains("cascade.json") && e.contains("`strength`") && e.contains(says), "{e}");
    }
    let dir = copy_cascade("strength");
    edit_json(&dir.join("cascade.json"), |m| m["stages"][1]["strength"] = 0.5.into());
    let c = Cascade::load(&dir, &LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 }).unwrap();
    assert_eq!(c.stages[1].defaults.strength, 0.5);
    assert_eq!(c.plan(&spec(1, 1)).unwrap().stages[1].strength, 0.5);
    // Inpainting repaints the mask from noise at every stage, whatever the default.
    let picture = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(32, 32, image::Rgb([90, 90, 90])));
    let mask = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(32, 32, image::Luma([255])));
    let source = SourceSpec::Inpaint { image: Picture::from_image(&picture), mask: Mask::from_image(&mask), strength: None };
    let inpaint = c.plan(&RequestSpec { source: Some(source), ..spec(1, 1) }).unwrap();
    assert_eq!((inpaint.stages[1].strength, inpaint.stage_steps(1, 8)), (1.0, 8));

    let dir = copy_cascade("weights");
    std::fs::write(dir.join("sr/unet/diffusion_pytorch_model.safetensors"), b"not safetensors").unwrap();
    assert!(load_err(&dir).contains("sr/unet/diffusion_pytorch_model.safetensors"));
}

#[test]
fn half_precision_weights_run_the_whole_cascade() {
    // bfloat16 on the CPU exercises the same kind conversions as float16 on CUDA.
    let c = Cascade::load(&fixture_dir().join("cascade"), &LoadOptions { device: DeviceSetting::Cpu, precision: Precision::Bf16 }).unwrap();
    assert_eq!(c.kind(), tch::Kind::BFloat16);
    let images = generate(&c, &RequestSpec { steps: Some(3), stage_overrides: vec![(1, StageOverride { steps: Some(2), ..Default::default() })], ..spec(2, 9) });
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].image.dimensions(), (32, 32));
}

//! Layout guidance on the tiny fixture cascade: scale 0 changes no bit, a
//! positive scale changes the images of prompts with a layout and leaves
//! others alone, a guided image is the same bits alone and batched, the
//! gradient it follows descends g, the manifest's default applies, and bad
//! scales are refused naming the field.

mod common;

use std::path::PathBuf;

use common::cascade::{assert_guided_batch_invariant, ddim_spec, generate, pixels};
use common::fixture_dir;
use diffusiond::diffusion::PredictionType;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::layout_guidance::{layout_loss, LayoutJob};
use diffusiond::pipeline::prompt_layout;
use diffusiond::pipeline::{Cascade, LoadOptions, Manifest, Picture, PipelineError, RequestSpec, SourceSpec};
use diffusiond::nn::text::tokenizer::covering;
use diffusiond::nn::unet::{AttentionMaps, UNetInput};
use tch::{Kind, Tensor};

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };
const PAIR: &str = "a red circle above a blue square";

fn cascade() -> Cascade {
    Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap()
}

fn spec(prompt: &str, n: usize, seed: u64, layout: Option<f32>) -> RequestSpec {
    RequestSpec { layout_guidance_scale: layout, ..ddim_spec(prompt, n, seed) }
}

#[test]
fn scale_zero_changes_nothing_and_a_positive_scale_changes_laid_out_prompts_only() {
    let c = cascade();
    let reference = generate(&c, &spec(PAIR, 2, 3, None));
    assert_eq!(pixels(&generate(&c, &spec(PAIR, 2, 3, Some(0.0)))), pixels(&reference), "the fixture's default is no guidance");
    let guided = generate(&c, &spec(PAIR, 2, 3, Some(500.0)));
    for (g, r) in guided.iter().zip(&reference) {
        let changed = g.image.as_raw().iter().zip(r.image.as_raw()).filter(|(a, b)| a != b).count();
        assert!(changed > 0, "image {} did not change", g.index);
    }
    assert_eq!(guided[0].record.stages[0].layout_guidance_scale, 500.0);
    assert_eq!(guided[0].record.stages[1].layout_guidance_scale, 0.0, "only the base stage is guided");
    assert!(guided[0].record.parameters().contains("Layout guidance: 500"), "{}", guided[0].record.parameters());

    // A group of no stated size has no layout: the plan says so and the images are the unguided ones.
    let plan = c.plan(&spec("green stars", 1, 5, Some(500.0))).unwrap();
    assert_eq!(plan.stages[0].layout_guidance_scale, 0.0);
    assert_eq!(pixels(&generate(&c, &spec("green stars", 1, 5, Some(500.0)))), pixels(&generate(&c, &spec("green stars", 1, 5, None))));
    // A counted one is kept in as many places as it counts.
    let plan = c.plan(&spec("three green stars", 1, 5, Some(500.0))).unwrap();
    assert_eq!(plan.stages[0].layout_guidance_scale, 500.0);
    assert_ne!(pixels(&generate(&c, &spec("three green stars", 1, 5, Some(500.0)))), pixels(&generate(&c, &spec("three green stars", 1, 5, None))));
}

#[test]
fn a_guided_image_is_the_same_alone_batched_and_anywhere_in_its_request() {
    assert_guided_batch_invariant(&cascade(), |n, seed| spec(PAIR, n, seed, Some(300.0)));
    assert_guided_batch_invariant(&cascade(), |n, seed| spec("three green stars", n, seed, Some(300.0)));
}

/// g of `x` at `t` through the UNet's public API, independently of the job.
fn g(c: &Cascade, x: &Tensor, t: i64, text: &Tensor, named: &Tensor, relation: Option<diffusiond::train::claims::Relation>) -> f64 {
    let stage = &c.stages[0];
    let maps = AttentionMaps::default();
    let timestep = Tensor::from_slice(&[t]);
    let input = UNetInput { sample: x, timesteps: &timestep, encoder_hidden_states: text, class_labels: None, text_mask: None };
    let _prediction = tch::no_grad(|| stage.unet().unwrap().model.forward_probed(&input, false, Some(&maps))).unwrap();
    let maps = maps.take();
    assert!(!maps.is_empty(), "the fixture base UNet attends to text");
    layout_loss(&maps, named, &[Some(1), Some(1)], relation).double_value(&[])
}

#[test]
fn the_gradient_descends_g() {
    let c = cascade();
    let layout = prompt_layout::read(PAIR).unwrap();
    let text = c.request_text(&c.plan(&spec(PAIR, 1, 1, None)).unwrap()).unwrap().cond;
    let stage = &c.stages[0];
    let schedule = std::sync::Arc::clone(stage.scheduler.schedule());
    let job = LayoutJob::new(PAIR, &layout, c.encoder.tokenizer(), text.shallow_clone(), 1.0, PredictionType::Epsilon, schedule).unwrap().unwrap();
    let (h, w) = stage.size;
    tch::manual_seed(9);
    let x = Tensor::randn([1, 3, h, w], (Kind::Float, tch::Device::Cpu));
    let t = 900;
    let (values, grad) = job.gradient(stage, &x, t).unwrap();
    assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    // The same g by hand, with the words' tokens marked as the job marks them.
    let offsets = c.encoder.tokenizer().offsets(PAIR).unwrap();
    let marks = |words: &[(usize, usize)]| -> Vec<f32> { covering(&offsets, words).into_iter().map(|on| f32::from(u8::from(on))).collect() };
    let rows = [marks(&layout.named[0].words), marks(&layout.named[1].words)].concat();
    let named = Tensor::from_slice(&rows).view([2, offsets.len() as i64]);
    let before = g(&c, &x, t, &text, &named, layout.relation);
    assert!((before - values[0]).abs() < 1e-5, "{before} vs {}", values[0]);
    // A small step against the gradient lowers it.
    let step = 1e-2 / grad.abs().max().double_value(&[]);
    let after = g(&c, &(&x - &grad * step), t, &text, &named, layout.relation);
    assert!(after < before, "g {before} → {after}");
}

#[test]
fn the_manifest_sets_the_default_and_bad_scales_name_the_field() {
    let src = fixture_dir().join("cascade");
    let dir: PathBuf = std::env::temp_dir().join(format!("diffusiond-layout-guidance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for stage in ["base", "sr"] {
        let link = dir.join(stage);
        std::os::unix::fs::symlink(std::fs::canonicalize(src.join(stage)).unwrap(), link).unwrap();
    }
    let mut manifest = Manifest::from_dir(&src).unwrap();
    manifest.text_encoder.path = std::fs::canonicalize(fixture_dir().join("text/tiny-bert")).unwrap();
    manifest.stages[0].layout_guidance_scale = 250.0;
    manifest.write(&dir).unwrap();
    let c = Cascade::load(&dir, &CPU).unwrap();
    assert_eq!(c.info().stages[0].0.defaults.layout_guidance_scale, 250.0);
    assert_eq!(c.plan(&spec(PAIR, 1, 1, None)).unwrap().stages[0].layout_guidance_scale, 250.0);
    assert_eq!(c.plan(&spec(PAIR, 1, 1, Some(0.0))).unwrap().stages[0].layout_guidance_scale, 0.0);

    for bad in [-1.0, 1e6, f32::NAN] {
        match c.plan(&spec(PAIR, 1, 1, Some(bad))) {
            Err(PipelineError::Invalid { field, .. }) => assert_eq!(field, "layout_guidance_scale"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    // An upscale runs no base stage: asking to guide it is an error, the default is not.
    let (w, h) = (c.stages[0].size.1 as u32, c.stages[0].size.0 as u32);
    let picture = Picture::from_image(&image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(w, h, image::Rgb([200, 30, 30]))));
    let upscale = |layout| RequestSpec { source: Some(SourceSpec::Upscale { image: picture.clone() }), ..spec(PAIR, 1, 1, layout) };
    match c.plan(&upscale(Some(10.0))) {
        Err(PipelineError::Invalid { field, .. }) => assert_eq!(field, "layout_guidance_scale"),
        other => panic!("{other:?}"),
    }
    assert!(c.plan(&upscale(None)).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

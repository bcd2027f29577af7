//! Requests that start from an image or mix seeds, on the tiny fixture cascade
//! (16 px base, 32 px super-resolution): what `plan` accepts and refuses, and the
//! properties each kind promises — inpainting keeps the known pixels, upscaling
//! runs only the super-resolution stage, variations and interpolations end on
//! the seeds they name, inversion reconstructs better with more steps (on the
//! shipped model) — and that
//! every kind gives the same images alone and batched with other requests.

mod common;

use std::ops::ControlFlow;

use common::fixture_dir;
use diffusiond::diffusion::SamplerKind;
use diffusiond::eval::batch::generate_many;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, GeneratedImage, GenerationRequest, LoadOptions, Mask, NoiseMix, PipelineError, Picture, RequestSpec, SourceSpec, StageOverride};

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

fn cascade() -> Cascade {
    Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap()
}

fn picture(name: &str) -> image::DynamicImage {
    image::open(fixture_dir().join("edit").join(name)).unwrap()
}

fn image32() -> Picture {
    Picture::from_image(&picture("image32.png"))
}

fn mask32() -> Mask {
    Mask::from_image(&picture("mask32.png"))
}

fn spec(source: Option<SourceSpec>) -> RequestSpec {
    RequestSpec { prompt: "a red circle".into(), n: 1, seed: Some(3), source, ..Default::default() }
}

fn refused(cascade: &Cascade, spec: &RequestSpec) -> (String, String) {
    match cascade.plan(spec) {
        Err(PipelineError::Invalid { field, reason }) => (field, reason),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

fn generate(cascade: &Cascade, request: &GenerationRequest) -> Vec<GeneratedImage> {
    cascade.generate(request, &mut |_| ControlFlow::Continue(())).unwrap()
}

#[test]
fn plan_names_the_field_of_every_bad_image_input() {
    let cascade = cascade();
    let wide = Picture(image::imageops::resize(&image32().0, 48, 32, image::imageops::FilterType::Triangle));
    let cases: Vec<(RequestSpec, &str, &str)> = vec![
        (spec(Some(SourceSpec::Image { image: wide.clone(), strength: None })), "source.image", "aspect ratio"),
        (spec(Some(SourceSpec::Image { image: image32(), strength: Some(0.0) })), "source.strength", "outside"),
        (spec(Some(SourceSpec::Image { image: image32(), strength: Some(1.5) })), "source.strength", "outside"),
        (spec(Some(SourceSpec::Image { image: image32(), strength: Some(f64::NAN) })), "source.strength", "outside"),
        // 10 steps at 0.05 is no step at all.
        (spec(Some(SourceSpec::Image { image: image32(), strength: Some(0.05) })), "source.strength", "no step"),
        (
            spec(Some(SourceSpec::Inpaint { image: image32(), mask: Mask(image::GrayImage::new(16, 16)), strength: None })),
            "source.mask",
            "16x16; the image is 32x32",
        ),
        (spec(Some(SourceSpec::Inpaint { image: image32(), mask: Mask(image::GrayImage::new(32, 32)), strength: None })), "source.mask", "repaints nothing"),
        // A 32 px picture is already the last stage's output: nothing is left to upscale.
        (spec(Some(SourceSpec::Upscale { image: image32() })), "source.image", "no super-resolution stage"),
        (RequestSpec { sampler: Some(SamplerKind::Ddpm), ..spec(Some(SourceSpec::Invert { image: image32(), prompt: None })) }, "sampler", "DDIM"),
        (RequestSpec { eta: Some(0.5), ..spec(Some(SourceSpec::Invert { image: image32(), prompt: None })) }, "sampler", "DDIM"),
        (RequestSpec { noise: NoiseMix::Interpolation { seed: 1, prompt: None }, ..spec(None) }, "n", "2 frames"),
        (RequestSpec { noise: NoiseMix::Variation { seed: 1, strength: 1.5 }, ..spec(None) }, "variation.strength", "outside"),
        (
            RequestSpec { noise: NoiseMix::Variation { seed: 1, strength: 0.5 }, ..spec(Some(SourceSpec::Invert { image: image32(), prompt: None })) },
            "variation",
            "inverted",
        ),
        (RequestSpec { prompt: " ".into(), ..spec(None) }, "prompt", "empty"),
        (RequestSpec { preview_every: Some(0), ..spec(None) }, "preview_every", "at least 1"),
    ];
    for (spec, field, words) in cases {
        let (got, reason) = refused(&cascade, &spec);
        assert_eq!(got, field, "{reason}");
        assert!(reason.contains(words), "{field}: {reason:?} lacks {words:?}");
    }
    // With an image, the prompt may be empty.
    let upscale = RequestSpec { prompt: String::new(), ..spec(Some(SourceSpec::Upscale { image: image32().resized((16, 16)) })) };
    assert_eq!(cascade.plan(&upscale).unwrap().stages.len(), 1);
}

#[test]
fn inpainting_keeps_every_known_pixel_through_the_cascade() {
    let cascade = cascade();
    let request = cascade.plan(&RequestSpec { n: 2, ..spec(Some(SourceSpec::Inpaint { image: image32(), mask: mask32(), strength: None })) }).unwrap();
    let images = generate(&cascade, &request);
    let (original, mask) = (image32(), mask32());
    let mut repainted = 0;
    for image in &images {
        assert_eq!(image.image.dimensions(), (32, 32));
        for (x, y, px) in image.image.enumerate_pixels() {
            if mask.0.get_pixel(x, y).0[0] < 128 {
                assert_eq!(px, original.0.get_pixel(x, y), "known pixel ({x}, {y}) changed");
            } else if px != original.0.get_pixel(x, y) {
                repainted += 1;
            }
        }
    }
    assert!(repainted > 100, "only {repainted} masked pixels changed");
}

#[test]
fn image_to_image_changes_less_at_lower_strength() {
    let cascade = cascade();
    let distance = |strength: f64| {
        let request = cascade.plan(&RequestSpec { stages: Some(1), ..spec(Some(SourceSpec::Image { image: image32(), strength: Some(strength) })) }).unwrap();
        let out = &generate(&cascade, &request)[0].image;
        let reference = image32().resized((16, 16));
        out.pixels().zip(reference.0.pixels()).map(|(a, b)| (0..3).map(|c| (f64::from(a.0[c]) - f64::from(b.0[c])).abs()).sum::<f64>()).sum::<f64>()
    };
    let (low, high) = (distance(0.2), distance(1.0));
    println!("mean |Δ| per pixel: strength 0.2 {:.1}, strength 1.0 {:.1}", low / 256.0, high / 256.0);
    assert!(low < high, "strength 0.2 moved the image {low}, strength 1 {high}");
}

#[test]
fn upscaling_runs_only_the_super_resolution_stage() {
    let cascade = cascade();
    let small = image32().resized((16, 16));
    let request = cascade.plan(&RequestSpec { prompt: String::new(), ..spec(Some(SourceSpec::Upscale { image: small.clone() })) }).unwrap();
    assert_eq!(request.stages.iter().map(|s| s.index).collect::<Vec<_>>(), [1]);
    let up = generate(&cascade, &request);
    assert_eq!(up[0].image.dimensions(), (32, 32));
    // The same as the SR stage of a cascade whose base stage drew exactly `small`.
    let text = cascade.request_text(&request).unwrap();
    let low = small.tensor((16, 16), tch::Device::Cpu).unwrap();
    let mut job = cascade.start_stage(&request, 0, &text, Some(&low)).unwrap();
    cascade.run_job(&cascade.stages[1], &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();
    assert_eq!(cascade.finish(&request, job.sample()).unwrap()[0].image, up[0].image);
}

#[test]
fn an_upscale_varies_toward_what_the_named_seed_draws_at_its_stage() {
    let cascade = cascade();
    let small = image32().resized((16, 16));
    let ddim = StageOverride { sampler: Some(SamplerKind::Ddim), eta: Some(0.0), ..Default::default() };
    let up = |seed: u64, noise: NoiseMix| {
        let spec = RequestSpec { prompt: String::new(), seed: Some(seed), noise, stage_overrides: vec![(1, ddim.clone())], ..spec(Some(SourceSpec::Upscale { image: small.clone() })) };
        generate(&cascade, &cascade.plan(&spec).unwrap()).remove(0).image
    };
    // The first stage that runs (here the SR stage) mixes with the stream
    // the named seed draws there, so weight 1 is that seed's upscale.
    assert_eq!(up(3, NoiseMix::Variation { seed: 50, strength: 0.0 }), up(3, NoiseMix::Seeds));
    assert_eq!(up(3, NoiseMix::Variation { seed: 50, strength: 1.0 }), up(50, NoiseMix::Seeds));
}

#[test]
fn variations_and_interpolations_end_on_the_seeds_they_name() {
    let cascade = cascade();
    // Deterministic sampling at the base stage: the image is a function of the noise and prompt.
    let ddim = RequestSpec { stages: Some(1), sampler: Some(SamplerKind::Ddim), eta: Some(0.0), ..spec(None) };
    let plain = |seed: u64, prompt: &str| {
        let r = cascade.plan(&RequestSpec { seed: Some(seed), prompt: prompt.into(), ..ddim.clone() }).unwrap();
        generate(&cascade, &r).remove(0).image
    };
    let vary = |strength: f64| {
        let r = cascade.plan(&RequestSpec { noise: NoiseMix::Variation { seed: 50, strength }, ..ddim.clone() }).unwrap();
        generate(&cascade, &r).remove(0).image
    };
    assert_eq!(vary(0.0), plain(3, "a red circle"));
    assert_eq!(vary(1.0), plain(50, "a red circle"));
    let halfway = vary(0.5);
    assert!(halfway != plain(3, "a red circle") && halfway != plain(50, "a red circle"));

    let frames = cascade
        .plan(&RequestSpec { n: 4, noise: NoiseMix::Interpolation { seed: 60, prompt: Some("two green stars".into()) }, ..ddim.clone() })
        .unwrap();
    assert!((0..4).all(|i| frames.image_seed(i) == 3));
    let images = generate(&cascade, &frames);
    assert_eq!(images[0].image, plain(3, "a red circle"));
    assert_eq!(images[3].image, plain(60, "two green stars"));
    assert!(images[1].image != images[0].image && images[2].image != images[3].image);
}

/// On the shipped model (random weights have no smooth ODE to retrace): a
/// training render, inverted under its caption and sampled back under it.
#[test]
fn inversion_reconstructs_better_with_more_steps() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    let cascade = Cascade::load(&root, &CPU).unwrap();
    let sample = diffusiond::train::dataset::Dataset::new(7).sample(0);
    let source = Picture(diffusiond::train::render::render(&sample.scene, 32));
    let error = |steps: usize| {
        let spec = RequestSpec {
            prompt: sample.caption.clone(),
            n: 1,
            seed: Some(1),
            stages: Some(1),
            steps: Some(steps),
            guidance_scale: Some(1.0),
            source: Some(SourceSpec::Invert { image: source.clone(), prompt: Some(sample.caption.clone()) }),
            ..Default::default()
        };
        let out = generate(&cascade, &cascade.plan(&spec).unwrap()).remove(0).image;
        let sum: f64 = out.pixels().zip(source.0.pixels()).map(|(a, b)| (0..3).map(|c| (f64::from(a.0[c]) - f64::from(b.0[c])).powi(2)).sum::<f64>()).sum();
        (sum / (32.0 * 32.0 * 3.0)).sqrt()
    };
    let errors: Vec<f64> = [4, 16, 64].into_iter().map(error).collect();
    println!("\"{}\": inversion → reconstruction RMS error (8-bit levels) at 4 / 16 / 64 steps: {errors:.2?}", sample.caption);
    assert!(errors[0] > errors[1] && errors[1] > errors[2], "{errors:?}");
}

#[test]
fn every_kind_gives_the_same_images_alone_and_batched() {
    let cascade = cascade();
    let specs = [
        spec(None),
        RequestSpec { n: 2, ..spec(Some(SourceSpec::Image { image: image32(), strength: Some(0.6) })) },
        spec(Some(SourceSpec::Inpaint { image: image32(), mask: mask32(), strength: Some(0.9) })),
        RequestSpec { prompt: String::new(), ..spec(Some(SourceSpec::Upscale { image: image32().resized((16, 16)) })) },
        RequestSpec { steps: Some(6), ..spec(Some(SourceSpec::Invert { image: image32(), prompt: None })) },
        RequestSpec { n: 2, noise: NoiseMix::Variation { seed: 8, strength: 0.4 }, ..spec(None) },
        RequestSpec { n: 3, noise: NoiseMix::Interpolation { seed: 9, prompt: Some("a blue ring".into()) }, ..spec(None) },
    ];
    let requests: Vec<GenerationRequest> = specs.iter().map(|s| cascade.plan(s).unwrap()).collect();
    let batched = generate_many(&cascade, &requests, 64, &mut |_| {}).unwrap();
    for ((k, request), together) in requests.iter().enumerate().zip(batched) {
        let alone = generate(&cascade, request);
        assert_eq!(alone.len(), together.len());
        for (a, b) in alone.iter().zip(&together) {
            let worst = a.image.as_raw().iter().zip(b.image.as_raw()).map(|(x, y)| x.abs_diff(*y)).max();
            assert!(a.image == b.image, "request {k} ({:?}) image {} differs batched by up to {worst:?}", specs[k].source.is_some(), a.index);
        }
    }
}

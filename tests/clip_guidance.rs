//! GLIDE's CLIP guidance on a copy of the tiny fixture cascade with a tiny
//! random noised CLIP next to it: scale 0 changes no bit, a positive scale
//! changes the images, the shift of one step is √(1 − ᾱ_t)·s·∇ computed by
//! hand, and a guided image is the same bits alone, batched with an unguided
//! job (synchronously and in the worker), and at any position of its request.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use common::cascade::{assert_guided_batch_invariant, ddim_spec, generate, pixels};
use common::clip::{cascade_with_clip, cli_generate, cli_refused_without_clip, clip_config};
use common::fixture_dir;
use common::worker::{assert_same_as_alone, run_jobs, start_worker};
use diffusiond::diffusion::forward::{to_x0_and_eps, NoiseLevel};
use diffusiond::diffusion::PredictionType;
use diffusiond::jobs::embedded::EmbeddedStore;
use diffusiond::jobs::JobStore;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, ClipGuide, ClipJob, GeneratedImage, GenerationRequest, LoadOptions, PipelineError, RequestSpec};
use tch::{Device, Kind, Tensor};

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

fn spec(n: usize, seed: u64, clip: Option<f32>) -> RequestSpec {
    RequestSpec { clip_guidance_scale: clip, ..ddim_spec("a red circle on top of a blue square", n, seed) }
}

#[test]
fn scale_zero_changes_nothing_and_a_positive_scale_changes_the_images() {
    let dir = cascade_with_clip("zero", &clip_config(16, 32), 11);
    let plain = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
    let with_clip = Cascade::load(&dir, &CPU).unwrap();
    assert!(plain.clip().is_none() && with_clip.clip().is_some());
    assert_eq!(with_clip.info().stages[0].0.clip_image_size, Some(16));

    let reference = generate(&plain, &spec(2, 3, None));
    assert_eq!(pixels(&generate(&with_clip, &spec(2, 3, None))), pixels(&reference));
    let zero = generate(&with_clip, &spec(2, 3, Some(0.0)));
    assert_eq!(pixels(&zero), pixels(&reference), "scale 0 is no guidance at all");

    let guided = generate(&with_clip, &spec(2, 3, Some(100.0)));
    for (g, r) in guided.iter().zip(&reference) {
        let changed = g.image.as_raw().iter().zip(r.image.as_raw()).filter(|(a, b)| a != b).count();
        assert!(changed > 0, "image {} did not change", g.index);
    }
    // The record says how the image was made.
    assert_eq!(guided[0].record.stages[0].clip_guidance_scale, 100.0);
    assert!(guided[0].record.parameters().contains("CLIP guidance: 100"), "{}", guided[0].record.parameters());
    // On a cascade without a CLIP the request is refused, naming the field.
    match plain.plan(&spec(1, 3, Some(1.0))) {
        Err(PipelineError::Invalid { field, .. }) => assert_eq!(field, "clip_guidance_scale"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guided_image_is_the_same_alone_batched_and_anywhere_in_its_request() {
    let dir = cascade_with_clip("batch", &clip_config(16, 32), 12);
    assert_guided_batch_invariant(&Cascade::load(&dir, &CPU).unwrap(), |n, seed| spec(n, seed, Some(50.0)));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// ∇_x (f(x, t)·g) through the CLIP's public API, independently of the pipeline.
fn hand_gradient(clip: &ClipGuide, x: &Tensor, t: i64, text: &Tensor) -> Tensor {
    tch::with_grad(|| {
        let rows: Vec<Tensor> = (0..x.size()[0])
            .map(|i| {
                let xi = x.narrow(0, i, 1).detach().set_requires_grad(true);
                let image = clip.model().image_embeds(&xi, &Tensor::from_slice(&[t])).unwrap();
                let score = (image * text.narrow(0, i, 1)).sum(Kind::Float);
                score.backward();
                xi.grad()
            })
            .collect();
        Tensor::cat(&rows, 0)
    })
}

#[test]
fn one_step_shifts_eps_by_the_scaled_clip_gradient() {
    let dir = cascade_with_clip("shift", &clip_config(16, 32), 13);
    let c = Cascade::load(&dir, &CPU).unwrap();
    let clip = c.clip().unwrap();
    let schedule = Arc::clone(c.stages[0].scheduler.schedule());
    tch::manual_seed(5);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([2, 3, 16, 16], opts);
    let text = clip.text_embeds(&c.encoder, &["a red circle", "two blue squares"]).unwrap();
    let (t, scale) = (600i64, 7.0f32);
    let level = NoiseLevel::new(schedule.alpha_bar(t));
    // The pipeline's first (its layers settle how a single image runs), then by hand.
    let pipeline_grad = clip.gradient(&x, t, &text).unwrap();
    let grad = hand_gradient(clip, &x, t, &text);
    assert!(grad.abs().max().double_value(&[]) > 0.0, "a random CLIP still has a gradient");
    assert!(pipeline_grad.equal(&grad), "the pipeline's gradient is the hand-computed one");

    // A finite difference along one direction agrees with the gradient.
    let dir_u = Tensor::randn([1, 3, 16, 16], opts);
    let score = |x: &Tensor| {
        let e = tch::no_grad(|| clip.model().image_embeds(x, &Tensor::from_slice(&[t])).unwrap());
        (e * text.narrow(0, 0, 1)).sum(Kind::Double).double_value(&[])
    };
    let h = 1e-2;
    let x0 = x.narrow(0, 0, 1);
    let numeric = (score(&(&x0 + &dir_u * h)) - score(&(&x0 - &dir_u * h))) / (2.0 * h);
    let analytic = (grad.narrow(0, 0, 1) * &dir_u).sum(Kind::Double).double_value(&[]);
    assert!((numeric - analytic).abs() <= 0.05 * analytic.abs().max(1e-3), "finite difference {numeric} vs gradient {analytic}");

    // ε-prediction with learned variance (the fixture's base stage): ε moves
    // by −√(1 − ᾱ_t)·s·∇ and the variance channels stay as they were.
    let output = Tensor::randn([2, 6, 16, 16], opts);
    let job = ClipJob::new(text.shallow_clone(), scale, PredictionType::Epsilon, Arc::clone(&schedule));
    let guided = clip.guide(&job, &output, &x, t).unwrap();
    let want = output.narrow(1, 0, 3) - &grad * (level.sqrt_one_minus_alpha_bar * scale) as f64;
    assert!(guided.narrow(1, 0, 3).allclose(&want, 1e-6, 1e-6, false));
    assert!(guided.narrow(1, 3, 3).equal(&output.narrow(1, 3, 3)));

    // v-prediction (the default cascade's base stage): the output comes back
    // as v, whose ε is the guided ε.
    let v = Tensor::randn([2, 3, 16, 16], opts);
    let job = ClipJob::new(text.shallow_clone(), scale, PredictionType::VPrediction, Arc::clone(&schedule));
    let guided_v = clip.guide(&job, &v, &x, t).unwrap();
    let (_, eps) = to_x0_and_eps(PredictionType::VPrediction, &v, &x, level);
    let (_, eps_guided) = to_x0_and_eps(PredictionType::VPrediction, &guided_v, &x, level);
    let shift = eps_guided - eps;
    let want = &grad * -((level.sqrt_one_minus_alpha_bar * scale) as f64);
    assert!(shift.allclose(&want, 1e-4, 1e-4, false), "max diff {}", (&shift - &want).abs().max().double_value(&[]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_clip_of_another_encoder_is_a_model_error_and_one_of_another_size_refuses_requests() {
    let dir = cascade_with_clip("encoder", &clip_config(16, 24), 14);
    let err = Cascade::load(&dir, &CPU).unwrap_err();
    assert!(matches!(err, PipelineError::Model { .. }), "{err:?}");
    assert!(err.to_string().contains("text_hidden_size 24"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = cascade_with_clip("size", &clip_config(32, 32), 15);
    let c = Cascade::load(&dir, &CPU).unwrap();
    match c.plan(&spec(1, 1, Some(2.0))) {
        Err(PipelineError::Invalid { field, reason }) => {
            assert_eq!(field, "clip_guidance_scale");
            assert!(reason.contains("32x32") && reason.contains("16x16"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(c.plan(&spec(1, 1, Some(0.0))).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn requests_stored_before_clip_guidance_still_read() {
    let dir = cascade_with_clip("serde", &clip_config(16, 32), 16);
    let c = Cascade::load(&dir, &CPU).unwrap();
    let request = c.plan(&spec(1, 1, Some(3.0))).unwrap();
    let mut value = serde_json::to_value(&request).unwrap();
    assert_eq!(value["stages"][0]["clip_guidance_scale"], 3.0);
    assert!(value["stages"][1].get("clip_guidance_scale").is_none(), "written only where set");
    value["stages"][0].as_object_mut().unwrap().remove("clip_guidance_scale");
    let old: GenerationRequest = serde_json::from_value(value).unwrap();
    assert_eq!(old.stages[0].clip_guidance_scale, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_worker_batches_a_guided_job_with_unguided_ones_without_changing_a_bit() {
    let dir = cascade_with_clip("worker", &clip_config(16, 32), 17);
    let c = Cascade::load(&dir, &CPU).unwrap();
    let requests = [
        c.plan(&RequestSpec { prompt: "two green stars".into(), ..spec(1, 30, None) }).unwrap(),
        c.plan(&spec(2, 31, Some(40.0))).unwrap(),
        c.plan(&RequestSpec { steps: Some(4), ..spec(1, 33, None) }).unwrap(),
    ];
    let alone: Vec<Vec<GeneratedImage>> = requests.iter().map(|r| c.generate(r, &mut |_| ControlFlow::Continue(())).unwrap()).collect();

    let store_dir = dir.join("store");
    let store: Arc<dyn JobStore> = Arc::new(EmbeddedStore::open(&store_dir).unwrap());
    let worker = start_worker(&dir, store.clone(), false);
    let records = run_jobs(&worker, store.as_ref(), &requests, Duration::from_secs(60));
    assert_same_as_alone(store.as_ref(), &records, &alone);
    let sequential: usize = requests.iter().map(|r| c.total_steps(r)).sum();
    let calls = worker.stats.unet_calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(calls < sequential as u64, "the jobs shared UNet calls ({calls} calls vs {sequential} one at a time)");
    worker.queue.close();
    worker.thread.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_command_line_guides_generate_and_eval() {
    let dir = cascade_with_clip("cli", &clip_config(16, 32), 18);
    let file = cli_generate(&dir, "a red circle on top of a blue square", &["--clip-guidance", "30"]);
    let written = image::open(&file).unwrap().to_rgb8();
    let c = Cascade::load(&dir, &CPU).unwrap();
    let want = generate(&c, &spec(1, 4, Some(30.0))).remove(0);
    assert_eq!(written.as_raw(), want.image.as_raw(), "the CLI's image is the library's");
    let chunks = diffusiond::pipeline::png::read_text_chunks(&std::fs::read(&file).unwrap()).unwrap();
    assert!(chunks.iter().any(|(k, v)| k == "parameters" && v.contains("CLIP guidance: 30")), "{chunks:?}");

    // Without a CLIP the request is refused before anything runs.
    let stderr = cli_refused_without_clip(&dir.join("out"), &["--clip-guidance", "5"]);
    assert!(stderr.contains("clip_guidance_scale"), "{stderr}");

    // The benchmark labels its row with the guidance it applied.
    let eval = std::process::Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["eval", "--per-category", "1", "--images", "1", "--size", "16", "--clip-guidance", "10", "--device", "cpu", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let table = String::from_utf8(eval.stdout).unwrap();
    assert!(table.contains("CLIP guidance 10"), "{table}");
    std::fs::remove_dir_all(&dir).unwrap();
}

//! ADM's classifier guidance with the noised CLIP as the noisy classifier, on
//! a copy of the tiny fixture cascade with a tiny random CLIP next to it:
//! scale 0 changes no bit and a positive scale changes the images; one
//! step's shift is −√(1 − ᾱ_t)·s·∇ log p(y | x_t) with the log-probability
//! computed by hand over the prompt and its contrasts (and checked by finite
//! differences); a guided image is the same bits alone, batched and with CLIP
//! guidance on top; the plan, the record, the CLI and eval carry the scale.

mod common;

use std::sync::Arc;

use common::cascade::{assert_guided_batch_invariant, ddim_spec, generate, pixels};
use common::clip::{cascade_with_clip, cli_generate, cli_refused_without_clip, clip_config};
use common::fixture_dir;
use diffusiond::diffusion::forward::{to_x0_and_eps, NoiseLevel};
use diffusiond::diffusion::PredictionType;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::classifier_labels::labels;
use diffusiond::pipeline::{Cascade, ClassifierJob, ClipGuide, GenerationRequest, LoadOptions, PipelineError, RequestSpec};
use tch::{Device, Kind, Tensor};

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

const PROMPT: &str = "a red circle on top of a blue square";

fn spec(n: usize, seed: u64, classifier: Option<f32>) -> RequestSpec {
    RequestSpec { classifier_guidance_scale: classifier, ..ddim_spec(PROMPT, n, seed) }
}

#[test]
fn scale_zero_changes_nothing_and_a_positive_scale_changes_the_images() {
    let dir = cascade_with_clip("classifier-zero", &clip_config(16, 32), 21);
    let plain = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
    let c = Cascade::load(&dir, &CPU).unwrap();
    let reference = generate(&plain, &spec(2, 3, None));
    assert_eq!(pixels(&generate(&c, &spec(2, 3, Some(0.0)))), pixels(&reference), "scale 0 is no guidance at all");

    let guided = generate(&c, &spec(2, 3, Some(100.0)));
    for (g, r) in guided.iter().zip(&reference) {
        let changed = g.image.as_raw().iter().zip(r.image.as_raw()).filter(|(a, b)| a != b).count();
        assert!(changed > 0, "image {} did not change", g.index);
    }
    // Classifier guidance is not CLIP guidance at the same scale.
    let clip = generate(&c, &RequestSpec { clip_guidance_scale: Some(100.0), ..spec(2, 3, None) });
    assert_ne!(pixels(&clip), pixels(&guided));
    assert_eq!(guided[0].record.stages[0].classifier_guidance_scale, 100.0);
    assert_eq!(guided[0].record.stages[1].classifier_guidance_scale, 0.0);
    assert!(guided[0].record.parameters().contains("Classifier guidance: 100"), "{}", guided[0].record.parameters());

    // Refused before anything runs: no CLIP, out of range, not a number.
    let field = |r: diffusiond::pipeline::Result<GenerationRequest>| match r {
        Err(PipelineError::Invalid { field, reason }) => format!("{field}: {reason}"),
        other => panic!("{other:?}"),
    };
    assert!(field(plain.plan(&spec(1, 3, Some(1.0)))).starts_with("classifier_guidance_scale: this cascade has no noised CLIP"));
    assert!(field(c.plan(&spec(1, 3, Some(100.5)))).starts_with("classifier_guidance_scale"));
    assert!(field(c.plan(&spec(1, 3, Some(f32::NAN)))).starts_with("classifier_guidance_scale"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// log p(y | x) over [own; others] through the CLIP's public API.
fn hand_log_prob(clip: &ClipGuide, x: &Tensor, t: i64, own: &Tensor, others: &Tensor) -> Tensor {
    let image = clip.model().image_embeds(x, &Tensor::from_slice(&[t])).unwrap();
    let classes = Tensor::cat(&[own, others], 0);
    let logits = image.matmul(&classes.tr()) * clip.model().logit_scale();
    logits.select(1, 0) - logits.logsumexp([1], false)
}

#[test]
fn one_step_shifts_eps_by_the_scaled_gradient_of_the_log_probability() {
    let dir = cascade_with_clip("classifier-shift", &clip_config(16, 32), 22);
    let c = Cascade::load(&dir, &CPU).unwrap();
    let clip = c.clip().unwrap();
    let schedule = Arc::clone(c.stages[0].scheduler.schedule());
    let classes = labels(&[PROMPT]);
    let refs: Vec<&str> = classes.iter().map(String::as_str).collect();
    let others = clip.text_embeds(&c.encoder, &refs).unwrap();
    let own = clip.text_embeds(&c.encoder, &[PROMPT]).unwrap().expand([2, -1], false).contiguous();
    let (t, scale) = (600i64, 5.0f32);
    let job = ClassifierJob::new(own.shallow_clone(), others.shallow_clone(), scale, PredictionType::Epsilon, Arc::clone(&schedule)).unwrap();
    assert_eq!(job.classes(), classes.len() as i64 + 1);

    tch::manual_seed(6);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([2, 3, 16, 16], opts);
    let grad = job.gradient(clip, &x, t).unwrap();
    let hand = tch::with_grad(|| {
        let rows: Vec<Tensor> = (0..2)
            .map(|i| {
                let xi = x.narrow(0, i, 1).detach().set_requires_grad(true);
                hand_log_prob(clip, &xi, t, &own.narrow(0, i, 1), &others).sum(Kind::Float).backward();
                xi.grad()
            })
            .collect();
        Tensor::cat(&rows, 0)
    });
    assert!(grad.abs().max().double_value(&[]) > 0.0);
    assert!(grad.allclose(&hand, 1e-6, 1e-7, false), "max diff {}", (&grad - &hand).abs().max().double_value(&[]));

    // The log-probabilities are those of a distribution, and a finite
    // difference along a random direction agrees with the gradient.
    let log_p = job.log_prob(clip, &x, t).unwrap();
    assert!(log_p.max().double_value(&[]) < 0.0 && log_p.min().double_value(&[]) > -(job.classes() as f64).ln() * 10.0, "{log_p}");
    let u = Tensor::randn([1, 3, 16, 16], opts);
    let h = 1e-2;
    let x0 = x.narrow(0, 0, 1);
    let f = |x: &Tensor| job.log_prob(clip, &Tensor::cat(&[x.shallow_clone(), x.shallow_clone()], 0), t).unwrap().double_value(&[0]);
    let numeric = (f(&(&x0 + &u * h)) - f(&(&x0 - &u * h))) / (2.0 * h);
    let analytic = (grad.narrow(0, 0, 1) * &u).sum(Kind::Double).double_value(&[]);
    assert!((numeric - analytic).abs() <= 0.05 * analytic.abs().max(1e-3), "finite difference {numeric} vs gradient {analytic}");

    // ε-prediction with learned variance: ε moves by −√(1 − ᾱ_t)·s·∇ log p,
    // the variance channels stay; v-prediction hands back the same ε shift.
    let level = NoiseLevel::new(schedule.alpha_bar(t));
    let output = Tensor::randn([2, 6, 16, 16], opts);
    let guided = job.guide(clip, &output, &x, t).unwrap();
    let want = output.narrow(1, 0, 3) - &grad * (level.sqrt_one_minus_alpha_bar * scale) as f64;
    assert!(guided.narrow(1, 0, 3).allclose(&want, 1e-6, 1e-6, false));
    assert!(guided.narrow(1, 3, 3).equal(&output.narrow(1, 3, 3)));
    let job_v = ClassifierJob::new(own, others, scale, PredictionType::VPrediction, schedule).unwrap();
    let v = Tensor::randn([2, 3, 16, 16], opts);
    let (_, eps) = to_x0_and_eps(PredictionType::VPrediction, &v, &x, level);
    let (_, eps_guided) = to_x0_and_eps(PredictionType::VPrediction, &job_v.guide(clip, &v, &x, t).unwrap(), &x, level);
    let shift = eps_guided - eps;
    assert!(shift.allclose(&(&grad * -((level.sqrt_one_minus_alpha_bar * scale) as f64)), 1e-4, 1e-4, false));

    // Labels and classes of different widths are refused.
    let narrow = Tensor::zeros([3, 8], opts);
    assert!(ClassifierJob::new(narrow, Tensor::zeros([4, 16], opts), 1.0, PredictionType::Epsilon, Arc::clone(c.stages[0].scheduler.schedule())).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guided_image_is_the_same_alone_and_batched_also_with_clip_guidance_on_top() {
    let dir = cascade_with_clip("classifier-batch", &clip_config(16, 32), 23);
    let c = Cascade::load(&dir, &CPU).unwrap();
    assert_guided_batch_invariant(&c, |n, seed| spec(n, seed, Some(40.0)));
    assert_guided_batch_invariant(&c, |n, seed| RequestSpec { clip_guidance_scale: Some(20.0), ..spec(n, seed, Some(40.0)) });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_interpolation_is_classified_against_both_prompts_contrasts() {
    use diffusiond::pipeline::NoiseMix;
    let dir = cascade_with_clip("classifier-mix", &clip_config(16, 32), 24);
    let c = Cascade::load(&dir, &CPU).unwrap();
    let mix = |scale| RequestSpec { n: 3, noise: NoiseMix::Interpolation { seed: 8, prompt: Some("two green stars".into()) }, ..spec(3, 7, scale) };
    let plain = generate(&c, &mix(None));
    let guided = generate(&c, &mix(Some(60.0)));
    assert_eq!(guided.len(), 3);
    for (g, p) in guided.iter().zip(&plain) {
        assert_ne!(g.image.as_raw(), p.image.as_raw(), "frame {} is guided", g.index);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn requests_stored_before_classifier_guidance_still_read() {
    let dir = cascade_with_clip("classifier-serde", &clip_config(16, 32), 25);
    let c = Cascade::load(&dir, &CPU).unwrap();
    let request = c.plan(&spec(1, 1, Some(3.0))).unwrap();
    let mut value = serde_json::to_value(&request).unwrap();
    assert_eq!(value["stages"][0]["classifier_guidance_scale"], 3.0);
    assert!(value["stages"][1].get("classifier_guidance_scale").is_none(), "written only where set");
    assert_eq!(serde_json::from_value::<GenerationRequest>(value.clone()).unwrap(), request);
    value["stages"][0].as_object_mut().unwrap().remove("classifier_guidance_scale");
    let old: GenerationRequest = serde_json::from_value(value).unwrap();
    assert_eq!(old.stages[0].classifier_guidance_scale, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_command_line_guides_generate_and_labels_eval_rows() {
    let dir = cascade_with_clip("classifier-cli", &clip_config(16, 32), 26);
    let file = cli_generate(&dir, PROMPT, &["--classifier-guidance", "30"]);
    let written = image::open(&file).unwrap().to_rgb8();
    let c = Cascade::load(&dir, &CPU).unwrap();
    let want = generate(&c, &spec(1, 4, Some(30.0))).remove(0);
    assert_eq!(written.as_raw(), want.image.as_raw(), "the CLI's image is the library's");
    let stderr = cli_refused_without_clip(&dir.join("out"), &["--classifier-guidance", "5"]);
    assert!(stderr.contains("classifier_guidance_scale"), "{stderr}");

    // The modes table: classifier-free guidance off, alone and with each mode.
    let eval = std::process::Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["eval", "--per-category", "1", "--images", "1", "--size", "16", "--table", "modes", "--rows", "1,4,7", "--device", "cpu", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let table = String::from_utf8(eval.stdout).unwrap();
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ddim") || l.starts_with("| ddpm")).collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(rows[0].contains("guidance 1 |"), "{table}");
    assert!(rows[1].contains("guidance 1, classifier guidance 3 |"), "{table}");
    let default = c.stages[0].defaults.guidance_scale;
    assert!(rows[2].contains(&format!("guidance {default}, CLIP guidance 10 |")), "{table}");
    std::fs::remove_dir_all(&dir).unwrap();
}

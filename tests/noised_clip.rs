//! The noised CLIP trained for a few dozen steps on 16-pixel renders with the
//! tiny BERT fixture: the contrastive loss falls on held-out batches, and a
//! run stopped and resumed from its checkpoint continues at the step it
//! stopped at, ending with exactly the weights of an uninterrupted run; its
//! exported folder then evaluates.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use diffusiond::eval::retrieval::{evaluate, RetrievalConfig};
use diffusiond::nn::noised_clip::{LoadedNoisedClip, ModelInputs, NoisedClipConfig};
use diffusiond::nn::text::{TextEncoder, TextEncoderOptions};
use diffusiond::train::clip::{noise_schedule, ClipBatchSource, ClipRun, ClipTrainConfig, ClipTrainer};
use diffusiond::train::dataset::Dataset;
use diffusiond::train::optim::{OptimConfig, Optimizer};
use tch::Device;

/// Weight initialisation draws from libtorch's one global generator; tests
/// that seed it and build a model take turns, so that a seed means one start.
static GLOBAL_RNG: Mutex<()> = Mutex::new(());

fn tiny_bert() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/tiny-bert")
}

fn model_config() -> serde_json::Value {
    serde_json::json!({"image_size": 16, "block_out_channels": [8, 16], "layers_per_block": 1, "embed_dim": 16,
        "text_hidden_size": 32, "num_train_timesteps": 1000, "norm_num_groups": 4})
}

fn scheduler() -> serde_json::Value {
    serde_json::json!({"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})
}

#[test]
fn the_contrastive_loss_falls_on_held_out_batches() {
    let clip = {
        let _turn = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(0);
        let config: NoisedClipConfig = serde_json::from_value(model_config()).unwrap();
        LoadedNoisedClip::random(&config).unwrap()
    };
    let encoder = TextEncoder::load(&tiny_bert(), &TextEncoderOptions { max_length: Some(16), ..Default::default() }).unwrap();
    let schedule = noise_schedule(&scheduler()).unwrap();
    let source = ClipBatchSource { dataset: Dataset::new(1), size: 16, batch: 16, seed: 5, clean_fraction: 0.5, train_steps: 1000 };
    let trainer = ClipTrainer { model: &clip.model, encoder: &encoder, schedule: &schedule, source };
    let mut opt = Optimizer::new(&clip.vs, OptimConfig { lr: 3e-3, warmup_steps: 5, ..Default::default() });
    // Fixed batches the steps below never draw, so the comparison is between equal data.
    let eval = |t: &ClipTrainer| tch::no_grad(|| (1000..1004).map(|k| t.loss(k).unwrap().total.double_value(&[])).sum::<f64>() / 4.0);
    let before = eval(&trainer);
    for _ in 0..40 {
        let r = trainer.step(&mut opt).unwrap();
        assert!(r.loss.is_finite() && r.logit_scale > 0.0 && r.logit_scale <= 100.0);
    }
    let after = eval(&trainer);
    println!("contrastive loss on held-out batches: {before:.3} -> {after:.3}");
    assert!(after < before * 0.85, "{before} -> {after}");
}

#[test]
fn a_stopped_run_resumes_at_its_step_and_ends_as_an_uninterrupted_one() {
    let dir = std::env::temp_dir().join(format!("diffusiond-noised-clip-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config: ClipTrainConfig = serde_json::from_value(serde_json::json!({
        "seed": 3, "encoder": tiny_bert(), "max_length": 16, "size": 16, "model": model_config(), "scheduler": scheduler(),
        "steps": 6, "batch": 6, "lr": 1e-3, "warmup_steps": 2, "clean_fraction": 0.25, "checkpoint_every": 2
    }))
    .unwrap();
    let run = |name: &str| ClipRun { config: config.clone(), out: dir.join(name), device: Device::Cpu, max_seconds: None };
    let _turn = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());

    assert_eq!(run("straight").train(None, &mut |_, _, _| {}).unwrap(), 6);
    // Stopped at step 3 (between checkpoints: the stop writes one), then resumed.
    assert_eq!(run("split").train(Some(3), &mut |_, _, _| {}).unwrap(), 3);
    let mut steps = Vec::new();
    assert_eq!(run("split").train(None, &mut |step, loss, _| steps.push((step, loss))).unwrap(), 6);
    assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), [4, 5, 6], "the resumed run continues at step 4");
    assert!(steps.iter().all(|s| s.1.is_finite()));
    let log = std::fs::read_to_string(dir.join("split/train.log")).unwrap();
    assert!(log.contains("# started at step 0") && log.contains("# resumed at step 3"), "{log}");
    assert_eq!(log.lines().filter(|l| l.starts_with("step ")).count(), 6, "{log}");

    let load = |name: &str| LoadedNoisedClip::load(&dir.join(name).join("checkpoint"), Device::Cpu).unwrap();
    let (a, b) = (load("straight").vs.variables(), load("split").vs.variables());
    let differing: Vec<&String> = a.keys().filter(|k| !a[*k].equal(&b[*k])).collect();
    assert!(differing.is_empty(), "resumed weights differ: {differing:?}");
    // A run already at its end does nothing more.
    assert_eq!(run("split").train(None, &mut |_, _, _| panic!("no step left")).unwrap(), 6);

    // The exported folder names its encoder and schedule, and evaluates.
    let export = dir.join("model");
    run("split").export(&export).unwrap();
    let inputs = ModelInputs::read(&export).unwrap();
    assert_eq!((inputs.max_length, inputs.train_seed), (16, 3));
    let clip = LoadedNoisedClip::load(&export, Device::Cpu).unwrap();
    let encoder = TextEncoder::load(&inputs.text_encoder, &TextEncoderOptions { max_length: Some(inputs.max_length), ..Default::default() }).unwrap();
    let schedule = noise_schedule(&inputs.scheduler).unwrap();
    let eval = RetrievalConfig { samples: 24, candidates: 4, seed: !3, timesteps: vec![0, 500] };
    let report = evaluate(&clip.model, &encoder, &schedule, &eval).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(report.rows.iter().map(|r| r.t).collect::<Vec<_>>(), [0, 500]);
    for r in &report.rows {
        assert!((0.0..=1.0).contains(&r.image_to_text) && (0.0..=1.0).contains(&r.text_to_image), "{r:?}");
    }
    println!("{}", report.markdown());
}

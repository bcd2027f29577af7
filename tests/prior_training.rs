//! DALL-E 2's prior trained for a few dozen steps in the embedding space of
//! a tiny random noised CLIP (with the tiny BERT fixture as its encoder): the
//! x₀ loss falls on held-out batches; a run stopped and resumed ends with
//! exactly the weights of an uninterrupted one; the export is a
//! `PriorTransformer` folder with its scheduler whose statistics map the
//! latents back to CLIP embeddings.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use diffusiond::diffusion::{Scheduler, SchedulerConfig};
use diffusiond::eval::prior::{evaluate, PriorEvalConfig};
use diffusiond::nn::noised_clip::{LoadedNoisedClip, ModelInputs, NoisedClipConfig};
use diffusiond::nn::unclip::{LoadedPrior, PriorInput};
use diffusiond::train::clip::noise_schedule;
use diffusiond::train::dataset::Dataset;
use diffusiond::train::optim::{OptimConfig, Optimizer};
use diffusiond::train::clip::FrozenClip;
use diffusiond::train::prior::{embedding_statistics, PriorBatchSource, PriorRun, PriorTrainConfig, PriorTrainer};
use tch::{Device, Kind, Tensor};

/// Weight initialisation draws from libtorch's one global generator.
static GLOBAL_RNG: Mutex<()> = Mutex::new(());

fn tiny_bert() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/tiny-bert")
}

fn scheduler() -> serde_json::Value {
    serde_json::json!({"_class_name": "UnCLIPScheduler", "num_train_timesteps": 1000, "variance_type": "fixed_small_log",
        "clip_sample": true, "clip_sample_range": 5.0, "prediction_type": "sample"})
}

/// A random 16-pixel CLIP with a 16-wide embedding, saved with its inputs under `dir`.
fn clip_dir(dir: &Path) -> PathBuf {
    let config = NoisedClipConfig { image_size: 16, block_out_channels: vec![8, 16], layers_per_block: 1, embed_dim: 16, text_hidden_size: 32, num_train_timesteps: 1000, norm_num_groups: 4 };
    tch::manual_seed(9);
    let clip = LoadedNoisedClip::random(&config).unwrap();
    let out = dir.join("clip");
    clip.save(&out).unwrap();
    let ddpm = serde_json::json!({"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000});
    ModelInputs { text_encoder: tiny_bert(), max_length: 16, scheduler: ddpm, train_seed: 4 }.write(&out).unwrap();
    out
}

fn config(clip: &Path) -> PriorTrainConfig {
    serde_json::from_value(serde_json::json!({
        "seed": 2, "clip": clip,
        "model": {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "embedding_dim": 16,
            "num_embeddings": 0, "additional_embeddings": 4, "norm_in_type": "layer", "encoder_hid_proj_type": null},
        "scheduler": scheduler(),
        "steps": 6, "batch": 8, "lr": 1e-3, "warmup_steps": 2, "cooldown_steps": 2, "ema_decay": 0.9, "uncond_fraction": 0.25, "checkpoint_every": 2
    }))
    .unwrap()
}

#[test]
fn the_prior_loss_falls_on_held_out_batches() {
    let dir = std::env::temp_dir().join(format!("diffusiond-prior-loss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _turn = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let teacher = FrozenClip::load(&clip_dir(&dir), Device::Cpu).unwrap();
    let c = config(&dir.join("clip"));
    tch::manual_seed(1);
    let prior = LoadedPrior::random(&c.model).unwrap();
    let (mean, std) = embedding_statistics(&teacher, &Dataset::new(77), 16, 256).unwrap();
    prior.set_statistics(&mean, &std).unwrap();
    // The latents of the statistics' own renders are standardised.
    let (images, _) = Dataset::new(77).batch_samples(&(0..256).collect::<Vec<u64>>(), 16).unwrap();
    let latents = prior.to_latents(&teacher.image_embeds(&images).unwrap());
    assert!(latents.mean(Kind::Float).abs().double_value(&[]) < 1e-4);
    assert!((latents.std(true).double_value(&[]) - 1.0).abs() < 0.05);

    let schedule = noise_schedule(&c.scheduler).unwrap();
    let source = PriorBatchSource { dataset: Dataset::new(4), size: 16, batch: 32, seed: 5, uncond_fraction: 0.1, train_steps: 1000, width: 16 };
    let empty = teacher.text_embeds(&[""]).unwrap();
    let trainer = PriorTrainer { prior: &prior, teacher: &teacher, schedule: &schedule, source, empty };
    let mut opt = Optimizer::new(&prior.vs, OptimConfig { lr: 3e-3, warmup_steps: 5, ..Default::default() });
    let names: Vec<String> = prior.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n == "clip_mean" || n == "clip_std"), "the statistics are not trained");
    let eval = |t: &PriorTrainer| tch::no_grad(|| (1000..1004).map(|k| t.loss(k).unwrap().total.double_value(&[])).sum::<f64>() / 4.0);
    let before = eval(&trainer);
    for _ in 0..60 {
        let r = trainer.step(&mut opt).unwrap();
        assert!(r.loss.is_finite() && (-1.0..=1.0).contains(&r.cosine));
    }
    let after = eval(&trainer);
    println!("prior x0 loss on held-out batches: {before:.3} -> {after:.3}");
    assert!(after < before * 0.8, "{before} -> {after}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stopped_run_resumes_at_its_step_and_exports_a_prior_folder() {
    let dir = std::env::temp_dir().join(format!("diffusiond-prior-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _turn = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let clip = clip_dir(&dir);
    let run = |name: &str| PriorRun { config: config(&clip), out: dir.join(name), device: Device::Cpu, max_seconds: None };
    assert_eq!(run("straight").train(None, &mut |_, _, _| {}).unwrap(), 6);
    assert_eq!(run("split").train(Some(3), &mut |_, _, _| {}).unwrap(), 3);
    let mut steps = Vec::new();
    assert_eq!(run("split").train(None, &mut |step, loss, _| steps.push((step, loss))).unwrap(), 6);
    assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), [4, 5, 6]);
    let log = std::fs::read_to_string(dir.join("split/train.log")).unwrap();
    assert!(log.contains("# started at step 0") && log.contains("# resumed at step 3"), "{log}");
    let load = |name: &str| LoadedPrior::load(&dir.join(name).join("checkpoint"), Device::Cpu, Kind::Float).unwrap();
    let (a, b) = (load("straight").vs.variables(), load("split").vs.variables());
    let differing: Vec<&String> = a.keys().filter(|k| !a[*k].equal(&b[*k])).collect();
    assert!(differing.is_empty(), "resumed weights differ: {differing:?}");
    assert_eq!(run("split").train(None, &mut |_, _, _| panic!("no step left")).unwrap(), 6);

    // The export: the EMA weights (not the live ones), the statistics, the scheduler.
    let export = dir.join("export");
    run("split").export(&export).unwrap();
    let prior = LoadedPrior::load(&export.join("prior"), Device::Cpu, Kind::Float).unwrap();
    let live = load("split");
    let (e, l) = (prior.vs.variables(), live.vs.variables());
    assert!(e["clip_std"].equal(&l["clip_std"]) && e["clip_std"].min().double_value(&[]) > 0.0);
    assert!(!e["proj_in.weight"].equal(&l["proj_in.weight"]), "the EMA is exported");
    let text = std::fs::read_to_string(export.join("prior/config.json")).unwrap();
    assert!(text.contains("\"_class_name\": \"PriorTransformer\""), "{text}");
    let sched = std::fs::read_to_string(export.join("prior_scheduler/scheduler_config.json")).unwrap();
    let scheduler = Scheduler::new(SchedulerConfig::from_json_str(&sched).unwrap()).unwrap();
    assert_eq!(scheduler.schedule().len(), 1000);
    // It runs as a prior: the sampled latents map back to CLIP-scale embeddings.
    let x = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
    let text = Tensor::randn([2, 16], (Kind::Float, Device::Cpu));
    let out = tch::no_grad(|| prior.model.forward(&PriorInput { hidden_states: &x, timesteps: &Tensor::from(10i64), proj_embedding: &text, encoder_hidden_states: None, attention_mask: None })).unwrap();
    assert_eq!(out.size(), [2, 16]);
    assert!(prior.to_latents(&prior.model.post_process_latents(&out)).allclose(&out, 1e-5, 1e-5, false));

    // And it evaluates: the text-embedding baseline, then one row per guidance scale.
    let teacher = FrozenClip::load(&clip, Device::Cpu).unwrap();
    let eval = PriorEvalConfig { samples: 24, candidates: 4, seed: 99, steps: 4, guidance_scales: vec![1.0, 3.0] };
    let report = evaluate(&prior, &scheduler, &teacher, &eval).unwrap();
    assert_eq!(report.rows.len(), 3);
    for r in &report.rows {
        assert!((0.0..=1.0).contains(&r.top1) && (-1.0..=1.0).contains(&r.cosine), "{r:?}");
    }
    assert_eq!(evaluate(&prior, &scheduler, &teacher, &eval).unwrap(), report, "seeded: the same numbers again");
    println!("{}", report.markdown());
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Training steps on a tiny random stage: the loss falls, a super-resolution
//! stage trains with noise-conditioning augmentation, and a run interrupted and
//! resumed from its checkpoint ends with exactly the weights of one that was not.

mod common;

use common::{fixture_dir, tiny_unet_config};
use diffusiond::diffusion::{BetaSchedule, NoiseSchedule};
use diffusiond::nn::text::{TextEncoder, TextEncoderOptions};
use diffusiond::nn::unet::LoadedUNet;
use diffusiond::train::dataset::Dataset;
use diffusiond::train::loss::HybridLoss;
use diffusiond::train::optim::{OptimConfig, Optimizer};
use diffusiond::train::trainer::{BatchSource, Precision, StageData, StageTrainer, StepConfig};
use tch::Kind;

fn unet(size: i64, sr: bool) -> LoadedUNet {
    LoadedUNet::random(&tiny_unet_config(size, sr)).unwrap()
}

fn encoder() -> TextEncoder {
    TextEncoder::load(&fixture_dir().join("text/tiny-bert"), &TextEncoderOptions { max_length: Some(16), ..Default::default() }).unwrap()
}

fn schedule() -> NoiseSchedule {
    NoiseSchedule::new(BetaSchedule::SquaredCosCapV2, 1000, 1e-4, 0.02).unwrap()
}

fn trainer<'a>(unet: &'a LoadedUNet, encoder: &'a TextEncoder, s: &'a NoiseSchedule, data: StageData) -> StageTrainer<'a> {
    grounded(unet, encoder, s, data, 0.0)
}

fn grounded<'a>(unet: &'a LoadedUNet, encoder: &'a TextEncoder, s: &'a NoiseSchedule, data: StageData, weight: f64) -> StageTrainer<'a> {
    StageTrainer {
        unet,
        encoder,
        schedule: s,
        noising: s,
        loss: HybridLoss::new(s, 0.001),
        source: BatchSource { data, config: StepConfig { batch: 8, uncond_prob: 0.1, seed: 5 }, dataset: Dataset::new(1), train_steps: s.len() as i64 },
        precision: Precision::F32,
        prefetch: None,
        grounding: weight,
    }
}

const BASE: StageData = StageData { size: 16, low_res: None, max_noise_level: 0, crop: None };

#[test]
fn the_loss_falls_on_a_tiny_base_stage() {
    tch::manual_seed(0);
    let (unet, encoder, s) = (unet(16, false), encoder(), schedule());
    let t = trainer(&unet, &encoder, &s, BASE);
    let mut opt = Optimizer::new(&unet.vs, OptimConfig { lr: 2e-3, warmup_steps: 5, ..Default::default() });
    // Fixed evaluation batches, so the comparison is not between different data.
    let eval = |t: &StageTrainer| (1000..1004).map(|k| t.loss(k).unwrap().terms.mse.double_value(&[])).sum::<f64>() / 4.0;
    let before = eval(&t);
    for _ in 0..40 {
        let r = t.step(&mut opt).unwrap();
        assert!(r.loss.is_finite());
    }
    let after = eval(&t);
    println!("eps MSE on held-out batches: {before:.3} -> {after:.3}");
    assert!(after < before * 0.8, "{before} -> {after}");
}

/// The grounding loss trains where caption words attend: on held-out
/// batches, the share of each colour/shape/count word's attention that falls
/// outside its objects shrinks, while the model still learns to denoise.
#[test]
fn grounding_moves_the_words_attention_onto_their_objects() {
    tch::manual_seed(3);
    let (unet, encoder, s) = (unet(16, false), encoder(), schedule());
    let t = grounded(&unet, &encoder, &s, BASE, 1.0);
    let mut opt = Optimizer::new(&unet.vs, OptimConfig { lr: 2e-3, warmup_steps: 5, ..Default::default() });
    let eval = |t: &StageTrainer| {
        (1000..1004).map(|k| t.loss(k).unwrap().grounding.expect("a grounded trainer").double_value(&[])).sum::<f64>() / 4.0
    };
    let before = eval(&t);
    for _ in 0..60 {
        let r = t.step(&mut opt).unwrap();
        let g = r.grounding.expect("the step reports its grounding loss");
        assert!(g.is_finite() && (0.0..=1.0).contains(&g) && r.loss.is_finite(), "{g}");
    }
    let after = eval(&t);
    println!("grounding loss on held-out batches: {before:.3} -> {after:.3}");
    assert!(before > 0.2 && after < before * 0.85, "{before} -> {after}");
    // Without a weight there is no grounding term at all.
    assert!(trainer(&unet, &encoder, &s, BASE).step(&mut opt).unwrap().grounding.is_none());
}

/// Recording attention maps computes attention without the fused kernel: the
/// same output, and maps whose rows are shares of one attention.
#[test]
fn the_probed_forward_pass_is_the_forward_pass() {
    use diffusiond::nn::unet::{AttentionMaps, UNetInput};
    tch::manual_seed(4);
    let (unet, encoder, s) = (unet(16, false), encoder(), schedule());
    let b = trainer(&unet, &encoder, &s, BASE).batch(7).unwrap();
    let t = tch::Tensor::from_slice(&b.timesteps);
    let input = UNetInput { sample: &b.sample, timesteps: &t, encoder_hidden_states: &b.text, class_labels: None, text_mask: None };
    let plain = unet.model.forward(&input).unwrap();
    let maps = AttentionMaps::default();
    let probed = unet.model.forward_probed(&input, false, Some(&maps)).unwrap();
    let err = (&plain - &probed).abs().max().double_value(&[]) / plain.abs().max().double_value(&[]);
    assert!(err < 1e-5, "relative difference {err}");
    let maps = maps.take();
    assert!(!maps.is_empty());
    for m in &maps {
        let [n, _, l] = m.size()[..] else { panic!("{:?}", m.size()) };
        assert_eq!((n, l), (8, 16));
        let rows = m.sum_dim_intlist([2i64].as_slice(), false, Kind::Float);
        assert!(rows.max().double_value(&[]) <= 1.0 + 1e-5 && m.min().double_value(&[]) >= 0.0);
    }
}

#[test]
fn a_super_resolution_stage_trains_its_noise_level_embedding() {
    tch::manual_seed(1);
    let (unet, encoder, s) = (unet(32, true), encoder(), schedule());
    let t = trainer(&unet, &encoder, &s, StageData { size: 32, low_res: Some(16), max_noise_level: 250, crop: Some(16) });
    let mut opt = Optimizer::new(&unet.vs, OptimConfig::default());
    let r = t.step(&mut opt).unwrap();
    assert!(r.loss.is_finite() && r.vlb.is_finite());
    let grad = unet.vs.variables()["class_embedding.linear_1.weight"].grad();
    assert!(grad.abs().max().double_value(&[]) > 0.0, "the augmentation level reaches the UNet");
}

#[test]
fn super_resolution_crops_take_the_same_window_of_image_and_condition() {
    let (unet, encoder, s) = (unet(32, true), encoder(), schedule());
    // Augmentation level 0 leaves the conditioning image almost clean.
    let t = trainer(&unet, &encoder, &s, StageData { size: 32, low_res: Some(16), max_noise_level: 1, crop: Some(16) });
    let b = t.batch(3).unwrap();
    assert_eq!(b.images.size(), [8, 3, 16, 16]);
    assert_eq!(b.sample.size(), [8, 6, 16, 16]);
    let cond = b.sample.narrow(1, 3, 3);
    let aligned = (&cond - &b.images).abs().mean(Kind::Float).double_value(&[]);
    // The same windows paired with another sample's condition: a different picture.
    let shuffled = (&cond.roll([1], [0]) - &b.images).abs().mean(Kind::Float).double_value(&[]);
    println!("mean |condition - target|: aligned {aligned:.3}, mismatched {shuffled:.3}");
    assert!(aligned < 0.1 && aligned < shuffled / 4.0, "aligned {aligned}, mismatched {shuffled}");
}

#[test]
fn an_interrupted_run_resumes_exactly() {
    let config = OptimConfig { lr: 1e-3, warmup_steps: 2, ..Default::default() };
    let (encoder, s) = (encoder(), schedule());
    let dir = std::env::temp_dir().join(format!("diffusiond-train-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Both runs start from the same saved initial weights.
    tch::manual_seed(2);
    let init = unet(16, false);
    init.save(&dir.join("init"), Kind::Float).unwrap();
    let load = |name: &str| {
        let mut u = LoadedUNet::load(&dir.join(name), tch::Device::Cpu, Kind::Float).unwrap();
        u.unfreeze();
        u
    };

    let straight = load("init");
    let mut opt = Optimizer::new(&straight.vs, config);
    for _ in 0..4 {
        trainer(&straight, &encoder, &s, BASE).step(&mut opt).unwrap();
    }

    let first = load("init");
    let mut opt = Optimizer::new(&first.vs, config);
    for _ in 0..2 {
        trainer(&first, &encoder, &s, BASE).step(&mut opt).unwrap();
    }
    first.save(&dir.join("ckpt"), Kind::Float).unwrap();
    opt.save(&dir.join("ckpt/optimizer.safetensors")).unwrap();
    drop((first, opt));

    let resumed = load("ckpt");
    let mut opt = Optimizer::new(&resumed.vs, config);
    opt.load(&dir.join("ckpt/optimizer.safetensors")).unwrap();
    for _ in 0..2 {
        trainer(&resumed, &encoder, &s, BASE).step(&mut opt).unwrap();
    }
    let (a, b) = (straight.vs.variables(), resumed.vs.variables());
    let differing: Vec<&String> = a.keys().filter(|k| !a[*k].equal(&b[*k])).collect();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(differing.is_empty(), "resumed weights differ: {differing:?}");
}

#[test]
fn a_run_checkpoints_resumes_and_exports_a_stage_folder() {
    use diffusiond::train::run::{Run, RunOptions, TrainConfig};
    let dir = std::env::temp_dir().join(format!("diffusiond-train-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let unet_config: serde_json::Value = serde_json::from_str(&unet(16, false).model.config().to_json()).unwrap();
    let config = serde_json::json!({
        "seed": 3, "encoder": std::fs::canonicalize(fixture_dir().join("text/tiny-bert")).unwrap(), "max_length": 16,
        "size": 16, "unet": unet_config,
        "scheduler": {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range"},
        "steps": 4, "batch": 4, "lr": 1e-3, "warmup_steps": 2, "cooldown_steps": 2, "ema_decay": 0.9, "checkpoint_every": 2,
        "validate_every": 2, "validate_samples": 6
    });
    std::fs::write(dir.join("train.json"), config.to_string()).unwrap();
    let run = Run {
        config: TrainConfig::from_file(&dir.join("train.json")).unwrap(),
        out: dir.join("run"),
        device: tch::Device::Cpu,
        options: RunOptions::default(),
    };
    assert_eq!(run.train(Some(3), &mut |_, _, _| {}).unwrap(), 3);
    // A second invocation resumes from the step-3 checkpoint and stops at the configured end.
    let mut seen = Vec::new();
    assert_eq!(run.train(None, &mut |step, _, _| seen.push(step)).unwrap(), 4);
    assert_eq!(seen, [4]);
    let log = std::fs::read_to_string(dir.join("run/train.log")).unwrap();
    assert_eq!(log.lines().filter(|l| l.starts_with("step ")).count(), 4, "{log}");
    // Warm-up over 2 steps, then the 1 − sqrt cool-down over the last 2, across the resume.
    let rates: Vec<&str> = log.lines().filter(|l| l.starts_with("step ")).map(|l| l.split(' ').nth(9).unwrap()).collect();
    assert_eq!(rates, ["5.00e-4", "1.00e-3", "2.93e-4", "0.00e0"], "{log}");
    // Held-out validation: when the fresh run starts, every 2 steps, and at each invocation's last step.
    let validations: Vec<Vec<&str>> = log.lines().filter_map(|l| l.strip_prefix("val ")).map(|l| l.split(' ').collect()).collect();
    let at: Vec<&str> = validations.iter().map(|f| f[1]).collect();
    assert_eq!(at, ["0", "2", "3", "4"], "{log}");
    for f in &validations {
        let value = |key: &str| -> f64 { f[f.iter().position(|k| *k == key).unwrap_or_else(|| panic!("{key} in {f:?}")) + 1].parse().unwrap() };
        let (low, high) = (value("x0_100"), value("x0_900"));
        assert!(low.is_finite() && high.is_finite() && low < high, "x̂0 is easier to recover at t = 100 than at 900: {f:?}");
        assert_ne!(value("x0_500"), value("null_500"), "the caption changes the prediction: {f:?}");
    }
    run.export(&dir.join("stage")).unwrap();
    let exported = LoadedUNet::load(&dir.join("stage/unet"), tch::Device::Cpu, Kind::Float).unwrap();
    assert_eq!(exported.parameter_count(), unet(16, false).parameter_count());
    assert!(dir.join("stage/scheduler/scheduler_config.json").is_file() && dir.join("stage/model_index.json").is_file());

    // A run that starts from the exported weights: with a zero learning rate its
    // first checkpoint holds exactly those weights.
    let mut tuned = config.clone();
    tuned["init"] = serde_json::json!("stage");
    tuned["lr"] = serde_json::json!(0.0);
    tuned["steps"] = serde_json::json!(1);
    tuned["cooldown_steps"] = serde_json::json!(0);
    tuned["scheduler"]["prediction_type"] = serde_json::json!("v_prediction");
    std::fs::write(dir.join("tune.json"), tuned.to_string()).unwrap();
    let tune = Run { config: TrainConfig::from_file(&dir.join("tune.json")).unwrap(), out: dir.join("tune"), device: tch::Device::Cpu, options: RunOptions::default() };
    assert_eq!(tune.train(None, &mut |_, _, _| {}).unwrap(), 1);
    let start = LoadedUNet::load(&dir.join("tune/checkpoint"), tch::Device::Cpu, Kind::Float).unwrap();
    let (a, b) = (exported.vs.variables(), start.vs.variables());
    assert!(a.keys().all(|k| a[k].equal(&b[k])), "the run did not start from the init weights");
    tuned["init"] = serde_json::json!("no-such-stage");
    std::fs::write(dir.join("bad.json"), tuned.to_string()).unwrap();
    let bad = Run { config: TrainConfig::from_file(&dir.join("bad.json")).unwrap(), out: dir.join("bad"), device: tch::Device::Cpu, options: RunOptions::default() };
    assert!(bad.train(None, &mut |_, _, _| {}).is_err());
    tuned["cooldown_steps"] = serde_json::json!(2);
    std::fs::write(dir.join("long-cooldown.json"), tuned.to_string()).unwrap();
    let error = TrainConfig::from_file(&dir.join("long-cooldown.json")).unwrap_err().to_string();
    assert!(error.contains("cooldown_steps (2) exceeds steps (1)"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prefetching_threads_and_a_time_limit_leave_the_numbers_unchanged() {
    use diffusiond::train::run::{Run, RunOptions, TrainConfig};
    let dir = std::env::temp_dir().join(format!("diffusiond-train-prefetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    tch::manual_seed(4);
    let init = unet(16, true);
    let unet_config: serde_json::Value = serde_json::from_str(&init.model.config().to_json()).unwrap();
    let config = serde_json::json!({
        "seed": 7, "encoder": std::fs::canonicalize(fixture_dir().join("text/tiny-bert")).unwrap(), "max_length": 16,
        "size": 16, "low_res": 8, "max_noise_level": 100, "crop": 8, "unet": unet_config,
        "scheduler": {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range"},
        "steps": 5, "batch": 4, "lr": 1e-3, "warmup_steps": 2, "ema_decay": 0.9, "checkpoint_every": 100
    });
    std::fs::write(dir.join("train.json"), config.to_string()).unwrap();
    let run = |name: &str, options: RunOptions| {
        // Both runs start from the same weights: a checkpoint-less run would draw its own.
        let out = dir.join(name);
        init.save(&out.join("checkpoint"), Kind::Float).unwrap();
        let fresh = Optimizer::new(&init.vs, OptimConfig::default());
        fresh.save(&out.join("checkpoint/optimizer.safetensors")).unwrap();
        let run = Run { config: TrainConfig::from_file(&dir.join("train.json")).unwrap(), out: out.clone(), device: tch::Device::Cpu, options };
        let step = run.train(None, &mut |_, _, _| {}).unwrap();
        (step, LoadedUNet::load(&out.join("checkpoint"), tch::Device::Cpu, Kind::Float).unwrap())
    };
    let (inline_steps, inline) = run("inline", RunOptions::default());
    // Validating the EMA every step swaps weights in and out: the trained numbers must not move.
    let mut validated = config.clone();
    validated["validate_every"] = serde_json::json!(1);
    std::fs::write(dir.join("train.json"), validated.to_string()).unwrap();
    let (_, checked) = run("validated", RunOptions::default());
    let (a, b) = (inline.vs.variables(), checked.vs.variables());
    assert!(a.keys().all(|k| a[k].equal(&b[k])), "validation changed the weights");
    assert_eq!(std::fs::read_to_string(dir.join("validated/train.log")).unwrap().lines().filter(|l| l.starts_with("val ")).count(), 6, "steps 0 to 5");
    std::fs::write(dir.join("train.json"), config.to_string()).unwrap();
    let (threaded_steps, threaded) = run("threaded", RunOptions { data_threads: 3, ..Default::default() });
    assert_eq!((inline_steps, threaded_steps), (5, 5));
    let (a, b) = (inline.vs.variables(), threaded.vs.variables());
    let differing: Vec<&String> = a.keys().filter(|k| !a[*k].equal(&b[*k])).collect();
    assert!(differing.is_empty(), "prefetched batches changed the weights: {differing:?}");
    // A time limit stops the run before its next step.
    let (stopped, _) = run("limited", RunOptions { max_seconds: Some(1e-9), ..Default::default() });
    assert_eq!(stopped, 0, "no time for a step");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The committed training configs are the record of how `models/default` was
/// made: each must parse, each `init` must name an earlier run of the chain,
/// and a shipped stage's architecture and schedule must be its config's.
#[test]
fn the_shipped_stages_match_their_committed_training_configs() {
    use diffusiond::train::run::TrainConfig;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root.join("train")).unwrap() {
        let path = entry.unwrap().path();
        // The noised CLIP's run (`diffusiond train-clip`) and the unCLIP
        // prior's (`diffusiond train-prior`) are not stages of the cascade;
        // the shipped CLIP is its config's model.
        if path.file_stem().is_some_and(|n| n.to_string_lossy().starts_with("noised-clip")) {
            let config = diffusiond::train::clip::ClipTrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let shipped = diffusiond::nn::noised_clip::LoadedNoisedClip::load(&root.join("clip"), tch::Device::Cpu).unwrap();
            assert_eq!(shipped.model.config(), &config.model, "models/default/clip is the model of {}", path.display());
            continue;
        }
        // unCLIP's prior and decoder ship in models/unclip.
        let unclip = root.join("../unclip");
        if path.file_stem().is_some_and(|n| n == "prior") {
            let config = diffusiond::train::prior::PriorTrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert!(config.clip.join("config.json").is_file(), "{}: the CLIP it learns from is shipped", path.display());
            let shipped = diffusiond::nn::unclip::PriorConfig::from_dir(&unclip.join("prior")).unwrap();
            assert_eq!(shipped, config.model, "models/unclip/prior is the model of {}", path.display());
            continue;
        }
        if path.file_stem().is_some_and(|n| n == "decoder") {
            use diffusiond::train::decoder::{decoder_unet_config, DecoderTrainConfig};
            let config = DecoderTrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            let base = diffusiond::nn::unet::UNetConfig::from_dir(&config.init.join("unet")).unwrap();
            let shipped = diffusiond::nn::unet::UNetConfig::from_dir(&unclip.join("decoder")).unwrap();
            assert_eq!(shipped, decoder_unet_config(&base).unwrap(), "models/unclip/decoder is the shipped base stage turned decoder");
            let proj = diffusiond::nn::unclip::TextProjConfig::from_dir(&unclip.join("text_proj")).unwrap();
            assert_eq!(proj.clip_extra_context_tokens, config.clip_extra_context_tokens);
            assert!(config.clip.join("config.json").is_file(), "{}: the CLIP it reads is shipped", path.display());
            continue;
        }
        let config = TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if let Some(init) = &config.init {
            // runs/<earlier>/stage, relative to the config.
            let run = init.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap();
            assert!(root.join("train").join(format!("{run}.json")).is_file(), "{name}: init names {run}, which has no config");
            assert_ne!(run, name, "{name} starts from itself");
        }
        let shipped = root.join(&name);
        if shipped.join("model_index.json").is_file() {
            let read = |file: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(shipped.join(file)).unwrap()).unwrap() };
            let unet = read("unet/config.json");
            for (key, value) in config.unet.as_object().unwrap() {
                assert_eq!(&unet[key], value, "{name}: unet {key}");
            }
            let scheduler = read("scheduler/scheduler_config.json");
            for (key, value) in config.scheduler.as_object().unwrap() {
                assert_eq!(&scheduler[key], value, "{name}: scheduler {key}");
            }
        }
        names.push(name);
    }
    for stage in ["base", "sr64", "sr128"] {
        assert!(names.iter().any(|n| n == stage), "no training config for the shipped {stage} stage");
    }
}

//! DALL-E 2's decoder fine-tuned from the fixture cascade's base stage in the
//! embedding space of a tiny random noised CLIP: it starts as the base stage
//! with the CLIP's view of the caption fitted onto its own text path and the
//! image paths at zero; the loss falls over a run; a run stopped and
//! resumed ends with exactly the weights of an uninterrupted one; the export
//! loads as a cascade's `decoder` stage.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::nn::noised_clip::{LoadedNoisedClip, ModelInputs, NoisedClipConfig};
use diffusiond::nn::unclip::TextProjConfig;
use diffusiond::nn::unet::{LoadedUNet, UNetConfig};
use diffusiond::nn::weights;
use diffusiond::pipeline::manifest::{StageEntry, StageEntryKind};
use diffusiond::pipeline::stage::{Stage, StageKind};
use diffusiond::train::clip::FrozenClip;
use diffusiond::train::dataset::Dataset;
use diffusiond::train::decoder::{decoder_unet_config, init_from_base, DecoderModel, DecoderRun, DecoderTrainConfig};
use tch::{Device, Kind};

/// Weight initialisation draws from libtorch's one global generator.
static GLOBAL_RNG: Mutex<()> = Mutex::new(());

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// A random 16-pixel CLIP with a 16-wide embedding reading the tiny BERT, under `dir`.
fn clip_dir(dir: &Path) -> PathBuf {
    let config = NoisedClipConfig { image_size: 16, block_out_channels: vec![8, 16], layers_per_block: 1, embed_dim: 16, text_hidden_size: 32, num_train_timesteps: 1000, norm_num_groups: 4 };
    tch::manual_seed(9);
    let out = dir.join("clip");
    LoadedNoisedClip::random(&config).unwrap().save(&out).unwrap();
    let ddpm = serde_json::json!({"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000});
    ModelInputs { text_encoder: fixture("text/tiny-bert"), max_length: 16, scheduler: ddpm, train_seed: 4 }.write(&out).unwrap();
    out
}

fn config(clip: &Path) -> DecoderTrainConfig {
    serde_json::from_value(serde_json::json!({
        "seed": 3, "clip": clip, "init": fixture("cascade/base"), "clip_extra_context_tokens": 2,
        "steps": 6, "batch": 4, "lr": 1e-3, "warmup_steps": 2, "cooldown_steps": 2, "ema_decay": 0.9,
        "image_drop": 0.25, "text_drop": 0.5, "vlb_lambda": 0.001, "min_snr_gamma": 5.0, "checkpoint_every": 2
    }))
    .unwrap()
}

#[test]
fn the_decoder_starts_as_the_base_stage_reading_the_clip() {
    let dir = std::env::temp_dir().join(format!("diffusiond-decoder-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _turn = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let teacher = FrozenClip::load(&clip_dir(&dir), Device::Cpu).unwrap();
    let base_dir = fixture("cascade/base/unet");
    let base = UNetConfig::from_dir(&base_dir).unwrap();
    let unet = decoder_unet_config(&base).unwrap();
    let spec = unet.spec().unwrap();
    let proj = TextProjConfig { clip_extra_context_tokens: 2, clip_embeddings_dim: 16, time_embed_dim: spec.time_embed_dim, cross_attention_dim: spec.down[0].cross_attention_dim };
    tch::manual_seed(1);
    let model = DecoderModel::random(&unet, &proj).unwrap();
    init_from_base(&model, &base_dir, &teacher, &Dataset::new(8)).unwrap();
    let vars = model.vs.variables();
    let base_weights = weights::read_all(&base_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    // Every UNet weight is the base stage's; the image paths are zero.
    for (name, value) in &vars {
        match name.strip_prefix("text_proj.") {
            None => assert!(value.equal(&base_weights[name].to_kind(Kind::Float)), "{name} is not the base stage's"),
            Some(p) if p.starts_with("clip_image_embeddings_project_to_time_embeddings") || p.starts_with("clip_extra_context_tokens_proj") || p.starts_with("learned") => {
                assert_eq!(value.abs().max().double_value(&[]), 0.0, "{name} starts at zero")
            }
            Some(_) => {}
        }
    }
    // The fitted token projection reproduces the base stage's projected tokens
    // (before the layer norm) better than their mean does.
    let captions: Vec<String> = (500..564).map(|i| Dataset::new(8).sample(i).caption).collect();
    let prompts: Vec<&str> = captions.iter().map(String::as_str).collect();
    let hidden = tch::no_grad(|| teacher.encoder.encode(&prompts)).unwrap().hidden.to_kind(Kind::Float);
    let (_, tokens) = teacher.text_conditioning(&prompts).unwrap();
    let target = hidden.matmul(&base_weights["encoder_hid_proj.weight"].to_kind(Kind::Float).tr()) + base_weights["encoder_hid_proj.bias"].to_kind(Kind::Float);
    let fitted = tokens.matmul(&vars["text_proj.encoder_hidden_states_proj.weight"].tr()) + &vars["text_proj.encoder_hidden_states_proj.bias"];
    let residual = (&fitted - &target).square().mean(Kind::Float).double_value(&[]);
    let spread = (&target - target.mean_dim([0i64, 1].as_slice(), true, Kind::Float)).square().mean(Kind::Float).double_value(&[]);
    println!("held-out token fit: residual {residual:.4} vs spread {spread:.4}");
    assert!(residual < 0.8 * spread, "{residual} vs {spread}");
    // And so does the pooled-text time embedding from the CLIP text embedding.
    let base_unet = LoadedUNet::load(&base_dir, Device::Cpu, Kind::Float).unwrap();
    let pooled = tch::no_grad(|| base_unet.model.text_time_embedding(&hidden)).unwrap();
    let (text, _) = teacher.text_conditioning(&prompts).unwrap();
    let from_clip = text.matmul(&vars["text_proj.embedding_proj.weight"].tr()) + &vars["text_proj.embedding_proj.bias"];
    let residual = (&from_clip - &pooled).square().mean(Kind::Float).double_value(&[]);
    let spread = (&pooled - pooled.mean_dim(0, true, Kind::Float)).square().mean(Kind::Float).double_value(&[]);
    assert!(residual < spread, "pooled text: {residual} vs {spread}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stopped_run_resumes_at_its_step_learns_and_exports_a_decoder_stage() {
    let dir = std::env::temp_dir().join(format!("diffusiond-decoder-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _turn = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let clip = clip_dir(&dir);
    let run = |name: &str| DecoderRun { config: config(&clip), out: dir.join(name), device: Device::Cpu, max_seconds: None };
    assert_eq!(run("straight").train(None, &mut |_, _, _| {}).unwrap(), 6);
    assert_eq!(run("split").train(Some(3), &mut |_, _, _| {}).unwrap(), 3);
    let mut steps = Vec::new();
    assert_eq!(run("split").train(None, &mut |step, loss, _| steps.push((step, loss))).unwrap(), 6);
    assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), [4, 5, 6]);
    assert!(steps.iter().all(|s| s.1.is_finite()));
    let log = std::fs::read_to_string(dir.join("split/train.log")).unwrap();
    assert!(log.contains("# started at step 0") && log.contains("# resumed at step 3"), "{log}");
    let load = |name: &str| weights::read_all(&dir.join(name).join("checkpoint/decoder.safetensors")).unwrap();
    let (a, b) = (load("straight"), load("split"));
    let differing: Vec<&String> = a.keys().filter(|k| !a[*k].equal(&b[*k])).collect();
    assert!(differing.is_empty(), "resumed weights differ: {differing:?}");
    // Training reaches the image paths.
    assert!(a["text_proj.clip_image_embeddings_project_to_time_embeddings.weight"].abs().max().double_value(&[]) > 0.0);

    // The export loads as the decoder stage of a cascade, with the EMA weights.
    let export = dir.join("export");
    run("split").export(&export).unwrap();
    let entry = StageEntry {
        name: "decoder".into(),
        path: "export".into(),
        kind: Some(StageEntryKind::Decoder),
        sampler: "ddpm".into(),
        steps: 4,
        guidance_scale: 3.0,
        eta: 0.0,
        use_clipped_model_output: false,
        layout_guidance_scale: 0.0,
        noise_level: None,
        strength: None,
    };
    let device = DeviceSetting::Cpu.resolve();
    let stage = Stage::load(&dir, &entry, 1, device, Precision::F32.kind_for(device)).unwrap();
    assert_eq!(stage.kind, StageKind::Decoder);
    assert_eq!(stage.text_width(), 16, "it reads the CLIP's width");
    let exported = weights::read_all(&export.join("text_proj/diffusion_pytorch_model.safetensors")).unwrap();
    let live = &b["text_proj.embedding_proj.weight"];
    assert!(!exported["embedding_proj.weight"].to_kind(Kind::Float).allclose(live, 1e-6, 1e-6, false), "the EMA is exported");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_decoder_loss_falls_over_a_run() {
    let dir = std::env::temp_dir().join(format!("diffusiond-decoder-loss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _turn = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let clip = clip_dir(&dir);
    let mut c = config(&clip);
    c.steps = 40;
    c.batch = 8;
    c.checkpoint_every = 40;
    c.lr = 2e-3;
    c.cooldown_steps = 0;
    let run = DecoderRun { config: c, out: dir.join("run"), device: Device::Cpu, max_seconds: None };
    let mut losses = Vec::new();
    run.train(None, &mut |_, loss, _| losses.push(loss)).unwrap();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..10]), mean(&losses[30..]));
    println!("decoder loss: first 10 steps {first:.4}, last 10 {last:.4}");
    assert!(last < first, "{first} -> {last}");
    std::fs::remove_dir_all(&dir).unwrap();
}

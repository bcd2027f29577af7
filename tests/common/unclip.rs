//! A tiny random unCLIP cascade: a prior and a decoder in the noised CLIP's
//! embedding space (the folders `train-prior` and `train-decoder` export),
//! the fixture cascade's super-resolution stage after them, and the CLIP.

use std::path::PathBuf;

use diffusiond::nn::noised_clip::{LoadedNoisedClip, ModelInputs};
use diffusiond::nn::unclip::{LoadedPrior, PriorConfig, TextProjConfig};
use diffusiond::nn::unet::UNetConfig;
use diffusiond::pipeline::manifest::{ClipEntry, StageEntry, StageEntryKind};
use diffusiond::pipeline::Manifest;
use diffusiond::train::decoder::{decoder_unet_config, DecoderModel};
use tch::{Kind, Tensor};

use super::clip::{base_scheduler, clip_config};
use super::{copy_dir, fixture_dir};

/// The CLIP's (and so the prior's) width.
pub const WIDTH: i64 = 16;

pub fn prior_scheduler() -> serde_json::Value {
    serde_json::json!({"_class_name": "UnCLIPScheduler", "num_train_timesteps": 1000, "variance_type": "fixed_small_log",
        "clip_sample": true, "clip_sample_range": 5.0, "prediction_type": "sample"})
}

fn write_json(path: PathBuf, value: &serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// The stage entries of the unCLIP cascade: prior, decoder (both in
/// `unclip/`), then the fixture's super-resolution stage.
pub fn stages() -> Vec<StageEntry> {
    let entry = |name: &str, kind, sampler: &str, steps, guidance_scale| StageEntry {
        name: name.into(),
        path: "unclip".into(),
        kind,
        sampler: sampler.into(),
        steps,
        guidance_scale,
        eta: 0.0,
        use_clipped_model_output: false,
        layout_guidance_scale: 0.0,
        noise_level: None,
        strength: None,
    };
    let fixture = Manifest::from_dir(&fixture_dir().join("cascade")).unwrap();
    vec![entry("prior", Some(StageEntryKind::Prior), "ddpm", 5, 4.0), entry("decoder", Some(StageEntryKind::Decoder), "ddpm", 6, 3.0), fixture.stages[1].clone()]
}

/// A fresh folder named after `name` with the tiny unCLIP cascade, its
/// random weights drawn from `seed`.
pub fn unclip_cascade(name: &str, seed: i64) -> PathBuf {
    let src = fixture_dir().join("cascade");
    let dir = std::env::temp_dir().join(format!("diffusiond-unclip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&src.join("sr"), &dir.join("sr"));
    let encoder = std::fs::canonicalize(fixture_dir().join("text/tiny-bert")).unwrap();
    tch::manual_seed(seed);
    // The CLIP, reading the tiny encoder's states.
    let clip_dir = dir.join("clip");
    let mut config = clip_config(16, 32);
    config.embed_dim = WIDTH;
    LoadedNoisedClip::random(&config).unwrap().save(&clip_dir).unwrap();
    ModelInputs { text_encoder: encoder.clone(), max_length: 16, scheduler: base_scheduler(), train_seed: 0 }.write(&clip_dir).unwrap();
    // The prior, with standardising statistics that are not the identity.
    let unclip = dir.join("unclip");
    let prior_config: PriorConfig = serde_json::from_value(serde_json::json!({
        "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "embedding_dim": WIDTH,
        "num_embeddings": 0, "additional_embeddings": 4, "encoder_hid_proj_type": null
    }))
    .unwrap();
    let prior = LoadedPrior::random(&prior_config).unwrap();
    prior.set_statistics(&(Tensor::randn([WIDTH], (Kind::Float, tch::Device::Cpu)) * 0.1), &(Tensor::rand([WIDTH], (Kind::Float, tch::Device::Cpu)) * 0.2 + 0.1)).unwrap();
    prior.save(&unclip.join("prior"), Kind::Float).unwrap();
    write_json(unclip.join("prior_scheduler/scheduler_config.json"), &prior_scheduler());
    // The decoder: the fixture's base UNet turned decoder, with random weights throughout.
    let base = UNetConfig::from_dir(&src.join("base/unet")).unwrap();
    let unet = decoder_unet_config(&base).unwrap();
    let spec = unet.spec().unwrap();
    let proj = TextProjConfig { clip_extra_context_tokens: 2, clip_embeddings_dim: WIDTH, time_embed_dim: spec.time_embed_dim, cross_attention_dim: spec.down[0].cross_attention_dim };
    let decoder = DecoderModel::random(&unet, &proj).unwrap();
    // The null embedding is learned; make it differ from zero as a trained one does.
    let mut values: std::collections::BTreeMap<String, Tensor> = decoder.vs.variables().into_iter().collect();
    values.insert("text_proj.learned_classifier_free_guidance_embeddings".into(), Tensor::randn([WIDTH], (Kind::Float, tch::Device::Cpu)));
    decoder.export(&unclip, &values, Kind::Float).unwrap();
    write_json(unclip.join("decoder_scheduler/scheduler_config.json"), &base_scheduler());
    let mut manifest = Manifest::from_dir(&src).unwrap();
    manifest.name = "tiny-unclip".into();
    manifest.text_encoder.path = encoder;
    manifest.stages = stages();
    manifest.clip = Some(ClipEntry { path: "clip".into() });
    manifest.write(&dir).unwrap();
    dir
}

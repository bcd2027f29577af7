//! A random tiny cascade made in the test with diffusiond's own writer: it loads,
//! generates, keeps images independent of their batch, and its stage folders load
//! in diffusers' IF pipelines.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture_dir, tiny_unet_config};
use diffusiond::diffusion::SchedulerConfig;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::nn::unet::LoadedUNet;
use diffusiond::pipeline::manifest::{StageEntry, TextEncoderEntry};
use diffusiond::pipeline::stage::StageKind;
use diffusiond::pipeline::writer::{write_stage, StageFiles};
use diffusiond::pipeline::{Cascade, LoadOptions, Manifest, RequestSpec};
use tch::Kind;

fn scheduler(json: &str) -> SchedulerConfig {
    SchedulerConfig::from_json_str(json).unwrap()
}

/// Writes a random two-stage cascade (8×8 → 16×16) under a fresh folder.
fn random_cascade() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffusiond-random-cascade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let stage_scheduler = scheduler(
        r#"{"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
            "variance_type": "learned_range", "thresholding": true, "dynamic_thresholding_ratio": 0.95,
            "sample_max_value": 1.5}"#,
    );
    let noising = scheduler(r#"{"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}"#);
    tch::manual_seed(3);
    for (name, kind, size) in [("base", StageKind::Base, 8), ("sr", StageKind::SuperResolution, 16)] {
        let unet = LoadedUNet::random(&tiny_unet_config(size, kind == StageKind::SuperResolution)).unwrap();
        let files = StageFiles {
            kind,
            unet: &unet,
            scheduler: &stage_scheduler,
            noising: (kind == StageKind::SuperResolution).then_some(&noising),
            weights: Kind::Half,
        };
        write_stage(&dir.join(name), &files).unwrap();
    }
    let stage = |name: &str, steps, noise_level| StageEntry {
        name: name.into(),
        path: name.into(),
        kind: None,
        sampler: "ddpm".into(),
        steps,
        guidance_scale: 3.0,
        eta: 0.0,
        use_clipped_model_output: false,
        noise_level,
        layout_guidance_scale: 0.0,
        strength: None,
    };
    let encoder = std::fs::canonicalize(fixture_dir().join("text/tiny-bert")).unwrap();
    Manifest {
        name: "random".into(),
        description: None,
        text_encoder: TextEncoderEntry { path: encoder, tokenizer: None, max_length: Some(12) },
        stages: vec![stage("base", 6, None), stage("sr", 4, Some(100))],
        clip: None,
    }
    .write(&dir)
    .unwrap();
    dir
}

fn reference_python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-fixtures/bin/python");
    assert!(py.exists(), "{} is missing: run `make refenv` (make test does)", py.display());
    py
}

fn loads_in_diffusers(stage_dir: &Path) -> bool {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/diffusers_run_unet.py");
    Command::new(reference_python()).arg(script).arg("load-pipeline").arg(stage_dir).status().unwrap().success()
}

#[test]
fn a_cascade_written_by_diffusiond_generates_and_loads_in_diffusers() {
    let dir = random_cascade();
    let cascade = Cascade::load(&dir, &LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 }).unwrap();
    let spec = RequestSpec { prompt: "two green stars".into(), n: 3, seed: Some(40), ..Default::default() };
    let run = |spec: &RequestSpec| cascade.generate(&cascade.plan(spec).unwrap(), &mut |_| ControlFlow::Continue(())).unwrap();
    let batch = run(&spec);
    assert!(batch.iter().all(|g| g.image.dimensions() == (16, 16)));
    let alone = run(&RequestSpec { n: 1, seed: Some(42), ..spec.clone() });
    assert_eq!(alone[0].image.as_raw(), batch[2].image.as_raw(), "batch invariance");
    let preview = run(&RequestSpec { stages: Some(1), ..spec });
    assert_eq!(preview[0].image.dimensions(), (8, 8));

    assert!(loads_in_diffusers(&dir.join("base")), "IFPipeline could not load the base stage");
    assert!(loads_in_diffusers(&dir.join("sr")), "IFSuperResolutionPipeline could not load the SR stage");
    std::fs::remove_dir_all(&dir).unwrap();
}

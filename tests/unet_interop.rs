//! A UNet written by diffusiond loads in diffusers and computes what diffusiond
//! computes: the checkpoint format works in both directions (the other direction
//! is `unet_parity.rs`). Needs the reference environment `.venv-fixtures`
//! (`make refenv`; `make test` creates it).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use common::{fixture_dir, relative_error};
use diffusiond::nn::unet::{LoadedUNet, UNetConfig, UNetInput};
use diffusiond::nn::weights;
use tch::{Device, Kind, Tensor};

fn reference_python() -> PathBuf {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-fixtures/bin/python");
    assert!(py.exists(), "{} is missing: run `make refenv` (make test does)", py.display());
    py
}

#[test]
fn a_unet_saved_by_diffusiond_loads_and_runs_in_diffusers() {
    let tmp = std::env::temp_dir().join(format!("diffusiond-interop-{}", std::process::id()));
    let model_dir = tmp.join("unet");
    let config = UNetConfig::from_dir(&fixture_dir().join("unet/if_superres")).unwrap();
    tch::manual_seed(5);
    let written = LoadedUNet::random(&config).unwrap();
    written.save(&model_dir, Kind::Half).unwrap();
    // Read our own file back so both sides run the same float16-rounded weights.
    let unet = LoadedUNet::load(&model_dir, Device::Cpu, Kind::Float).unwrap();

    let opts = (Kind::Float, Device::Cpu);
    let inputs = BTreeMap::from([
        ("sample".to_owned(), Tensor::randn([2, 6, 16, 16], opts)),
        ("timesteps".to_owned(), Tensor::from_slice(&[10.0f32, 800.0])),
        ("encoder_hidden_states".to_owned(), Tensor::randn([2, 9, 32], opts)),
        ("class_labels".to_owned(), Tensor::from_slice(&[100.0f32, 0.0])),
    ]);
    let io = tmp.join("io.safetensors");
    weights::save_tensors(&inputs, &io).unwrap();
    let out_file = tmp.join("out.safetensors");
    let status = Command::new(reference_python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/diffusers_run_unet.py"))
        .args(["forward".as_ref(), model_dir.as_os_str(), io.as_os_str(), out_file.as_os_str()])
        .status()
        .unwrap();
    assert!(status.success(), "diffusers could not load or run the checkpoint");
    let theirs = weights::read_all(&out_file).unwrap().remove("output").unwrap();

    let input = UNetInput {
        sample: &inputs["sample"],
        timesteps: &inputs["timesteps"],
        encoder_hidden_states: &inputs["encoder_hidden_states"],
        class_labels: Some(&inputs["class_labels"]),
        text_mask: None,
    };
    let ours = tch::no_grad(|| unet.model.forward(&input)).unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    let err = relative_error(&ours, &theirs);
    println!("diffusiond-written UNet in diffusers: max relative error {err:.2e}");
    assert!(err <= 1e-4, "relative error {err:e}");
}

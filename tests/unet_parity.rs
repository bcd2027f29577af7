//! UNet parity with diffusers: tiny random `UNet2DConditionModel`s written by
//! diffusers' `save_pretrained` (fixtures from `scripts/fixtures_unet.py`) load in
//! diffusiond and reproduce diffusers' outputs on the same inputs.

mod common;

use common::{fixture_dir, load_json, load_tensors, relative_error};
use diffusiond::nn::unet::{LoadedUNet, UNetInput};
use tch::{Device, Kind, Tensor};

/// The bound the network layer promises in f32 (max |ours − theirs| / max |theirs|).
const TOLERANCE: f64 = 1e-4;

fn run_case(name: &str, io: &std::collections::HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let unet = LoadedUNet::load(&fixture_dir().join("unet").join(name), Device::Cpu, Kind::Float)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let get = |k: &str| io.get(&format!("{name}.{k}"));
    let input = UNetInput {
        sample: get("sample").unwrap(),
        timesteps: get("timesteps").unwrap(),
        encoder_hidden_states: get("encoder_hidden_states").unwrap(),
        class_labels: get("class_labels"),
        text_mask: None,
    };
    let out = tch::no_grad(|| unet.model.forward(&input)).unwrap();
    (out, get("output").unwrap().shallow_clone())
}

#[test]
fn tiny_unets_written_by_diffusers_match_diffusers_outputs() {
    let meta = load_json("unet/cases.json");
    let io = load_tensors("unet/io.safetensors");
    let cases = meta["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 3);
    for name in cases.keys() {
        let (ours, theirs) = run_case(name, &io);
        assert_eq!(ours.size(), theirs.size(), "{name}");
        let err = relative_error(&ours, &theirs);
        println!("{name}: max relative error {err:.2e} (max |out| {:.3})", theirs.abs().max().double_value(&[]));
        assert!(err <= TOLERANCE, "{name}: relative error {err:e}");
    }
}

#[test]
fn sharded_checkpoint_loads() {
    let dir = fixture_dir().join("unet/if_superres");
    assert!(dir.join("diffusion_pytorch_model.safetensors.index.json").is_file());
    let unet = LoadedUNet::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let meta = load_json("unet/cases.json");
    assert_eq!(unet.parameter_count(), meta["cases"]["if_superres"]["parameters"].as_i64().unwrap());
}

#[test]
fn bad_inputs_are_errors_naming_the_argument() {
    let unet = LoadedUNet::load(&fixture_dir().join("unet/if_superres"), Device::Cpu, Kind::Float).unwrap();
    let opts = (Kind::Float, Device::Cpu);
    let sample = Tensor::zeros([2, 6, 16, 16], opts);
    let t = Tensor::from_slice(&[1.0f32, 2.0]);
    let text = Tensor::zeros([2, 7, 32], opts);
    let labels = Tensor::from_slice(&[0.0f32, 0.0]);
    let call = |sample: &Tensor, text: &Tensor, labels: Option<&Tensor>| {
        let input = UNetInput { sample, timesteps: &t, encoder_hidden_states: text, class_labels: labels, text_mask: None };
        unet.model.forward(&input).map(|_| ()).unwrap_err().to_string()
    };
    assert!(call(&Tensor::zeros([2, 3, 16, 16], opts), &text, Some(&labels)).contains("`sample`"));
    assert!(call(&Tensor::zeros([2, 6, 15, 16], opts), &text, Some(&labels)).contains("`sample`"));
    assert!(call(&sample, &Tensor::zeros([2, 7, 33], opts), Some(&labels)).contains("`encoder_hidden_states`"));
    assert!(call(&sample, &text, None).contains("`class_labels`"));
}

#[test]
fn a_checkpoint_for_another_config_lists_the_differences() {
    // The base model's weights under the SR config: conv_in has 3 input channels, not 6,
    // and there is no class embedding in the file.
    let tmp = std::env::temp_dir().join(format!("diffusiond-unet-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let root = fixture_dir().join("unet");
    std::fs::copy(root.join("if_superres/config.json"), tmp.join("config.json")).unwrap();
    std::fs::copy(
        root.join("if_base/diffusion_pytorch_model.safetensors"),
        tmp.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = LoadedUNet::load(&tmp, Device::Cpu, Kind::Float).unwrap_err().to_string();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(err.contains("missing") && err.contains("class_embedding.linear_1.weight"), "{err}");
    assert!(err.contains("wrong shape") && err.contains("conv_in.weight"), "{err}");
}

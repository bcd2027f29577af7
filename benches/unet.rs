//! UNet forward pass: diffusiond against diffusers on the same config, weights,
//! inputs, torch build and thread count, measured in one run; prints the times
//! and the ratio ours/theirs (target ≤ 1.0).
//!
//! The model is an IF-style base UNet of the size we ship (channels 64/128/256,
//! two ResNets per block, attention with added text keys at the two lower
//! resolutions, 32×32, MiniLM-width text tokens). diffusers runs in the
//! reference environment (`make refenv`) under `torch.inference_mode`.
//!
//!     cargo bench --bench unet                       # CPU, 2 threads
//!     BENCH_DEVICE=cuda BENCH_DTYPE=float16 cargo bench --bench unet
//!     BENCH_THREADS=4 BENCH_ITERS=20 cargo bench --bench unet

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::env_or;
use diffusiond::nn::unet::{LoadedUNet, UNetConfig, UNetInput};
use diffusiond::nn::weights;
use tch::{Cuda, Device, Kind, Tensor};

fn bench_config() -> UNetConfig {
    let json = serde_json::json!({
        "sample_size": 32, "in_channels": 3, "out_channels": 6, "layers_per_block": 2,
        "block_out_channels": [64, 128, 256],
        "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "cross_attention_dim": 256, "encoder_hid_dim": 384, "attention_head_dim": 64,
        "addition_embed_type": "text", "addition_embed_type_num_heads": 6, "cross_attention_norm": "group_norm",
        "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu", "mid_block_scale_factor": 1.414
    });
    UNetConfig::from_json(&json.to_string()).expect("bench config is valid")
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        Cuda::synchronize(i as i64);
    }
}

/// Median and minimum milliseconds over `iters` calls after two warm-up calls.
fn time_ours(unet: &LoadedUNet, input: &UNetInput<'_>, iters: usize, device: Device) -> (f64, f64) {
    let _guard = tch::no_grad_guard();
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 2 {
        sync(device);
        let start = Instant::now();
        let _ = unet.model.forward(input).expect("forward");
        sync(device);
        if i >= 2 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

fn time_theirs(py: &Path, dir: &Path, io: &Path, args: &[String]) -> Option<(f64, f64)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/diffusers_run_unet.py");
    let mut argv: Vec<&OsStr> = vec!["bench".as_ref(), dir.as_os_str(), io.as_os_str()];
    argv.extend(args.iter().map(OsStr::new));
    let v = common::python_json(py, &script, &argv)?;
    Some((v["median_ms"].as_f64()?, v["min_ms"].as_f64()?))
}

fn main() {
    let threads: usize = env_or("BENCH_THREADS", "2").parse().expect("BENCH_THREADS");
    let iters: usize = env_or("BENCH_ITERS", "10").parse().expect("BENCH_ITERS");
    let device = match env_or("BENCH_DEVICE", "cpu").as_str() {
        "cuda" => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let dtype = env_or("BENCH_DTYPE", "float32");
    let kind = match dtype.as_str() {
        "float16" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        _ => Kind::Float,
    };
    tch::set_num_threads(threads as i32);
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-fixtures/bin/python");

    let tmp = std::env::temp_dir().join(format!("diffusiond-bench-unet-{}", std::process::id()));
    let dir = tmp.join("unet");
    tch::manual_seed(0);
    LoadedUNet::random(&bench_config()).unwrap().save(&dir, Kind::Float).unwrap();
    let unet = LoadedUNet::load(&dir, device, kind).unwrap();
    println!(
        "UNet forward, {} parameters, 32x32, 16 text tokens, {device:?} {dtype}, {threads} threads, median of {iters}",
        unet.parameter_count()
    );
    println!("{:>6} {:>14} {:>14} {:>12}", "batch", "diffusiond ms", "diffusers ms", "ours/theirs");
    for batch in [1i64, 8] {
        let inputs = BTreeMap::from([
            ("sample".to_owned(), Tensor::randn([batch, 3, 32, 32], (Kind::Float, Device::Cpu))),
            ("timesteps".to_owned(), Tensor::full([batch], 500.0, (Kind::Float, Device::Cpu))),
            ("encoder_hidden_states".to_owned(), Tensor::randn([batch, 16, 384], (Kind::Float, Device::Cpu))),
        ]);
        let io = tmp.join(format!("io{batch}.safetensors"));
        weights::save_tensors(&inputs, &io).unwrap();
        let on = |k: &str| inputs[k].to_device(device).to_kind(kind);
        let (sample, text, t) = (on("sample"), on("encoder_hidden_states"), inputs["timesteps"].to_device(device));
        let input = UNetInput { sample: &sample, timesteps: &t, encoder_hidden_states: &text, class_labels: None, text_mask: None };
        let (ours, _) = time_ours(&unet, &input, iters, device);
        let dev = if device.is_cuda() { "cuda" } else { "cpu" };
        let args = [threads.to_string(), iters.to_string(), dev.to_owned(), dtype.clone()];
        match py.exists().then(|| time_theirs(&py, &dir, &io, &args)).flatten() {
            Some((theirs, _)) => println!("{batch:>6} {ours:>14.2} {theirs:>14.2} {:>12.3}", ours / theirs),
            None => println!("{batch:>6} {ours:>14.2} {:>14} {:>12}", "n/a", "n/a (make refenv)"),
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

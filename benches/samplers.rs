//! Cost of one sampler step (everything but the model), per sampler, batch size
//! and device, next to one 3×3 convolution of the same batch at 64 channels — a
//! small fraction of a UNet's forward — to show that sampling overhead is noise
//! beside the network. Prints figures and ratios from one run.
//!
//!     cargo bench --bench samplers            # CPU, and CUDA when present

use std::time::Instant;

use diffusiond::diffusion::{BatchNoise, SamplerKind, SamplerOptions, Scheduler, SchedulerConfig};
use tch::{nn, nn::Module, Cuda, Device, Kind, Tensor};

const STEPS: usize = 50;

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        Cuda::synchronize(i as i64);
    }
}

/// Mean milliseconds per sampler step over a full run of STEPS steps.
fn time_sampler(s: &Scheduler, kind: SamplerKind, batch: i64, size: i64, device: Device) -> f64 {
    let seeds: Vec<u64> = (0..batch as u64).collect();
    let x = Tensor::randn([batch, 3, size, size], (Kind::Float, device));
    let out = Tensor::randn([batch, 6, size, size], (Kind::Float, device)).tanh();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut sampler = s.sampler(&SamplerOptions { eta: 1.0, ..SamplerOptions::new(kind, STEPS) }).unwrap();
        let mut noise = BatchNoise::seeded(&seeds);
        let mut sample = x.shallow_clone();
        sync(device);
        let start = Instant::now();
        while !sampler.is_done() {
            sample = sampler.step(&out, &sample, &mut noise).unwrap().prev_sample;
        }
        sync(device);
        best = best.min(start.elapsed().as_secs_f64() * 1e3 / STEPS as f64);
    }
    best
}

fn time_conv(batch: i64, size: i64, device: Device) -> f64 {
    let vs = nn::VarStore::new(device);
    let conv = nn::conv2d(vs.root(), 64, 64, 3, nn::ConvConfig { padding: 1, ..Default::default() });
    let x = Tensor::randn([batch, 64, size, size], (Kind::Float, device));
    let _ = conv.forward(&x);
    sync(device);
    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        let _ = conv.forward(&x);
    }
    sync(device);
    start.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn main() {
    tch::no_grad_guard();
    let config = r#"{"beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range",
        "thresholding": true, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5}"#;
    let s = Scheduler::new(SchedulerConfig::from_json_str(config).unwrap()).unwrap();
    let mut devices = vec![Device::Cpu];
    if Cuda::is_available() {
        devices.push(Device::Cuda(0));
    }
    println!("threads {}, {STEPS} steps, learned-range variance, dynamic thresholding", tch::get_num_threads());
    println!("{:<8} {:>5} {:>5} {:>12} {:>10} {:>10} {:>10} {:>14}", "device", "batch", "size", "sampler", "ms/step", "conv ms", "ratio", "img-steps/s");
    for &device in &devices {
        for (batch, size) in [(1, 64), (8, 64), (32, 64), (8, 128)] {
            let conv = time_conv(batch, size, device);
            for kind in SamplerKind::ALL {
                let ms = time_sampler(&s, kind, batch, size, device);
                let throughput = batch as f64 * 1e3 / ms;
                println!(
                    "{:<8} {:>5} {:>5} {:>12} {:>10.3} {:>10.3} {:>10.3} {:>14.0}",
                    format!("{device:?}"), batch, size, kind.name(), ms, conv, ms / conv, throughput
                );
            }
        }
    }
}

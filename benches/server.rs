//! The server under load: images per second with 1, 4 and 16 concurrent clients
//! against one request at a time, p50/p99 latency, `/health` latency while the
//! worker is saturated, and the cost of HTTP + queue + store + PNG over calling
//! the pipeline directly. Everything is measured in one run and printed with
//! ratios (this machine is noisy; compare ratios, not absolute times).
//!
//! The cascade is `BENCH_MODEL` when set (e.g. `models/default`), else a random
//! two-stage cascade of the size we ship (32×32 base, 64×64 super-resolution),
//! written to a temporary folder; the text encoder is all-MiniLM-L6-v2 when
//! `make encoder` has fetched it, else the tiny test encoder.
//!
//!     cargo bench --bench server
//!     BENCH_DEVICE=cuda BENCH_REQUESTS=64 cargo bench --bench server
//!
//! The server runs as a separate process (`DIFFUSIOND_BIN`, default: the one
//! cargo built), the clients in this one.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::env_or;
use diffusiond::diffusion::SchedulerConfig;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::nn::unet::{LoadedUNet, UNetConfig};
use diffusiond::pipeline::manifest::{StageEntry, TextEncoderEntry};
use diffusiond::pipeline::stage::StageKind;
use diffusiond::pipeline::writer::{write_stage, StageFiles};
use diffusiond::pipeline::{Cascade, LoadOptions, Manifest, RequestSpec};
use serde_json::json;
use tch::Kind;

fn unet(size: i64, channels: &[i64], in_channels: i64, text_width: i64, sr: bool) -> LoadedUNet {
    let n = channels.len();
    let mut down = vec!["ResnetDownsampleBlock2D".to_owned()];
    down.extend((1..n).map(|_| "SimpleCrossAttnDownBlock2D".to_owned()));
    let mut up: Vec<String> = (1..n).map(|_| "SimpleCrossAttnUpBlock2D".to_owned()).collect();
    up.push("ResnetUpsampleBlock2D".into());
    let mut v = json!({
        "sample_size": size, "in_channels": in_channels, "out_channels": 6, "layers_per_block": 2,
        "block_out_channels": channels, "down_block_types": down, "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "cross_attention_dim": channels[n - 1],
        "encoder_hid_dim": text_width, "attention_head_dim": 32, "addition_embed_type": "text",
        "addition_embed_type_num_heads": text_width / 32, "cross_attention_norm": "group_norm",
        "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu"
    });
    if sr {
        v["class_embed_type"] = "timestep".into();
    }
    LoadedUNet::random(&UNetConfig::from_json(&v.to_string()).unwrap()).unwrap()
}

/// A random 32→64 cascade; returns its folder.
fn random_cascade(dir: &Path, encoder: &Path, text_width: i64) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    let scheduler = SchedulerConfig::from_json_str(
        r#"{"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range",
            "thresholding": true, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5}"#,
    )
    .unwrap();
    let noising = SchedulerConfig::from_json_str(r#"{"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"}"#).unwrap();
    tch::manual_seed(0);
    let base = unet(32, &[64, 128, 256], 3, text_width, false);
    let sr = unet(64, &[32, 64, 128], 6, text_width, true);
    for (name, kind, u) in [("base", StageKind::Base, &base), ("sr64", StageKind::SuperResolution, &sr)] {
        let files = StageFiles { kind, unet: u, scheduler: &scheduler, noising: Some(&noising), weights: Kind::Half };
        write_stage(&dir.join(name), &files).unwrap();
    }
    let stage = |name: &str, steps, noise_level| StageEntry {
        name: name.into(),
        path: name.into(),
        kind: None,
        sampler: "ddim".into(),
        steps,
        guidance_scale: 4.0,
        eta: 0.0,
        use_clipped_model_output: false,
        noise_level,
        layout_guidance_scale: 0.0,
        strength: None,
    };
    Manifest {
        name: "bench-random".into(),
        description: None,
        text_encoder: TextEncoderEntry { path: std::fs::canonicalize(encoder).unwrap(), tokenizer: None, max_length: Some(16) },
        stages: vec![stage("base", 10, None), stage("sr64", 5, Some(100))],
        clip: None,
    }
    .write(dir)
    .unwrap();
    dir.to_owned()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[derive(Clone)]
struct Run {
    clients: usize,
    images_per_sec: f64,
    p50: f64,
    p99: f64,
    health_p99: f64,
    calls: u64,
}

/// UNet calls so far: the count of the batch-rows histogram in `/metrics`.
async fn unet_calls(client: &reqwest::Client, base: &str) -> u64 {
    let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with("diffusiond_batch_rows_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

async fn load(base: &str, clients: usize, requests: usize) -> Run {
    let client = reqwest::Client::new();
    let calls_before = unet_calls(&client, base).await;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // /health while the worker is busy: the async runtime must stay responsive.
    let health = {
        let (client, url, done) = (client.clone(), format!("{base}/health"), done.clone());
        tokio::spawn(async move {
            let mut times = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let _ = client.get(&url).send().await;
                times.push(t.elapsed().as_secs_f64() * 1e3);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            times
        })
    };
    let start = Instant::now();
    let per_client = requests.div_ceil(clients);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (client, url) = (client.clone(), format!("{base}/generate"));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for r in 0..per_client {
                    let body = json!({"prompt": format!("{} red circles above a blue square", 1 + r % 3), "seed": c * 1000 + r});
                    let t = Instant::now();
                    let resp = client.post(&url).header("Accept", "image/png").json(&body).send().await.unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.bytes().await.unwrap();
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<f64> = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let mut health = health.await.unwrap();
    latencies.sort_by(f64::total_cmp);
    health.sort_by(f64::total_cmp);
    Run {
        clients,
        images_per_sec: latencies.len() as f64 / elapsed,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        health_p99: if health.is_empty() { f64::NAN } else { percentile(&health, 0.99) },
        calls: unet_calls(&client, base).await - calls_before,
    }
}

/// Prints the median time of one request through `Cascade::generate` + PNG.
fn direct_call(model: &Path, load_options: LoadOptions) {
    let cascade = Cascade::load(model, &load_options).unwrap();
    let spec = RequestSpec { prompt: "two red circles above a blue square".into(), n: 1, seed: Some(1), ..Default::default() };
    let mut times = Vec::new();
    for i in 0..6 {
        let request = cascade.plan(&RequestSpec { seed: Some(i), ..spec.clone() }).unwrap();
        let t = Instant::now();
        let images = cascade.generate(&request, &mut |_| ControlFlow::Continue(())).unwrap();
        let _png = images[0].png().unwrap();
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    println!("{}", percentile(&times, 0.5));
}

fn main() {
    // The repository: the working directory when it is one (a copy elsewhere), else where cargo built.
    let root = if Path::new("tests/fixtures").is_dir() { PathBuf::from(".") } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")) };
    let device = match env_or("BENCH_DEVICE", "cpu").as_str() {
        "cuda" => DeviceSetting::Cuda(0),
        _ => DeviceSetting::Cpu,
    };
    let requests: usize = env_or("BENCH_REQUESTS", "16").parse().unwrap();
    let tmp = std::env::temp_dir().join(format!("diffusiond-bench-server-{}", std::process::id()));
    if let Ok(out) = std::env::var("BENCH_WRITE_CASCADE") {
        // Writes the random cascade and stops (for profiling it elsewhere).
        random_cascade(Path::new(&out), &root.join("models/all-MiniLM-L6-v2"), 384);
        return;
    }
    let model = match std::env::var("BENCH_MODEL") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => {
            let minilm = root.join("models/all-MiniLM-L6-v2");
            let (encoder, width) = if minilm.join("model.safetensors").is_file() { (minilm, 384) } else { (root.join("tests/fixtures/text/tiny-bert"), 32) };
            random_cascade(&tmp.join("cascade"), &encoder, width)
        }
    };
    let load_options = LoadOptions { device, precision: Precision::Auto };

    // The direct pipeline call, measured in a child process: libtorch's OpenMP
    // pools are per calling thread, and two pools in one process on 2 cores
    // throttle each other's spinning, which would make either side look slow.
    if std::env::var("BENCH_DIRECT_CHILD").is_ok() {
        if std::env::var("BENCH_DIRECT_THREAD").is_ok() {
            let m = model.clone();
            std::thread::spawn(move || direct_call(&m, load_options)).join().unwrap();
        } else {
            direct_call(&model, load_options);
        }
        return;
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("BENCH_DIRECT_CHILD", "1")
        .env("BENCH_MODEL", &model)
        .output()
        .unwrap();
    let direct_ms: f64 = String::from_utf8_lossy(&child.stdout).trim().parse().expect("direct call timing");

    // The server runs as its own process, as deployed: a client in the same
    // process shares its two cores' scheduler and skews the numbers.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let data = tmp.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let binary = std::env::var("DIFFUSIOND_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_diffusiond").to_owned());
    let mut child = std::process::Command::new(binary)
        .args(["serve", "--max-batch-rows", "64", "--max-active-jobs", "32", "--max-queue", "1024", "--bind"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--device")
        .arg(if device == DeviceSetting::Cpu { "cpu" } else { "cuda" })
        .arg("--model")
        .arg(&model)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(300);
        while reqwest::get(format!("{base}/ready")).await.map(|r| r.status() != 200).unwrap_or(true) {
            assert!(Instant::now() < deadline, "server not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let info: serde_json::Value = reqwest::get(format!("{base}/info")).await.unwrap().json().await.unwrap();
        println!("server benchmark: {} on {} ({}), {requests} requests per run, sync PNG responses", info["name"], info["device"], info["precision"]);
        let sequential = load(&base, 1, requests.min(8)).await;
        let overhead = (sequential.p50 - direct_ms) / direct_ms;
        println!(
            "direct pipeline call (generate + PNG, own process): {direct_ms:.1} ms; over HTTP one at a time: {:.1} ms p50 -> overhead {:+.1}%",
            sequential.p50,
            overhead * 100.0
        );
        println!("{:>8} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}", "clients", "images/s", "vs 1", "p50 ms", "p99 ms", "/health p99", "UNet calls");
        for clients in [1usize, 4, 16] {
            let run = if clients == 1 { sequential.clone() } else { load(&base, clients, requests).await };
            println!(
                "{:>8} {:>10.2} {:>9.2}x {:>10.1} {:>10.1} {:>10.2}ms {:>10}",
                run.clients,
                run.images_per_sec,
                run.images_per_sec / sequential.images_per_sec,
                run.p50,
                run.p99,
                run.health_p99,
                run.calls
            );
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&tmp);
}

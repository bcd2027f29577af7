//! Whole-cascade latency: `models/default` through diffusiond's pipeline against
//! diffusers' IF pipelines on the same folders, prompt embeddings, steps, torch
//! build and thread count, at n = 1 and n = 8, measured in one run; prints the
//! times and the speed ratio theirs/ours (target ≥ 1.0 at both sizes).
//!
//! diffusiond's side is what `diffusiond generate -n N` does after loading the
//! model (prompt encoding, every stage at its manifest defaults except layout
//! guidance, which diffusers does not have, PNG-ready pixels), timed with
//! `Cascade::generate`. diffusers' side is
//! `scripts/diffusers_cascade_bench.py` in the reference environment
//! (`make refenv`), fed the embeddings our encoder produced so that both do the
//! same work (a super-resolution stage with a `strength` below 1 runs
//! `IFImg2ImgSuperResolutionPipeline` from the upsampled image there).
//!
//!     cargo bench --bench latency                  # 2 threads, median of 3
//!     BENCH_THREADS=1 BENCH_ITERS=5 BENCH_SIZES=1 BENCH_MODEL=models/default cargo bench --bench latency

mod common;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::env_or;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::nn::weights;
use diffusiond::pipeline::{Cascade, LoadOptions, RequestSpec};

const PROMPT: &str = "a red circle above a blue square";

/// Timings of one side: the whole cascade and each stage, median over the runs.
struct Timing {
    total_ms: f64,
    stages_ms: Vec<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `iters` generations after one warm-up (which also settles every layer's
/// batch-of-one verdict). A stage's time runs from the previous stage's last
/// step to its own last step; the first stage's includes the prompt encoding.
fn time_ours(cascade: &Cascade, n: usize, iters: usize) -> Timing {
    // diffusers' IF pipelines have no layout guidance: off, so both sides do the same work.
    let spec = RequestSpec { prompt: PROMPT.to_owned(), n, seed: Some(7), layout_guidance_scale: Some(0.0), ..Default::default() };
    let request = cascade.plan(&spec).expect("plan");
    let stages = request.stages.len();
    let (mut totals, mut per_stage) = (Vec::new(), vec![Vec::new(); stages]);
    for i in 0..=iters {
        let start = Instant::now();
        let mut last = start;
        let mut ends = vec![0.0; stages];
        let images = cascade
            .generate(&request, &mut |p| {
                if p.step == p.total_steps {
                    ends[p.stage] = last.elapsed().as_secs_f64() * 1e3;
                    last = Instant::now();
                }
                ControlFlow::Continue(())
            })
            .expect("generate");
        assert_eq!(images.len(), n);
        if i > 0 {
            totals.push(start.elapsed().as_secs_f64() * 1e3);
            for (k, ms) in ends.into_iter().enumerate() {
                per_stage[k].push(ms);
            }
        }
    }
    Timing { total_ms: median(totals), stages_ms: per_stage.into_iter().map(median).collect() }
}

fn time_theirs(py: &Path, model: &Path, embeds: &Path, threads: usize, n: usize, iters: usize) -> Option<Timing> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/diffusers_cascade_bench.py");
    let counts = [threads, n, iters].map(|k| std::ffi::OsString::from(k.to_string()));
    let mut argv = vec![model.as_os_str(), embeds.as_os_str()];
    argv.extend(counts.iter().map(|c| c.as_os_str()));
    let v = common::python_json(py, &script, &argv)?;
    let stages_ms = v["stages_ms"].as_array()?.iter().filter_map(serde_json::Value::as_f64).collect();
    Some(Timing { total_ms: v["median_ms"].as_f64()?, stages_ms })
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let threads: usize = env_or("BENCH_THREADS", "2").parse().expect("BENCH_THREADS");
    let iters: usize = env_or("BENCH_ITERS", "3").parse().expect("BENCH_ITERS");
    let model = root.join(env_or("BENCH_MODEL", "models/default"));
    let sizes: Vec<usize> = env_or("BENCH_SIZES", "1,8").split(',').map(|n| n.trim().parse().expect("BENCH_SIZES")).collect();
    tch::set_num_threads(threads as i32);
    let _guard = tch::no_grad_guard();
    let options = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };
    let cascade = Cascade::load(&model, &options).expect("load the cascade");

    // Both sides condition on the embeddings of our encoder.
    let tmp = std::env::temp_dir().join(format!("diffusiond-bench-latency-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let embeds = tmp.join("embeds.safetensors");
    let prompt = cascade.encode_prompts(&[PROMPT]).expect("encode").remove(0);
    let tensors = BTreeMap::from([
        ("prompt_embeds".to_owned(), prompt.to_kind(tch::Kind::Float)),
        ("null_embeds".to_owned(), cascade.null_text().to_kind(tch::Kind::Float)),
    ]);
    weights::save_tensors(&tensors, &embeds).expect("write embeddings");
    let py = root.join(".venv-fixtures/bin/python");

    let stages: Vec<String> = cascade
        .manifest
        .stages
        .iter()
        .map(|s| match s.strength {
            // A super-resolution stage started from the upsampled image runs only its last strength·steps.
            Some(strength) if strength < 1.0 => format!("{} {}-{} at strength {strength}", s.name, s.sampler, s.steps),
            _ => format!("{} {}-{}", s.name, s.sampler, s.steps),
        })
        .collect();
    println!("cascade {} ({}), CPU f32, {threads} threads, median of {iters}", model.display(), stages.join(" → "));
    println!("{:>4} {:>8} {:>14} {:>14} {:>12}", "n", "stage", "diffusiond ms", "diffusers ms", "theirs/ours");
    for n in sizes {
        let ours = time_ours(&cascade, n, iters);
        let theirs = py.exists().then(|| time_theirs(&py, &model, &embeds, threads, n, iters)).flatten();
        let names = cascade.manifest.stages.iter().map(|s| s.name.as_str());
        let rows = names.zip(ours.stages_ms.iter().copied()).enumerate().map(|(k, (name, ms))| (name, ms, theirs.as_ref().and_then(|t| t.stages_ms.get(k).copied())));
        let total = ("total", ours.total_ms, theirs.as_ref().map(|t| t.total_ms));
        for (name, ours_ms, theirs_ms) in rows.chain(std::iter::once(total)) {
            match theirs_ms {
                Some(t) => println!("{n:>4} {name:>8} {ours_ms:>14.0} {t:>14.0} {:>12.3}", t / ours_ms),
                None => println!("{n:>4} {name:>8} {ours_ms:>14.0} {:>14} {:>12}", "n/a", "(make refenv)"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

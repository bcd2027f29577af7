//! Scale-out throughput: the same load on one replica and on two, sharing a
//! private redis-server (`serve --store redis://…`), plus one process with the
//! embedded store for reference. Prints jobs/s and images/s for each and the
//! two-to-one ratio. A figure, not a test.
//!
//! Each replica computes on `BENCH_THREADS` threads (default 1, via
//! `OMP_NUM_THREADS`): on a 2-core machine, two one-thread replicas stand for
//! two replicas with a device each. The cascade is `BENCH_MODEL` (default the
//! tiny fixture cascade); the load is `BENCH_REQUESTS` jobs (default 48) of
//! `BENCH_STEPS` base steps (default 30), submitted at once.
//!
//!     cargo bench --bench scale_out
//!     BENCH_MODEL=models/default BENCH_REQUESTS=64 cargo bench --bench scale_out

mod common;

#[path = "../tests/cluster/mod.rs"]
mod cluster;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::env_or;
use cluster::{Redis, Replica, ReplicaOptions, Scratch};
use diffusiond::jobs::{open_store, JobStatus};
use serde_json::json;

struct Load {
    jobs: usize,
    steps: usize,
}

struct Run {
    label: String,
    secs: f64,
    jobs: usize,
    images: usize,
}

/// Submits `load` round-robin to `replicas` (async) and waits until every job
/// has finished in the store at `store_url` (or, embedded, by polling one replica).
async fn run(label: &str, replicas: &[Replica], store_url: Option<&str>, load: &Load, seed0: u64) -> Run {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut ids = Vec::with_capacity(load.jobs);
    for i in 0..load.jobs {
        let body = json!({"prompt": format!("{} red circles above a blue square", 1 + i % 3), "seed": seed0 + i as u64, "steps": load.steps});
        let base = replicas[i % replicas.len()].base();
        let r = client.post(format!("{base}/generate")).header("Prefer", "respond-async").json(&body).send().await.unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        ids.push(r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    match store_url {
        Some(url) => {
            let store = open_store(Some(url), std::path::Path::new("unused"), Duration::from_secs(3600)).unwrap();
            let ids: Vec<_> = ids.iter().map(|id| id.parse().unwrap()).collect();
            loop {
                let left = ids.iter().filter(|id| store.get(**id).unwrap().is_none_or(|j| !j.status.is_terminal())).count();
                if left == 0 {
                    break;
                }
                assert!(Instant::now() < deadline, "{label}: {left} jobs unfinished");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for id in ids {
                assert_eq!(store.get(id).unwrap().unwrap().status, JobStatus::Succeeded);
            }
        }
        None => {
            let base = replicas[0].base();
            for id in &ids {
                loop {
                    let doc: serde_json::Value = client.get(format!("{base}/jobs/{id}")).send().await.unwrap().json().await.unwrap();
                    if doc["status"] == "succeeded" {
                        break;
                    }
                    assert_ne!(doc["status"], "failed", "{doc}");
                    assert!(Instant::now() < deadline, "{label}: job {id} unfinished");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    Run { label: label.to_owned(), secs: started.elapsed().as_secs_f64(), jobs: load.jobs, images: load.jobs }
}

/// Cores left idle by other processes, measured over `window` from /proc/stat
/// (None off Linux): two one-thread replicas can only use what is free.
fn idle_cores(window: Duration) -> Option<f64> {
    let sample = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
        let idle = cpu.get(3)? + cpu.get(4).unwrap_or(&0);
        Some((idle, cpu.iter().sum()))
    };
    let (idle0, total0) = sample()?;
    std::thread::sleep(window);
    let (idle1, total1) = sample()?;
    let cores = std::thread::available_parallelism().ok()?.get() as f64;
    Some(cores * (idle1 - idle0) as f64 / (total1 - total0).max(1) as f64)
}

fn start(scratch: &Scratch, names: &[&str], options: &ReplicaOptions) -> Vec<Replica> {
    let mut replicas: Vec<Replica> = names.iter().map(|n| Replica::spawn(&scratch.0, n, options)).collect();
    for r in &mut replicas {
        r.wait_ready(Duration::from_secs(300));
    }
    replicas
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !cluster::tools_present(&["redis-server"]) {
        return;
    }
    let root = if std::path::Path::new("tests/fixtures").is_dir() { PathBuf::from(".") } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")) };
    let model = std::env::var("BENCH_MODEL").map(PathBuf::from).unwrap_or_else(|_| root.join("tests/fixtures/cascade"));
    let threads = env_or("BENCH_THREADS", "1");
    let load = Load { jobs: env_or("BENCH_REQUESTS", "48").parse().unwrap(), steps: env_or("BENCH_STEPS", "30").parse().unwrap() };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "scale-out benchmark: {} ({} jobs of {} base steps, submitted at once); each replica OMP_NUM_THREADS={threads}; {cores} cores on this machine",
        model.display(),
        load.jobs,
        load.steps
    );
    if let Some(idle) = idle_cores(Duration::from_secs(2)) {
        println!("idle before the run: {idle:.2} of {cores} cores (other processes use the rest; the ratio below cannot exceed what is free)");
    }
    let scratch = Scratch::new("bench-scale-out");
    let redis = Redis::start(&scratch.0);
    let mut options = ReplicaOptions {
        model,
        store: String::new(),
        max_active_jobs: 16,
        reclaim_after: "60",
        heartbeat: "10",
        env: vec![("OMP_NUM_THREADS".into(), threads.clone()), ("RUST_LOG".into(), "warn".into())],
        extra_args: vec![],
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let warm = Load { jobs: 4, steps: 2 };
    let mut runs = Vec::new();

    // One process alone, with the embedded store (reference).
    let alone = start(&scratch, &["alone"], &options);
    runs.push(runtime.block_on(async {
        run("alone", &alone, None, &warm, 0).await;
        run("1 process, embedded store", &alone, None, &load, 1000).await
    }));
    drop(alone);

    // One replica, then two, on the shared queue (a database each, so each starts empty).
    for (replicas, db) in [(1usize, 1), (2, 2)] {
        options.store = format!("redis://127.0.0.1:{}/{db}", redis.port);
        let names: Vec<String> = (0..replicas).map(|i| format!("r{db}-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let group = start(&scratch, &names, &options);
        let label = format!("{replicas} replica{} on Redis", if replicas == 1 { "" } else { "s" });
        runs.push(runtime.block_on(async {
            run(&label, &group, Some(&options.store), &warm, 0).await;
            run(&label, &group, Some(&options.store), &load, 1000).await
        }));
    }

    println!("{:<28} {:>9} {:>9} {:>10}", "setup", "seconds", "jobs/s", "images/s");
    for r in &runs {
        println!("{:<28} {:>9.2} {:>9.2} {:>10.2}", r.label, r.secs, r.jobs as f64 / r.secs, r.images as f64 / r.secs);
    }
    let (one, two) = (&runs[1], &runs[2]);
    println!(
        "two replicas vs one: {:.2}x throughput (target >= 1.8x with a device per replica); Redis vs embedded, one process: {:.2}x",
        one.secs / two.secs,
        runs[0].secs / one.secs
    );
}

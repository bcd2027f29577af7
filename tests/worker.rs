//! The batching worker on the tiny fixture cascade: many different requests run
//! together in far fewer UNet calls than alone, each image bit-identical to the
//! same request run alone; cancellation; jobs left by a previous run resume.

mod common;

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fixture_dir;
use common::worker::{spawn_ready, wait_for};
use diffusiond::diffusion::SamplerKind;
use diffusiond::jobs::embedded::EmbeddedStore;
use diffusiond::jobs::{now_ms, JobId, JobQueue, JobRecord, JobStatus, JobStore};
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, GenerationRequest, LoadOptions, Mask, NoiseMix, Picture, RequestSpec, SourceSpec};
use diffusiond::worker::{EngineConfig, QueueLimits, WorkerHandle, WorkerSettings};

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("diffusiond-worker-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn start(store: Arc<dyn JobStore>, engine: EngineConfig) -> WorkerHandle {
    let settings = WorkerSettings {
        model_dir: fixture_dir().join("cascade"),
        load: CPU,
        engine,
        limits: QueueLimits { max_waiting_jobs: 64, retry_after_secs: 1 },
        warmup: false,
    };
    spawn_ready(settings, store)
}

fn picture(name: &str) -> image::DynamicImage {
    image::open(fixture_dir().join("edit").join(name)).unwrap()
}

/// Different requests: steps, samplers, guidance, n, negative prompts, previews,
/// and every kind of image input and noise mix.
fn requests(cascade: &Cascade) -> Vec<GenerationRequest> {
    let base = RequestSpec { prompt: "a red circle on top of a blue square".into(), n: 1, ..Default::default() };
    let image = Picture::from_image(&picture("image32.png"));
    let mask = Mask::from_image(&picture("mask32.png"));
    let specs = [
        RequestSpec { seed: Some(7), n: 2, source: Some(SourceSpec::Image { image: image.clone(), strength: Some(0.5) }), ..base.clone() },
        RequestSpec { seed: Some(8), source: Some(SourceSpec::Inpaint { image: image.clone(), mask, strength: None }), preview_every: Some(2), ..base.clone() },
        RequestSpec { seed: Some(9), prompt: String::new(), source: Some(SourceSpec::Upscale { image: image.resized((16, 16)) }), ..base.clone() },
        RequestSpec { seed: Some(10), stages: Some(1), steps: Some(5), source: Some(SourceSpec::Invert { image, prompt: Some("a square".into()) }), ..base.clone() },
        RequestSpec { seed: Some(11), n: 2, noise: NoiseMix::Variation { seed: 99, strength: 0.3 }, ..base.clone() },
        RequestSpec { seed: Some(12), n: 3, noise: NoiseMix::Interpolation { seed: 98, prompt: Some("two yellow stars".into()) }, ..base.clone() },
        RequestSpec { seed: Some(1), ..base.clone() },
        RequestSpec { seed: Some(2), n: 3, steps: Some(6), sampler: Some(SamplerKind::Ddim), eta: Some(0.5), ..base.clone() },
        RequestSpec { seed: Some(3), guidance_scale: Some(7.5), negative_prompt: Some("green".into()), ..base.clone() },
        RequestSpec { seed: Some(4), prompt: "two yellow stars".into(), sampler: Some(SamplerKind::DpmSolverPlusPlus), ..base.clone() },
        RequestSpec { seed: Some(5), stages: Some(1), guidance_scale: Some(1.0), ..base.clone() },
        RequestSpec { seed: Some(6), n: 2, steps: Some(3), ..base },
    ];
    specs.iter().map(|s| cascade.plan(s).unwrap()).collect()
}

#[test]
fn concurrent_requests_share_unet_calls_and_match_running_alone() {
    let cascade = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
    let requests = requests(&cascade);
    // What each request gives alone, and how many UNet calls that takes.
    let mut alone = Vec::new();
    let mut sequential_calls = 0;
    for r in &requests {
        alone.push(cascade.generate(r, &mut |_| ControlFlow::Continue(())).unwrap());
        sequential_calls += cascade.total_steps(r);
    }

    let dir = temp_dir("batch");
    let store: Arc<dyn JobStore> = Arc::new(EmbeddedStore::open(&dir).unwrap());
    let worker = start(store.clone(), EngineConfig::default());
    let records = common::worker::run_jobs(&worker, store.as_ref(), &requests, Duration::from_secs(120));
    for ((record, want), request) in records.iter().zip(&alone).zip(&requests) {
        assert_eq!(record.status, JobStatus::Succeeded, "{:?}", record.error);
        assert_eq!(record.images.len(), request.n);
        for (i, image) in want.iter().enumerate() {
            let png = store.image(record.id, i).unwrap().unwrap();
            assert_eq!(png, image.png().unwrap(), "job {} image {i} differs from the request run alone", record.id);
        }
        assert_eq!(record.progress.as_ref().map(|p| p.fraction), Some(1.0));
        // A job that asked for previews keeps its latest one with its progress.
        let preview = record.progress.as_ref().and_then(|p| p.preview.as_ref());
        assert_eq!(preview.is_some(), request.preview_every.is_some(), "job {}", record.id);
    }
    let calls = worker.stats.unet_calls.load(Ordering::Relaxed);
    println!("{} requests: {calls} batched UNet calls vs {sequential_calls} one at a time", requests.len());
    assert!(calls * 2 < sequential_calls as u64, "{calls} calls is not far fewer than {sequential_calls}");
    worker.queue.close();
    worker.thread.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_running_job_can_be_canceled_and_others_finish() {
    let cascade = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
    let spec = RequestSpec { prompt: "a star".into(), n: 1, seed: Some(9), steps: Some(400), ..Default::default() };
    let long = cascade.plan(&spec).unwrap();
    let short = cascade.plan(&RequestSpec { steps: Some(2), ..spec }).unwrap();
    let dir = temp_dir("cancel");
    let store: Arc<dyn JobStore> = Arc::new(EmbeddedStore::open(&dir).unwrap());
    let worker = start(store.clone(), EngineConfig::default());
    let a = JobRecord::new(JobId::new_v4(), None, long, now_ms());
    let b = JobRecord::new(JobId::new_v4(), None, short, now_ms());
    for job in [&a, &b] {
        store.create(job).unwrap();
        worker.queue.submit(job.id).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.get(a.id).unwrap().unwrap().status != JobStatus::Running {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    store.cancel(a.id, now_ms()).unwrap();
    worker.queue.cancel(a.id);
    let records = wait_for(store.as_ref(), &[a.id, b.id], Duration::from_secs(120));
    assert_eq!(records[0].status, JobStatus::Canceled);
    assert_eq!(records[1].status, JobStatus::Succeeded);
    worker.queue.close();
    worker.thread.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn jobs_left_queued_or_running_by_a_previous_run_resume() {
    let cascade = Cascade::load(&fixture_dir().join("cascade"), &CPU).unwrap();
    let request = cascade.plan(&RequestSpec { prompt: "a ring".into(), n: 2, seed: Some(77), ..Default::default() }).unwrap();
    let want = cascade.generate(&request, &mut |_| ControlFlow::Continue(())).unwrap();
    let dir = temp_dir("resume");
    let ids = {
        // A previous run accepted two jobs and had started one when it died.
        let store = EmbeddedStore::open(&dir).unwrap();
        let queued = JobRecord::new(JobId::new_v4(), None, request.clone(), now_ms());
        let running = JobRecord::new(JobId::new_v4(), None, request.clone(), now_ms());
        store.create(&queued).unwrap();
        store.create(&running).unwrap();
        store.start(running.id, now_ms()).unwrap();
        vec![queued.id, running.id]
    };
    let store: Arc<dyn JobStore> = Arc::new(EmbeddedStore::open(&dir).unwrap());
    let worker = start(store.clone(), EngineConfig::default());
    let records = wait_for(store.as_ref(), &ids, Duration::from_secs(120));
    for record in &records {
        assert_eq!(record.status, JobStatus::Succeeded);
        assert_eq!(store.image(record.id, 1).unwrap().unwrap(), want[1].png().unwrap());
    }
    assert_eq!(records[1].attempts, 2, "the interrupted job was started a second time");
    worker.queue.close();
    worker.thread.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_warm_up_runs_a_cascade_whose_super_resolution_stage_starts_part_way() {
    // A stage strength below 1 (as models/default ships) runs only part of
    // its steps; the warm-up's single step must still run, or the server
    // would never become ready.
    let dir = temp_dir("warm-up");
    common::copy_dir(&fixture_dir().join("cascade"), &dir);
    let manifest = dir.join("cascade.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["stages"][1]["strength"] = serde_json::json!(0.3);
    let encoder = std::fs::canonicalize(fixture_dir().join("cascade").join(m["text_encoder"]["path"].as_str().unwrap())).unwrap();
    m["text_encoder"]["path"] = encoder.display().to_string().into();
    std::fs::write(&manifest, m.to_string()).unwrap();
    let store: Arc<dyn JobStore> = Arc::new(EmbeddedStore::open(&dir.join("store")).unwrap());
    let settings = WorkerSettings { model_dir: dir.clone(), load: CPU, engine: EngineConfig::default(), limits: QueueLimits { max_waiting_jobs: 4, retry_after_secs: 1 }, warmup: true };
    let handle = spawn_ready(settings, store);
    handle.queue.close();
    handle.thread.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

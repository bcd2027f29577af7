//! The batching worker over an embedded store, for the tests that compare
//! batched jobs with the same requests run alone.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diffusiond::jobs::{event_channel, now_ms, JobId, JobQueue, JobRecord, JobStatus, JobStore};
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{GeneratedImage, GenerationRequest, LoadOptions};
use diffusiond::worker::{readiness_channel, spawn, EngineConfig, QueueLimits, Readiness, WorkerHandle, WorkerSettings};

/// A worker on the cascade in `model_dir` over `store`, once ready (a failed
/// start panics with its reason).
pub fn start_worker(model_dir: &Path, store: Arc<dyn JobStore>, warmup: bool) -> WorkerHandle {
    let settings = WorkerSettings {
        model_dir: model_dir.to_owned(),
        load: LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 },
        engine: EngineConfig::default(),
        limits: QueueLimits { max_waiting_jobs: 16, retry_after_secs: 1 },
        warmup,
    };
    spawn_ready(settings, store)
}

/// A worker with `settings` over `store`, once ready: it waits up to a
/// minute, and a failed start panics with its reason.
pub fn spawn_ready(settings: WorkerSettings, store: Arc<dyn JobStore>) -> WorkerHandle {
    let (tx, mut rx) = readiness_channel();
    let worker = spawn(settings, store, event_channel(), Arc::new(tx)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rx.borrow_and_update().is_ready() {
        if let Readiness::Failed(e) = &*rx.borrow() {
            panic!("worker failed: {e}");
        }
        assert!(Instant::now() < deadline, "worker not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    worker
}

/// Submits `requests` as jobs at once and waits up to `timeout` for every
/// one to end; their records, in order.
pub fn run_jobs(worker: &WorkerHandle, store: &dyn JobStore, requests: &[GenerationRequest], timeout: Duration) -> Vec<JobRecord> {
    let ids: Vec<JobId> = requests
        .iter()
        .map(|r| {
            let job = JobRecord::new(JobId::new_v4(), None, r.clone(), now_ms());
            store.create(&job).unwrap();
            worker.queue.submit(job.id).unwrap();
            job.id
        })
        .collect();
    wait_for(store, &ids, timeout)
}

/// Waits up to `timeout` for the jobs `ids` to end; their records, in order.
pub fn wait_for(store: &dyn JobStore, ids: &[JobId], timeout: Duration) -> Vec<JobRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let records: Vec<JobRecord> = ids.iter().map(|id| store.get(*id).unwrap().unwrap()).collect();
        if records.iter().all(|r| r.status.is_terminal()) {
            return records;
        }
        assert!(Instant::now() < deadline, "jobs did not finish: {:?}", records.iter().map(|r| r.status).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every job succeeded with the PNG files its request gave alone.
pub fn assert_same_as_alone(store: &dyn JobStore, records: &[JobRecord], alone: &[Vec<GeneratedImage>]) {
    for (record, want) in records.iter().zip(alone) {
        assert_eq!(record.status, JobStatus::Succeeded, "{:?}", record.error);
        for (i, image) in want.iter().enumerate() {
            assert_eq!(store.image(record.id, i).unwrap().unwrap(), image.png().unwrap(), "job {} image {i} differs from its request alone", record.id);
        }
    }
}

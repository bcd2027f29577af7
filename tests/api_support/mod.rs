//! Fakes for the HTTP handler tests: an in-memory `JobStore`, a `JobQueue` that
//! can hold jobs, refuse them, or finish them the way the worker does (store
//! first, then the event), and a two-stage `CascadeInfo` built without models.

#![allow(dead_code)] // Each test binary uses a different part.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use diffusiond::api::{router, ApiConfig, AppState};
use diffusiond::diffusion::{SamplerKind, Scheduler, SchedulerConfig};
use diffusiond::jobs::store::{Result as StoreResult, StatusCounts};
use diffusiond::jobs::{
    event_channel, now_ms, Created, EventSender, ImageInfo, JobError, JobEvent, JobId, JobProgress, JobQueue, JobRecord, JobStatus, JobStore,
    QueueError,
};
use diffusiond::pipeline::stage::{StageDefaults, StageKind};
use diffusiond::pipeline::{CascadeInfo, StageLimits};
use diffusiond::worker::{readiness_channel, Readiness, ReadinessSender};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// A job and its PNGs.
type Entry = (JobRecord, Vec<Vec<u8>>);

#[derive(Default)]
pub struct FakeStore {
    jobs: Mutex<HashMap<JobId, Entry>>,
}

impl FakeStore {
    pub fn status(&self, id: JobId) -> Option<JobStatus> {
        self.jobs.lock().unwrap().get(&id).map(|(r, _)| r.status)
    }

    pub fn len(&self) -> usize {
        self.jobs.lock().unwrap().len()
    }
}

impl JobStore for FakeStore {
    fn create(&self, job: &JobRecord) -> StoreResult<Created> {
        let mut jobs = self.jobs.lock().unwrap();
        if let Some((existing, _)) = jobs.get(&job.id) {
            return Ok(Created { record: existing.clone(), created: false });
        }
        jobs.insert(job.id, (job.clone(), Vec::new()));
        Ok(Created { record: job.clone(), created: true })
    }

    fn get(&self, id: JobId) -> StoreResult<Option<JobRecord>> {
        Ok(self.jobs.lock().unwrap().get(&id).map(|(r, _)| r.clone()))
    }

    fn unfinished(&self) -> StoreResult<Vec<JobRecord>> {
        Ok(self.jobs.lock().unwrap().values().filter(|(r, _)| !r.status.is_terminal()).map(|(r, _)| r.clone()).collect())
    }

    fn start(&self, id: JobId, now: i64) -> StoreResult<bool> {
        let mut jobs = self.jobs.lock().unwrap();
        let Some((r, _)) = jobs.get_mut(&id).filter(|(r, _)| !r.status.is_terminal()) else { return Ok(false) };
        r.status = JobStatus::Running;
        r.started_at.get_or_insert(now);
        r.attempts += 1;
        Ok(true)
    }

    fn set_progress(&self, id: JobId, progress: &JobProgress) -> StoreResult<()> {
        if let Some((r, _)) = self.jobs.lock().unwrap().get_mut(&id).filter(|(r, _)| r.status == JobStatus::Running) {
            r.progress = Some(progress.clone());
        }
        Ok(())
    }

    fn complete(&self, id: JobId, images: &[(ImageInfo, Vec<u8>)], now: i64) -> StoreResult<bool> {
        let mut jobs = self.jobs.lock().unwrap();
        let Some((r, pngs)) = jobs.get_mut(&id).filter(|(r, _)| !r.status.is_terminal()) else { return Ok(false) };
        r.status = JobStatus::Succeeded;
        r.completed_at = Some(now);
        r.images = images.iter().map(|(i, _)| i.clone()).collect();
        *pngs = images.iter().map(|(_, p)| p.clone()).collect();
        Ok(true)
    }

    fn fail(&self, id: JobId, error: &JobError, now: i64) -> StoreResult<bool> {
        let mut jobs = self.jobs.lock().unwrap();
        let Some((r, _)) = jobs.get_mut(&id).filter(|(r, _)| !r.status.is_terminal()) else { return Ok(false) };
        r.status = JobStatus::Failed;
        r.error = Some(error.clone());
        r.completed_at = Some(now);
        Ok(true)
    }

    fn cancel(&self, id: JobId, now: i64) -> StoreResult<Option<JobRecord>> {
        let mut jobs = self.jobs.lock().unwrap();
        let Some((r, _)) = jobs.get_mut(&id) else { return Ok(None) };
        if !r.status.is_terminal() {
            r.status = JobStatus::Canceled;
            r.completed_at = Some(now);
        }
        Ok(Some(r.clone()))
    }

    fn image(&self, id: JobId, index: usize) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.jobs.lock().unwrap().get(&id).and_then(|(_, p)| p.get(index).cloned()))
    }

    fn purge_finished(&self, _before: i64) -> StoreResult<usize> {
        Ok(0)
    }

    fn counts(&self) -> StoreResult<StatusCounts> {
        Ok(Vec::new())
    }
}

/// What the fake queue does with a submitted job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behaviour {
    /// Leave it waiting (tests finish it with [`FakeQueue::finish`]).
    Hold,
    Succeed,
    Fail,
    Cancel,
    /// Refuse at `check_capacity`.
    Full,
}

/// The bytes the fake "generates" for image `i` (a PNG signature, then a marker).
pub fn fake_png(i: usize) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(format!("image-{i}").as_bytes());
    png
}

pub struct FakeQueue {
    store: Arc<FakeStore>,
    events: EventSender,
    pub behaviour: Mutex<Behaviour>,
    waiting: Mutex<Vec<JobId>>,
    pub submitted: Mutex<Vec<JobId>>,
    pub canceled: Mutex<Vec<JobId>>,
}

impl FakeQueue {
    /// Finishes `id` as the worker would: every state change in the store first, then its event.
    pub fn finish(&self, id: JobId, how: Behaviour) {
        self.waiting.lock().unwrap().retain(|w| *w != id);
        let (store, events) = (&self.store, &self.events);
        let send = |e: JobEvent| {
            let _ = events.send(e);
        };
        let Some(job) = store.get(id).unwrap() else { return };
        if how == Behaviour::Cancel {
            store.cancel(id, now_ms()).unwrap();
            send(JobEvent::Finished { id, status: JobStatus::Canceled });
            return;
        }
        store.start(id, now_ms()).unwrap();
        send(JobEvent::Started { id });
        let stages = job.request.stages.len();
        for (k, stage) in job.request.stages.iter().enumerate() {
            let total = stage.sampler.steps;
            let progress = JobProgress {
                stage: k,
                stages,
                stage_name: stage.name.clone(),
                step: total,
                total_steps: total,
                fraction: (k + 1) as f64 / stages as f64,
                preview: None,
            };
            store.set_progress(id, &progress).unwrap();
            send(JobEvent::Progress { id, progress });
            send(JobEvent::StageDone { id, stage: k, stage_name: stage.name.clone() });
        }
        if how == Behaviour::Fail {
            store.fail(id, &JobError { kind: "out_of_memory".into(), message: "the device ran out of memory".into() }, now_ms()).unwrap();
            send(JobEvent::Finished { id, status: JobStatus::Failed });
            return;
        }
        let images: Vec<(ImageInfo, Vec<u8>)> =
            (0..job.request.n).map(|i| (ImageInfo { index: i, seed: job.request.image_seed(i), width: 32, height: 32 }, fake_png(i))).collect();
        store.complete(id, &images, now_ms() + 5).unwrap();
        send(JobEvent::Finished { id, status: JobStatus::Succeeded });
    }
}

/// The queue shared with a spawned finisher.
pub struct SharedQueue(pub Arc<FakeQueue>);

impl JobQueue for SharedQueue {
    fn check_capacity(&self, _images: usize) -> Result<(), QueueError> {
        match *self.0.behaviour.lock().unwrap() {
            Behaviour::Full => Err(QueueError::Full { depth: 3, retry_after_secs: 7 }),
            _ => Ok(()),
        }
    }

    fn submit(&self, id: JobId) -> Result<(), QueueError> {
        let queue = Arc::clone(&self.0);
        queue.submitted.lock().unwrap().push(id);
        queue.waiting.lock().unwrap().push(id);
        let _ = queue.events.send(JobEvent::Queued { id });
        let how = *queue.behaviour.lock().unwrap();
        if how != Behaviour::Hold {
            // Later, on the runtime, like a worker thread would.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                queue.finish(id, how);
            });
        }
        Ok(())
    }

    fn cancel(&self, id: JobId) {
        self.0.canceled.lock().unwrap().push(id);
        self.0.waiting.lock().unwrap().retain(|w| *w != id);
    }

    fn position(&self, id: JobId) -> Option<usize> {
        self.0.waiting.lock().unwrap().iter().position(|w| *w == id)
    }

    fn depth(&self) -> usize {
        self.0.waiting.lock().unwrap().len()
    }
}

/// A two-stage cascade description: base 16×16 (10 DDPM steps, guidance 4),
/// SR 32×32 (8 steps, noise level 250, DDIM's ε̂ from the clipped x̂_0);
/// 1000 training steps each.
pub fn cascade_info() -> CascadeInfo {
    let scheduler = Scheduler::new(SchedulerConfig::default()).unwrap();
    let stage = |name: &str, kind, size, steps, guidance_scale, noise_level: Option<i64>| StageLimits {
        name: name.into(),
        kind,
        size,
        defaults: StageDefaults { sampler: SamplerKind::Ddpm, steps, guidance_scale, eta: 0.0, clipped_model_output: noise_level.is_some(), noise_level, layout_guidance_scale: 0.0, strength: 1.0 },
        train_steps: 1000,
        max_noise_level: if noise_level.is_some() { 999 } else { 0 },
        scheduler: scheduler.clone(),
        clip_image_size: None,
    };
    CascadeInfo {
        name: "tiny-if".into(),
        description: Some("test cascade".into()),
        device: "cpu".into(),
        precision: "f32".into(),
        encoder_kind: "bert".into(),
        encoder_hidden_size: 32,
        encoder_max_length: 16,
        stages: vec![
            (stage("base", StageKind::Base, (16, 16), 10, 4.0, None), 1000),
            (stage("sr", StageKind::SuperResolution, (32, 32), 8, 3.0, Some(250)), 2000),
        ],
    }
}

pub struct Harness {
    pub router: Router,
    pub store: Arc<FakeStore>,
    pub queue: Arc<FakeQueue>,
    pub readiness: ReadinessSender,
}

impl Harness {
    pub fn new(behaviour: Behaviour) -> Self {
        Self::with_config(behaviour, ApiConfig::default())
    }

    pub fn with_config(behaviour: Behaviour, config: ApiConfig) -> Self {
        let store = Arc::new(FakeStore::default());
        let events = event_channel();
        let queue = Arc::new(FakeQueue {
            store: Arc::clone(&store),
            events: events.clone(),
            behaviour: Mutex::new(behaviour),
            waiting: Mutex::default(),
            submitted: Mutex::default(),
            canceled: Mutex::default(),
        });
        let (readiness, rx) = readiness_channel();
        readiness.send_replace(Readiness::Ready(Arc::new(cascade_info())));
        let state = AppState::new(store.clone(), Arc::new(SharedQueue(Arc::clone(&queue))), events, rx, config);
        Self { router: router(state), store, queue, readiness }
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        *self.queue.behaviour.lock().unwrap() = b;
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        Reply::read(response).await
    }
}

/// A response with its body read.
pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub async fn read(response: Response<Body>) -> Self {
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(10), body.collect()).await.expect("body within 10 s").unwrap().to_bytes().to_vec();
        Self { status: parts.status, headers: parts.headers, body }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn post_json(uri: &str, body: &serde_json::Value) -> Request<Body> {
    json_request("POST", uri, body)
}

pub fn json_request(method: &str, uri: &str, body: &serde_json::Value) -> Request<Body> {
    Request::builder().method(method).uri(uri).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap()
}

pub fn get(uri: &str) -> Request<Body> {
    Request::builder().uri(uri).body(Body::empty()).unwrap()
}

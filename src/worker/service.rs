//! Starting the compute thread: load the cascade, run one warm-up generation,
//! put the jobs a previous run left unfinished back in the queue (with the
//! embedded store; a shared queue keeps its own), announce readiness, then
//! batch until drained.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::engine::{Engine, EngineConfig, EngineStats};
use super::queue::{LocalQueue, QueueLimits};
use super::readiness::{Readiness, ReadinessSender};
use crate::jobs::{EventSender, JobStore};
use crate::pipeline::stage::StageKind;
use crate::pipeline::{Cascade, LoadOptions, RequestSpec, StageOverride};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub model_dir: PathBuf,
    pub load: LoadOptions,
    pub engine: EngineConfig,
    pub limits: QueueLimits,
    /// Run one tiny generation before reporting ready (first calls are slow).
    pub warmup: bool,
}

/// What the rest of the server holds of the worker.
pub struct WorkerHandle {
    pub queue: Arc<LocalQueue>,
    pub stats: Arc<EngineStats>,
    pub thread: JoinHandle<()>,
}

/// One step per stage, one image: exercises every stage's kernels once.
/// Super-resolution stages run from noise (strength 1): a stage's default
/// strength below 1 would leave its single step nothing to run.
fn warm_up(cascade: &Cascade) -> Result<(), crate::pipeline::PipelineError> {
    // One step at every stage; super-resolution stages from noise, so that
    // their one step runs whatever their default strength.
    let one = |stage: &crate::pipeline::stage::Stage| StageOverride {
        steps: Some(1),
        strength: (stage.kind == StageKind::SuperResolution).then_some(1.0),
        ..Default::default()
    };
    let spec = RequestSpec {
        prompt: "warm-up".into(),
        n: 1,
        seed: Some(0),
        stage_overrides: cascade.stages.iter().enumerate().map(|(i, s)| (i, one(s))).collect(),
        ..Default::default()
    };
    cascade.generate(&cascade.plan(&spec)?, &mut |_| ControlFlow::Continue(())).map(|_| ())
}

/// Where the jobs a previous run left come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// This process owns the store: queue its unfinished jobs again at start.
    FromStore,
    /// Replicas share the store and a queue whose pending entries are the
    /// truth (`redis_intake` feeds the worker): resume nothing here.
    Nothing,
}

/// Spawns the compute thread, resuming the store's unfinished jobs.
pub fn spawn(settings: WorkerSettings, store: Arc<dyn JobStore>, events: EventSender, readiness: Arc<ReadinessSender>) -> std::io::Result<WorkerHandle> {
    spawn_with(settings, Resume::FromStore, store, events, readiness)
}

/// Spawns the compute thread.
pub fn spawn_with(
    settings: WorkerSettings,
    resume: Resume,
    store: Arc<dyn JobStore>,
    events: EventSender,
    readiness: Arc<ReadinessSender>,
) -> std::io::Result<WorkerHandle> {
    let queue = Arc::new(LocalQueue::new(settings.limits));
    let stats = Arc::new(EngineStats::default());
    let (q, s) = (queue.clone(), stats.clone());
    let thread = std::thread::Builder::new().name("diffusiond-worker".into()).spawn(move || {
        let started = Instant::now();
        let cascade = match Cascade::load(&settings.model_dir, &settings.load) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "loading the cascade failed");
                readiness.send_replace(Readiness::Failed(e.to_string()));
                return;
            }
        };
        tracing::info!(model = %cascade.manifest.name, device = ?cascade.device(), secs = started.elapsed().as_secs_f64(), "cascade loaded");
        if settings.warmup {
            let t = Instant::now();
            if let Err(e) = warm_up(&cascade) {
                tracing::error!(error = %e, "warm-up generation failed");
                readiness.send_replace(Readiness::Failed(format!("warm-up generation failed: {e}")));
                return;
            }
            tracing::info!(secs = t.elapsed().as_secs_f64(), "warm-up generation done");
        }
        match if resume == Resume::FromStore { store.unfinished() } else { Ok(Vec::new()) } {
            Ok(jobs) => {
                if !jobs.is_empty() {
                    tracing::info!(jobs = jobs.len(), "resuming unfinished jobs");
                }
                for job in jobs {
                    q.resume(job.id);
                }
            }
            Err(e) => {
                readiness.send_replace(Readiness::Failed(format!("reading unfinished jobs failed: {e}")));
                return;
            }
        }
        readiness.send_replace(Readiness::Ready(Arc::new(cascade.info())));
        Engine::new(cascade, store, q, events, settings.engine, s).run();
        tracing::info!("worker drained");
    })?;
    Ok(WorkerHandle { queue, stats, thread })
}

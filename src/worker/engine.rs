//! The compute thread: step-level continuous batching over every running job.
//!
//! Requests differ in steps, sampler, guidance, seeds and n, but at one stage
//! the UNet is the same. Each iteration takes the stage of the oldest running
//! job, gathers the next-step rows of every running job at that stage (each at
//! its own timestep, with its own guidance scale, `[uncond; cond]` rows and
//! sampler state; see `pipeline::denoise`), runs them through the UNet in one
//! call, and hands each job its slice of the output. A job that arrives joins at
//! the next iteration; a job moves to the next stage as soon as it finishes one.
//! This is the iteration-level scheduling of Orca (Yu et al., OSDI 2022) applied
//! to denoising steps.
//!
//! Batching never changes an image: every row's arithmetic is independent of
//! the others in the call (see `nn::layers::Linear`), and each image draws noise
//! from its own seeded stream.

use std::num::NonZeroUsize;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use tch::Tensor;

use super::queue::LocalQueue;
use crate::metrics as m;
use base64::Engine as _;

use crate::jobs::{now_ms, EventSender, ImageInfo, JobError, JobEvent, JobPreview, JobProgress, JobRecord, JobStatus, JobStore};
use crate::pipeline::denoise::{ModelRows, StageJob};
use crate::pipeline::{png, Cascade, JobText, PipelineError};

/// Tuning of the batching loop.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most UNet rows (guided images count twice) in one call.
    pub max_batch_rows: usize,
    /// Most jobs running at once.
    pub max_active_jobs: usize,
    /// Prompt embeddings kept in the LRU cache.
    pub text_cache_entries: usize,
    /// Progress is written to the store at most this often per job (events are
    /// sent every step).
    pub progress_interval: Duration,
    /// A job started this many times without finishing (a crash each time) fails.
    pub max_attempts: u32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_rows: 32,
            max_active_jobs: 16,
            text_cache_entries: 1024,
            progress_interval: Duration::from_millis(250),
            max_attempts: 3,
        }
    }
}

/// Counters tests and benchmarks read to see batching at work.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub unet_calls: AtomicU64,
    pub unet_rows: AtomicU64,
    pub jobs_finished: AtomicU64,
    /// Time spent in UNet calls and in sampler steps (the model's share of the work).
    pub compute_nanos: AtomicU64,
    /// Time spent writing progress and results to the store.
    pub store_nanos: AtomicU64,
}

/// One running job.
struct Active {
    record: JobRecord,
    /// Index into `record.request.stages`.
    k: usize,
    job: StageJob,
    /// The job's text conditioning.
    text: JobText,
    /// Admission order, for fairness between stages.
    seq: u64,
    steps_before: usize,
    total_steps: usize,
    last_write: Instant,
    /// The job's first start (what the store keeps as `started_at`), for the
    /// queue and compute times.
    started_at: i64,
    /// The latest preview (kept in every progress written to the store).
    preview: Option<JobPreview>,
}

pub struct Engine {
    cascade: Cascade,
    store: Arc<dyn JobStore>,
    queue: Arc<LocalQueue>,
    events: EventSender,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    text_cache: LruCache<String, Tensor>,
    active: Vec<Active>,
    next_seq: u64,
}

/// Failure types clients see in a job's `error.type`.
const ERR_INTERNAL: &str = "internal_error";
const ERR_INVALID: &str = "invalid_request";

impl Engine {
    pub fn new(cascade: Cascade, store: Arc<dyn JobStore>, queue: Arc<LocalQueue>, events: EventSender, config: EngineConfig, stats: Arc<EngineStats>) -> Self {
        let cap = NonZeroUsize::new(config.text_cache_entries.max(1)).expect("non-zero");
        Self { cascade, store, queue, events, config, stats, text_cache: LruCache::new(cap), active: Vec::new(), next_seq: 0 }
    }

    pub fn cascade(&self) -> &Cascade {
        &self.cascade
    }

    /// Runs until the queue is closed and every running job has finished.
    pub fn run(mut self) {
        loop {
            // libtorch reports some failures (a CUDA error while drawing noise or
            // encoding images) by panicking through tch. The thread must outlive
            // them: the jobs in flight fail, the server keeps serving.
            match std::panic::catch_unwind(AssertUnwindSafe(|| self.iteration())) {
                Ok(ControlFlow::Break(())) => return,
                Ok(ControlFlow::Continue(())) => {}
                Err(panic) => {
                    let message = panic_message(panic);
                    tracing::error!(%message, jobs = self.active.len(), "worker iteration panicked; failing the running jobs");
                    for a in std::mem::take(&mut self.active) {
                        self.fail(&a.record, ERR_INTERNAL, "the model failed on this batch");
                    }
                }
            }
        }
    }

    /// One pass: cancellations, admissions, one UNet call. Breaks when drained.
    fn iteration(&mut self) -> ControlFlow<()> {
        self.apply_cancellations();
        let draining = self.queue.is_closed();
        if !draining {
            self.admit();
        }
        if self.active.is_empty() {
            if draining {
                return ControlFlow::Break(());
            }
            self.queue.wait(Duration::from_millis(200));
            return ControlFlow::Continue(());
        }
        self.step();
        ControlFlow::Continue(())
    }

    fn emit(&self, event: JobEvent) {
        // No listener is fine: events are a convenience, the store is the truth.
        let _ = self.events.send(event);
    }

    fn apply_cancellations(&mut self) {
        let canceled = self.queue.take_canceled();
        if canceled.is_empty() {
            return;
        }
        let (gone, kept): (Vec<Active>, Vec<Active>) = self.active.drain(..).partition(|a| canceled.contains(&a.record.id));
        self.active = kept;
        for a in gone {
            if let Err(e) = self.store.cancel(a.record.id, now_ms()) {
                tracing::error!(job = %a.record.id, error = %e, "recording a cancellation failed");
            }
            a.record.span().in_scope(|| tracing::info!("canceled while running"));
            metrics::counter!(m::JOBS, m::LABEL_STATUS => "canceled").increment(1);
            self.emit(JobEvent::Finished { id: a.record.id, status: JobStatus::Canceled });
        }
    }

    /// Moves waiting jobs into the running set, encoding their prompts in one batch.
    fn admit(&mut self) {
        let mut new = Vec::new();
        while self.active.len() + new.len() < self.config.max_active_jobs {
            let Some(id) = self.queue.pop() else { break };
            match self.store.get(id) {
                Ok(Some(record)) if !record.status.is_terminal() => new.push(record),
                Ok(_) => {}
                Err(e) => tracing::error!(job = %id, error = %e, "reading a queued job failed; it stays queued in the store"),
            }
        }
        if new.is_empty() {
            return;
        }
        if let Err(e) = self.cache_prompts(&new) {
            for record in new {
                self.fail(&record, ERR_INTERNAL, &format!("text encoding failed: {e}"));
            }
            return;
        }
        for record in new {
            self.start_job(record);
        }
    }

    fn cache_prompts(&mut self, records: &[JobRecord]) -> Result<(), PipelineError> {
        let mut missing: Vec<&str> = Vec::new();
        for r in records {
            for p in r.request.prompts() {
                if !self.text_cache.contains(p) && !missing.contains(&p) {
                    missing.push(p);
                }
            }
        }
        let encoded = self.cascade.encode_prompts(&missing)?;
        for (p, t) in missing.into_iter().zip(encoded) {
            self.text_cache.put(p.to_owned(), t);
        }
        Ok(())
    }

    fn text_for(&mut self, record: &JobRecord) -> Result<JobText, PipelineError> {
        let cache = &mut self.text_cache;
        self.cascade.job_text(&record.request, &mut |p| cache.get(p).map(Tensor::shallow_clone))
    }

    fn start_job(&mut self, record: JobRecord) {
        let id = record.id;
        if record.attempts >= self.config.max_attempts {
            let msg = format!("the job was interrupted {} times and will not be retried", record.attempts);
            self.fail(&record, ERR_INTERNAL, &msg);
            return;
        }
        let now = now_ms();
        // `start` sets `started_at` only on the first attempt; mirror it here
        // instead of reading the record back when the job completes.
        let started_at = record.started_at.unwrap_or(now);
        match self.store.start(id, now) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(job = %id, error = %e, "could not mark the job running");
                return;
            }
        }
        let text = match self.text_for(&record) {
            Ok(text) => text,
            Err(_) => {
                self.fail(&record, ERR_INTERNAL, "prompt embedding missing from the cache");
                return;
            }
        };
        match self.cascade.start_stage(&record.request, 0, &text, None) {
            Ok(job) => {
                let total_steps = self.cascade.total_steps(&record.request).max(1);
                record.span().in_scope(|| tracing::info!(images = record.request.n, stages = record.request.stages.len(), "started"));
                self.emit(JobEvent::Started { id });
                let seq = self.next_seq;
                self.next_seq += 1;
                self.active.push(Active { record, k: 0, job, text, seq, steps_before: 0, total_steps, last_write: Instant::now(), started_at, preview: None });
            }
            Err(e) => self.fail(&record, ERR_INVALID, &e.to_string()),
        }
    }

    /// Records `record`'s failure; the log line goes in the job's span (which
    /// carries the id of the request that created it).
    fn fail(&self, record: &JobRecord, kind: &str, message: &str) {
        let id = record.id;
        record.span().in_scope(|| tracing::warn!(kind, message, "job failed"));
        metrics::counter!(m::JOBS, m::LABEL_STATUS => "failed").increment(1);
        let error = JobError { kind: kind.to_owned(), message: message.to_owned() };
        if let Err(e) = self.store.fail(id, &error, now_ms()) {
            tracing::error!(job = %id, error = %e, "recording a failure failed");
        }
        self.emit(JobEvent::Finished { id, status: JobStatus::Failed });
    }

    /// The cascade stage index of running job `i`.
    fn stage_of(&self, i: usize) -> usize {
        let a = &self.active[i];
        a.record.request.stages[a.k].index
    }

    /// One UNet call: the oldest job's stage, every job there up to the row limit.
    fn step(&mut self) {
        let oldest = (0..self.active.len()).min_by_key(|&i| self.active[i].seq).expect("not empty");
        let stage = self.stage_of(oldest);
        let mut members = Vec::new();
        let mut rows = 0usize;
        let mut order: Vec<usize> = (0..self.active.len()).filter(|&i| self.stage_of(i) == stage).collect();
        order.sort_by_key(|&i| self.active[i].seq);
        for i in order {
            let r = self.active[i].job.rows() as usize;
            if !members.is_empty() && rows + r > self.config.max_batch_rows {
                break;
            }
            rows += r;
            members.push(i);
        }
        let outcomes = self.run_rows(stage, &members);
        // Apply outcomes from the highest index down so removals keep indices valid.
        let mut results: Vec<(usize, Result<(), String>)> = members.into_iter().zip(outcomes).collect();
        results.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, outcome) in results {
            match outcome {
                Ok(()) => self.after_step(i),
                Err(msg) => {
                    let a = self.active.remove(i);
                    self.fail(&a.record, ERR_INTERNAL, &msg);
                }
            }
        }
    }

    /// Runs the UNet on the rows of `members` (indices into `active`) and
    /// advances each; on out-of-memory, splits the batch and retries.
    fn run_rows(&mut self, stage: usize, members: &[usize]) -> Outcomes {
        split_on_oom(members, &mut |part| self.call(stage, part))
    }

    /// One UNet call over `members`' rows, then each job's sampler step. `Err` is
    /// the call itself failing (for every member); per-job step errors are inside.
    fn call(&mut self, stage: usize, members: &[usize]) -> Result<Outcomes, String> {
        let mut inputs = Vec::with_capacity(members.len());
        for &i in members {
            inputs.push(self.active[i].job.model_input().map_err(|e| e.to_string())?);
        }
        let started = Instant::now();
        let batch = concat(&inputs);
        let out = std::panic::catch_unwind(AssertUnwindSafe(|| self.cascade.forward(&self.cascade.stages[stage], &batch)));
        let out = match out {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(panic) => return Err(panic_message(panic)),
        };
        let rows = batch.sample.size()[0];
        self.stats.unet_calls.fetch_add(1, Ordering::Relaxed);
        self.stats.unet_rows.fetch_add(rows as u64, Ordering::Relaxed);
        let stage_name = self.cascade.stages[stage].name.clone();
        metrics::histogram!(m::BATCH_ROWS).record(rows as f64);
        metrics::histogram!(m::STEP_SECONDS, m::LABEL_STAGE => stage_name).record(started.elapsed().as_secs_f64());
        tracing::debug!(stage, jobs = members.len(), rows, ms = started.elapsed().as_secs_f64() * 1e3, "unet call");
        let clip = self.cascade.clip();
        let mut offset = 0;
        let outcomes = members
            .iter()
            .zip(&inputs)
            .map(|(&i, rows)| {
                let r = rows.sample.size()[0];
                let slice = out.narrow(0, offset, r);
                offset += r;
                let a = &mut self.active[i];
                std::panic::catch_unwind(AssertUnwindSafe(|| a.job.advance(&slice, &self.cascade.stages[stage], clip)))
                    .map_err(panic_message)
                    .and_then(|r| r.map_err(|e| e.to_string()))
            })
            .collect();
        self.stats.compute_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(outcomes)
    }

    /// A preview of running job `i` when its request wants one at this step
    /// (every k sampling steps, not at a stage's last step: its result follows).
    fn make_preview(&self, i: usize) -> Option<JobPreview> {
        let a = &self.active[i];
        let every = a.record.request.preview_every?;
        let step = a.job.step_index();
        if step == 0 || !step.is_multiple_of(every) || a.job.is_done() {
            return None;
        }
        let images = png::to_rgb(a.job.preview()?).ok()?;
        let encoded = images.iter().map(|image| png::encode_plain(image).map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes)));
        match encoded.collect::<Result<Vec<_>, _>>() {
            Ok(images) => Some(JobPreview { stage: a.k, step, images }),
            Err(e) => {
                tracing::warn!(job = %a.record.id, error = %e, "encoding a preview failed");
                None
            }
        }
    }

    /// Progress, stage changes and completion for running job `i` after a step.
    fn after_step(&mut self, i: usize) {
        let id = self.active[i].record.id;
        let fresh = self.make_preview(i);
        if let Some(preview) = fresh.clone() {
            self.emit(JobEvent::Preview { id, preview: preview.clone() });
            self.active[i].preview = Some(preview);
        }
        let progress = {
            let a = &self.active[i];
            let plan = &a.record.request.stages[a.k];
            let done = a.steps_before + a.job.step_index();
            JobProgress {
                stage: a.k,
                stages: a.record.request.stages.len(),
                stage_name: plan.name.clone(),
                step: a.job.step_index(),
                total_steps: a.job.total_steps(),
                fraction: done as f64 / a.total_steps as f64,
                preview: None,
            }
        };
        // Events carry each preview once (the `Preview` event); the store keeps the latest.
        self.emit(JobEvent::Progress { id, progress: progress.clone() });
        let stage_done = self.active[i].job.is_done();
        if stage_done || fresh.is_some() || self.active[i].last_write.elapsed() >= self.config.progress_interval {
            let t = Instant::now();
            let stored = JobProgress { preview: self.active[i].preview.clone(), ..progress.clone() };
            let written = self.store.set_progress(id, &stored);
            self.stats.store_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if let Err(e) = written {
                tracing::warn!(job = %id, error = %e, "writing progress failed");
            }
            self.active[i].last_write = Instant::now();
        }
        if !stage_done {
            return;
        }
        self.emit(JobEvent::StageDone { id, stage: progress.stage, stage_name: progress.stage_name });
        let a = &self.active[i];
        if a.k + 1 < a.record.request.stages.len() {
            let next = self.cascade.start_stage(&a.record.request, a.k + 1, &a.text, Some(a.job.sample()));
            match next {
                Ok(job) => {
                    let a = &mut self.active[i];
                    a.steps_before += a.job.total_steps();
                    a.k += 1;
                    a.job = job;
                }
                Err(e) => {
                    let a = self.active.remove(i);
                    self.fail(&a.record, ERR_INTERNAL, &e.to_string());
                }
            }
            return;
        }
        let a = self.active.remove(i);
        self.complete(a);
    }

    fn complete(&self, a: Active) {
        let id = a.record.id;
        let encoded = self.cascade.finish(&a.record.request, a.job.sample()).and_then(|images| {
            images
                .iter()
                .map(|g| {
                    let info = ImageInfo { index: g.index, seed: g.seed, width: g.image.width(), height: g.image.height() };
                    Ok((info, g.encode(&a.record.request.output)?))
                })
                .collect::<Result<Vec<_>, PipelineError>>()
        });
        let images = match encoded {
            Ok(images) => images,
            Err(e) => return self.fail(&a.record, ERR_INTERNAL, &format!("encoding the images failed: {e}")),
        };
        let t = Instant::now();
        let stored = self.store.complete(id, &images, now_ms());
        self.stats.store_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(e) = stored {
            a.record.span().in_scope(|| tracing::error!(error = %e, "storing the result failed"));
            return self.fail(&a.record, ERR_INTERNAL, "storing the result failed");
        }
        self.stats.jobs_finished.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::JOBS, m::LABEL_STATUS => "succeeded").increment(1);
        metrics::counter!(m::IMAGES_GENERATED).increment(images.len() as u64);
        // In the job's span: the request id ties these lines to the request's.
        let queue_ms = (a.started_at - a.record.created_at).max(0);
        let compute_ms = (now_ms() - a.started_at).max(0);
        metrics::histogram!(m::QUEUE_SECONDS).record(queue_ms as f64 / 1e3);
        metrics::histogram!(m::COMPUTE_SECONDS).record(compute_ms as f64 / 1e3);
        a.record.span().in_scope(|| tracing::info!(images = images.len(), queue_ms, compute_ms, "succeeded"));
        self.emit(JobEvent::Finished { id, status: JobStatus::Succeeded });
    }
}

/// Calls `call` on all of `members`; when it runs out of memory and there is
/// more than one member, retries each half (recursively) instead of failing the
/// jobs. Any other failure fails every member of that call (details go to the
/// log; clients get a stable message).
/// Each job's outcome of one step.
type Outcomes = Vec<Result<(), String>>;

fn split_on_oom(members: &[usize], call: &mut dyn FnMut(&[usize]) -> Result<Outcomes, String>) -> Outcomes {
    match call(members) {
        Ok(outcomes) => outcomes,
        Err(message) if members.len() > 1 && message.contains("out of memory") => {
            tracing::warn!(jobs = members.len(), "out of memory: splitting the batch");
            let (a, b) = members.split_at(members.len() / 2);
            let mut outcomes = split_on_oom(a, call);
            outcomes.extend(split_on_oom(b, call));
            outcomes
        }
        Err(message) => {
            tracing::error!(jobs = members.len(), %message, "UNet call failed");
            members.iter().map(|_| Err("the model failed on this batch".to_owned())).collect()
        }
    }
}

/// Concatenates several jobs' rows into one UNet batch.
fn concat(parts: &[ModelRows]) -> ModelRows {
    let cat = |f: &dyn Fn(&ModelRows) -> &Tensor| Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0);
    let class_labels = if parts.iter().all(|p| p.class_labels.is_some()) {
        Some(Tensor::cat(&parts.iter().filter_map(|p| p.class_labels.as_ref()).collect::<Vec<_>>(), 0))
    } else {
        None
    };
    ModelRows { sample: cat(&|p| &p.sample), timesteps: cat(&|p| &p.timesteps), text: cat(&|p| &p.text), class_labels }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a libtorch call panicked".into())
}

#[cfg(test)]
mod tests {
    use super::split_on_oom;

    #[test]
    fn out_of_memory_splits_the_batch_until_it_fits() {
        let mut calls = Vec::new();
        let mut call = |part: &[usize]| {
            calls.push(part.to_vec());
            if part.len() > 2 {
                Err("CUDA out of memory. Tried to allocate 2.00 GiB".to_owned())
            } else {
                Ok(part.iter().map(|_| Ok(())).collect())
            }
        };
        let outcomes = split_on_oom(&[0, 1, 2, 3, 4], &mut call);
        assert_eq!(outcomes.len(), 5);
        assert!(outcomes.iter().all(Result::is_ok));
        assert_eq!(calls, vec![vec![0, 1, 2, 3, 4], vec![0, 1], vec![2, 3, 4], vec![2], vec![3, 4]]);
    }

    #[test]
    fn other_failures_and_a_single_job_out_of_memory_fail_without_internals() {
        let outcomes = split_on_oom(&[7, 8], &mut |_| Err("shape mismatch in aten::cat".to_owned()));
        assert_eq!(outcomes, vec![Err("the model failed on this batch".to_owned()); 2]);
        let outcomes = split_on_oom(&[7], &mut |_| Err("CUDA out of memory".to_owned()));
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].is_err());
    }
}

//! The conformance suite every [`JobStore`] backend must pass: the trait's
//! documented semantics written down as checks, so the embedded store and a
//! shared one (Redis) cannot drift apart. Backends call [`run_all`] from their
//! integration tests with a factory that returns a fresh, empty store.
//!
//! This is test support compiled into the library (integration tests and other
//! crates' backends need it): each check panics with a message naming the
//! violated rule, which is exactly what a failing test should do.

use std::collections::HashSet;

use super::model::{ImageInfo, JobError, JobId, JobPreview, JobProgress, JobRecord, JobStatus};
use super::store::JobStore;
use crate::diffusion::{SamplerKind, SamplerOptions};
use crate::pipeline::{GenerationRequest, ImageFormat, Mask, Output, NoiseMix, Picture, Source, StagePlan};

/// Makes a fresh, empty store for one check.
pub type StoreFactory<'a> = &'a dyn Fn() -> Box<dyn JobStore>;

/// One named check, run on a fresh store.
pub type Check = (&'static str, fn(&dyn JobStore));

/// Every check, by name (so a backend can run them one by one if it likes).
pub const CHECKS: &[Check] = &[
    ("create_get_round_trip", create_get_round_trip),
    ("create_is_idempotent", create_is_idempotent),
    ("absent_jobs", absent_jobs),
    ("start_transitions", start_transitions),
    ("terminal_jobs_never_change", terminal_jobs_never_change),
    ("complete_keeps_first_result", complete_keeps_first_result),
    ("cancel_semantics", cancel_semantics),
    ("progress_only_while_running", progress_only_while_running),
    ("images_round_trip", images_round_trip),
    ("unfinished_oldest_first", unfinished_oldest_first),
    ("purge_by_cutoff", purge_by_cutoff),
    ("counts_per_status", counts_per_status),
    ("concurrent_use", concurrent_use),
];

/// Runs every check, each on a store fresh from `make`.
pub fn run_all(make: StoreFactory<'_>) {
    for (name, check) in CHECKS {
        let store = make();
        // Name the failing check even when a panic message is terse.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(store.as_ref())));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!("job store conformance check `{name}` failed: {message}");
        }
    }
}

/// A realistic request: two stages, explicit timesteps, a noise level, a
/// non-ASCII prompt and a seed beyond 2^53 (JSON numbers lose those in some codecs).
pub fn sample_request(seed: u64) -> GenerationRequest {
    let base = SamplerOptions { kind: SamplerKind::DpmSolverPlusPlus, steps: 25, timesteps: None, eta: 0.0, clipped_model_output: false };
    let sr = SamplerOptions { kind: SamplerKind::Ddim, steps: 3, timesteps: Some(vec![999, 500, 1]), eta: 0.25, clipped_model_output: true };
    GenerationRequest {
        prompt: "a watercolour fox — «renard», 狐".into(),
        negative_prompt: Some("blurry".into()),
        n: 2,
        seed,
        stages: vec![
            StagePlan { index: 0, name: "base".into(), sampler: base, guidance_scale: 7.5, noise_level: None, clip_guidance_scale: 0.0, classifier_guidance_scale: 0.0, layout_guidance_scale: 0.0, strength: 1.0 },
            StagePlan { index: 1, name: "sr-256".into(), sampler: sr, guidance_scale: 4.0, noise_level: Some(250), clip_guidance_scale: 0.0, classifier_guidance_scale: 0.0, layout_guidance_scale: 0.0, strength: 0.4 },
        ],
        // Pictures travel inside the request (as PNG): the store must keep them exactly.
        source: Some(Source::Inpaint {
            image: Picture(image::RgbImage::from_fn(6, 6, |x, y| image::Rgb([(x * 40) as u8, (y * 40) as u8, 7]))),
            mask: Mask(image::GrayImage::from_fn(6, 6, |x, _| image::Luma([if x > 2 { 255 } else { 0 }]))),
            strength: 0.8,
        }),
        noise: NoiseMix::Variation { seed: 9, strength: 0.25 },
        preview_every: Some(5),
        output: Output { format: ImageFormat::Jpeg, compression: Some(80) },
    }
}

/// A new queued job with a random id.
pub fn sample_job(owner: Option<&str>, created_at: i64) -> JobRecord {
    JobRecord::new(JobId::new_v4(), owner.map(str::to_owned), sample_request(u64::MAX - 7), created_at)
}

fn created(store: &dyn JobStore, created_at: i64) -> JobRecord {
    let job = sample_job(Some("owner"), created_at);
    let outcome = store.create(&job).expect("create failed");
    assert!(outcome.created, "create of a new id must report created: true");
    job
}

fn fetch(store: &dyn JobStore, id: JobId) -> JobRecord {
    store.get(id).expect("get failed").unwrap_or_else(|| panic!("job {id} vanished"))
}

fn progress(step: usize) -> JobProgress {
    // A preview rides along with progress; the store must keep it.
    let preview = JobPreview { stage: 0, step, images: vec!["iVBORw0KGgo=".into(); 2] };
    JobProgress { stage: 0, stages: 2, stage_name: "base".into(), step, total_steps: 25, fraction: step as f64 / 50.0, preview: Some(preview) }
}

fn error() -> JobError {
    JobError { kind: "out_of_memory".into(), message: "the accelerator ran out of memory".into() }
}

fn images(n: usize, fill: u8) -> Vec<(ImageInfo, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let info = ImageInfo { index: i, seed: 40 + i as u64, width: 64, height: 48 };
            // Bytes of every value, including NUL, so a text column would be caught.
            let png: Vec<u8> = (0..=255u8).cycle().take(3000 + i).map(|b| b ^ fill).collect();
            (info, png)
        })
        .collect()
}

pub fn create_get_round_trip(store: &dyn JobStore) {
    let job = sample_job(Some("fingerprint-1"), 1_700_000_000_123);
    let outcome = store.create(&job).expect("create failed");
    assert!(outcome.created, "a new id must be created");
    assert_eq!(outcome.record, job, "create must return the stored record");
    assert_eq!(fetch(store, job.id), job, "get must return the record exactly as created");
    let anonymous = sample_job(None, 5);
    store.create(&anonymous).expect("create failed");
    assert_eq!(fetch(store, anonymous.id), anonymous, "a job without owner must round-trip");
}

pub fn create_is_idempotent(store: &dyn JobStore) {
    let job = created(store, 10);
    let mut retry = job.clone();
    retry.owner = Some("someone-else".into());
    retry.created_at = 99;
    let outcome = store.create(&retry).expect("second create failed");
    assert!(!outcome.created, "create of an existing id must report created: false");
    assert_eq!(outcome.record, job, "create of an existing id must return the existing record");
    assert_eq!(fetch(store, job.id), job, "create of an existing id must change nothing");
    store.start(job.id, 20).expect("start failed");
    let outcome = store.create(&job).expect("third create failed");
    assert_eq!(outcome.record.status, JobStatus::Running, "a retried create must not reset a started job");
}

pub fn absent_jobs(store: &dyn JobStore) {
    let id = JobId::new_v4();
    assert_eq!(store.get(id).expect("get failed"), None, "get of an unknown id must be None");
    assert!(!store.start(id, 1).expect("start failed"), "start of an unknown id must return false");
    store.set_progress(id, &progress(1)).expect("set_progress of an unknown id must not fail");
    assert!(
        !store.complete(id, &images(1, 0), 1).expect("complete failed"),
        "complete of an unknown id must return false"
    );
    assert!(!store.fail(id, &error(), 1).expect("fail failed"), "fail of an unknown id must return false");
    assert_eq!(store.cancel(id, 1).expect("cancel failed"), None, "cancel of an unknown id must be None");
    assert_eq!(store.get(id).expect("get failed"), None, "no transition may create a job");
    assert_eq!(store.image(id, 0).expect("image failed"), None, "no job, no image");
}

pub fn start_transitions(store: &dyn JobStore) {
    let job = created(store, 10);
    assert!(store.start(job.id, 100).expect("start failed"), "start of a queued job must succeed");
    let running = fetch(store, job.id);
    assert_eq!(running.status, JobStatus::Running, "start must make the job running");
    assert_eq!(running.started_at, Some(100), "start must set started_at");
    assert_eq!(running.attempts, 1, "start must count the attempt");
    assert!(store.start(job.id, 200).expect("restart failed"), "start of a running job (a resumed run) must succeed");
    let restarted = fetch(store, job.id);
    assert_eq!(restarted.started_at, Some(100), "started_at is set the first time only");
    assert_eq!(restarted.attempts, 2, "every start counts an attempt");
    assert_eq!((restarted.completed_at, restarted.error.as_ref()), (None, None), "start must not touch the outcome");
}

pub fn terminal_jobs_never_change(store: &dyn JobStore) {
    let failed = created(store, 1);
    store.start(failed.id, 2).expect("start failed");
    assert!(store.fail(failed.id, &error(), 3).expect("fail failed"), "fail of a running job must succeed");
    let record = fetch(store, failed.id);
    assert_eq!(record.status, JobStatus::Failed, "fail must make the job failed");
    assert_eq!(record.error, Some(error()), "fail must store the error");
    assert_eq!(record.completed_at, Some(3), "fail must set completed_at");

    let succeeded = created(store, 1);
    assert!(store.complete(succeeded.id, &images(1, 0), 4).expect("complete failed"));
    let canceled = created(store, 1);
    store.cancel(canceled.id, 5).expect("cancel failed");

    for id in [failed.id, succeeded.id, canceled.id] {
        let before = fetch(store, id);
        assert!(!store.start(id, 50).expect("start failed"), "start of a terminal job must return false");
        store.set_progress(id, &progress(3)).expect("set_progress failed");
        assert!(!store.fail(id, &error(), 51).expect("fail failed"), "fail of a terminal job must return false");
        assert!(
            !store.complete(id, &images(2, 9), 52).expect("complete failed"),
            "complete of a terminal job must return false"
        );
        assert_eq!(
            store.cancel(id, 53).expect("cancel failed"),
            Some(before.clone()),
            "cancel of a terminal job returns it unchanged"
        );
        assert_eq!(fetch(store, id), before, "a terminal ({:?}) job must never change", before.status);
    }
    assert_eq!(store.image(failed.id, 0).expect("image failed"), None, "a late complete must not store images");
}

pub fn complete_keeps_first_result(store: &dyn JobStore) {
    let job = created(store, 1);
    store.start(job.id, 2).expect("start failed");
    let first = images(2, 0);
    assert!(store.complete(job.id, &first, 10).expect("complete failed"), "complete of a running job must succeed");
    let record = fetch(store, job.id);
    assert_eq!(record.status, JobStatus::Succeeded, "complete must make the job succeeded");
    assert_eq!(record.completed_at, Some(10), "complete must set completed_at");
    let infos: Vec<ImageInfo> = first.iter().map(|(info, _)| info.clone()).collect();
    assert_eq!(record.images, infos, "complete must record the image metadata");
    assert!(
        !store.complete(job.id, &images(3, 0xAA), 20).expect("second complete failed"),
        "a second complete must return false"
    );
    assert_eq!(fetch(store, job.id), record, "a second complete must not change the record");
    for (info, png) in &first {
        assert_eq!(
            store.image(job.id, info.index).expect("image failed").as_ref(),
            Some(png),
            "the first run's images must stay"
        );
    }
    assert_eq!(store.image(job.id, 2).expect("image failed"), None, "the second run's extra image must not be stored");
}

pub fn cancel_semantics(store: &dyn JobStore) {
    let queued = created(store, 1);
    let record = store.cancel(queued.id, 7).expect("cancel failed").expect("cancel of a queued job returns it");
    assert_eq!(record.status, JobStatus::Canceled, "cancel of a queued job must cancel it");
    assert_eq!(record.completed_at, Some(7), "cancel must set completed_at");
    assert_eq!(fetch(store, queued.id), record, "cancel must return the stored record");

    let running = created(store, 1);
    store.start(running.id, 2).expect("start failed");
    let record = store.cancel(running.id, 8).expect("cancel failed").expect("cancel of a running job returns it");
    assert_eq!(record.status, JobStatus::Canceled, "cancel of a running job must cancel it");
    assert!(!store.start(running.id, 9).expect("start failed"), "a canceled job must not restart");
    assert!(
        !store.complete(running.id, &images(1, 0), 9).expect("complete failed"),
        "a canceled job must not complete"
    );
    assert_eq!(fetch(store, running.id).status, JobStatus::Canceled, "a canceled job must stay canceled");
}

pub fn progress_only_while_running(store: &dyn JobStore) {
    let job = created(store, 1);
    store.set_progress(job.id, &progress(1)).expect("set_progress failed");
    assert_eq!(fetch(store, job.id).progress, None, "progress of a queued job must be ignored");
    store.start(job.id, 2).expect("start failed");
    store.set_progress(job.id, &progress(4)).expect("set_progress failed");
    assert_eq!(fetch(store, job.id).progress, Some(progress(4)), "progress of a running job must be recorded");
    store.set_progress(job.id, &progress(5)).expect("set_progress failed");
    assert_eq!(fetch(store, job.id).progress, Some(progress(5)), "the latest progress must win");
    store.cancel(job.id, 3).expect("cancel failed");
    store.set_progress(job.id, &progress(6)).expect("set_progress failed");
    let record = fetch(store, job.id);
    assert_eq!(record.status, JobStatus::Canceled, "a late progress update must not revive a canceled job");
    assert_eq!(record.progress, Some(progress(5)), "a late progress update must be ignored");
}

pub fn images_round_trip(store: &dyn JobStore) {
    let job = created(store, 1);
    assert_eq!(store.image(job.id, 0).expect("image failed"), None, "a queued job has no image");
    let pngs = images(3, 0x5A);
    store.complete(job.id, &pngs, 2).expect("complete failed");
    for (info, png) in &pngs {
        let stored = store.image(job.id, info.index).expect("image failed");
        assert_eq!(stored.as_ref(), Some(png), "image {} must come back byte for byte", info.index);
    }
    assert_eq!(store.image(job.id, 3).expect("image failed"), None, "an index past the last image must be None");
    let other = created(store, 1);
    store.complete(other.id, &[], 2).expect("complete with no images failed");
    assert_eq!(fetch(store, other.id).status, JobStatus::Succeeded, "complete with no images still succeeds");
    assert_eq!(store.image(other.id, 0).expect("image failed"), None, "images belong to their own job only");
}

pub fn unfinished_oldest_first(store: &dyn JobStore) {
    let newest = created(store, 300);
    let oldest = created(store, 100);
    let middle = created(store, 200);
    store.start(middle.id, 250).expect("start failed");
    for (status_at, done) in [(150, "succeeded"), (160, "failed"), (170, "canceled")] {
        let job = created(store, status_at);
        match done {
            "succeeded" => assert!(store.complete(job.id, &[], 400).expect("complete failed")),
            "failed" => assert!(store.fail(job.id, &error(), 400).expect("fail failed")),
            _ => assert!(store.cancel(job.id, 400).expect("cancel failed").is_some()),
        }
    }
    let unfinished = store.unfinished().expect("unfinished failed");
    let ids: Vec<JobId> = unfinished.iter().map(|job| job.id).collect();
    assert_eq!(
        ids,
        vec![oldest.id, middle.id, newest.id],
        "unfinished must list queued and running jobs, oldest first"
    );
    assert_eq!(unfinished[1], fetch(store, middle.id), "unfinished must return whole, current records");
}

pub fn purge_by_cutoff(store: &dyn JobStore) {
    let old_done = created(store, 1);
    store.complete(old_done.id, &images(2, 1), 100).expect("complete failed");
    let old_failed = created(store, 1);
    store.fail(old_failed.id, &error(), 150).expect("fail failed");
    let at_cutoff = created(store, 1);
    store.cancel(at_cutoff.id, 200).expect("cancel failed");
    let recent = created(store, 1);
    store.complete(recent.id, &images(1, 2), 300).expect("complete failed");
    let old_queued = created(store, 1);
    let old_running = created(store, 1);
    store.start(old_running.id, 2).expect("start failed");

    assert_eq!(
        store.purge_finished(200).expect("purge failed"),
        2,
        "purge must delete exactly the terminal jobs completed before the cutoff"
    );
    for gone in [old_done.id, old_failed.id] {
        assert_eq!(store.get(gone).expect("get failed"), None, "a purged job must be gone");
    }
    for (index, _) in images(2, 1).iter().enumerate() {
        assert_eq!(store.image(old_done.id, index).expect("image failed"), None, "a purged job's images must be gone");
    }
    for kept in [at_cutoff.id, recent.id, old_queued.id, old_running.id] {
        assert!(
            store.get(kept).expect("get failed").is_some(),
            "purge must keep jobs completed at/after the cutoff and unfinished ones"
        );
    }
    assert!(store.image(recent.id, 0).expect("image failed").is_some(), "purge must keep the images of kept jobs");
    assert_eq!(store.purge_finished(200).expect("purge failed"), 0, "a second purge finds nothing");
}

/// Reads one status's count; a backend may omit statuses with no jobs.
fn count_of(store: &dyn JobStore, status: JobStatus) -> u64 {
    let counts = store.counts().expect("counts failed");
    let statuses: HashSet<JobStatus> = counts.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses.len(), counts.len(), "counts must list each status at most once: {counts:?}");
    counts.iter().find(|(s, _)| *s == status).map_or(0, |(_, n)| *n)
}

pub fn counts_per_status(store: &dyn JobStore) {
    assert_eq!(count_of(store, JobStatus::Queued), 0, "an empty store counts nothing");
    let jobs: Vec<JobRecord> = (0..9).map(|i| created(store, i)).collect();
    for job in &jobs[..6] {
        store.start(job.id, 10).expect("start failed");
    }
    store.complete(jobs[0].id, &[], 20).expect("complete failed");
    store.fail(jobs[1].id, &error(), 20).expect("fail failed");
    store.fail(jobs[2].id, &error(), 20).expect("fail failed");
    store.cancel(jobs[3].id, 20).expect("cancel failed");
    store.cancel(jobs[6].id, 20).expect("cancel failed");
    let expected = [
        (JobStatus::Queued, 2),
        (JobStatus::Running, 2),
        (JobStatus::Succeeded, 1),
        (JobStatus::Failed, 2),
        (JobStatus::Canceled, 2),
    ];
    for (status, n) in expected {
        assert_eq!(count_of(store, status), n, "count of {status:?} jobs");
    }
}

pub fn concurrent_use(store: &dyn JobStore) {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 50;
    let ids: Vec<Vec<JobId>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || {
                    (0..PER_THREAD)
                        .map(|i| {
                            let job = created(store, (t * PER_THREAD + i) as i64);
                            // Interleave reads and transitions with other threads' creates.
                            if i % 5 == 0 {
                                assert!(store.start(job.id, 1).expect("start failed"), "concurrent start failed");
                                store.set_progress(job.id, &progress(i)).expect("set_progress failed");
                            }
                            fetch(store, job.id);
                            job.id
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|_| panic!("a worker thread panicked"))).collect()
    });
    let all: HashSet<JobId> = ids.iter().flatten().copied().collect();
    assert_eq!(all.len(), THREADS * PER_THREAD, "every concurrent create must store a distinct job");
    for id in &all {
        fetch(store, *id);
    }
    assert_eq!(
        store.unfinished().expect("unfinished failed").len(),
        THREADS * PER_THREAD,
        "all concurrent jobs must be unfinished"
    );
    assert_eq!(
        count_of(store, JobStatus::Running),
        (THREADS * PER_THREAD / 5) as u64,
        "running count after concurrent starts"
    );
}

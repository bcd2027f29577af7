//! The embedded (SQLite) job store against the shared conformance suite, plus
//! what only a real file can show: records survive reopening, and a job whose
//! `create` returned survives the process being killed right after.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use diffusiond::jobs::conformance::{self, sample_job};
use diffusiond::jobs::{EmbeddedStore, ImageInfo, JobError, JobId, JobProgress, JobStatus, JobStore};

/// A directory removed on drop (no `tempfile` dependency for one helper).
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        Self(std::env::temp_dir().join(format!("diffusiond-{label}-{}", JobId::new_v4())))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn embedded_store_passes_conformance() {
    let root = TempDir::new("conformance");
    let counter = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(&|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let store = EmbeddedStore::open(&root.path().join(format!("store-{n}"))).expect("open a fresh store");
        Box::new(store)
    });
}

#[test]
fn records_images_and_statuses_survive_reopening() {
    let dir = TempDir::new("reopen");
    let png = vec![0x89, b'P', b'N', b'G', 0, 1, 2, 255];
    let info = ImageInfo { index: 0, seed: 7, width: 64, height: 64 };
    let progress =
        JobProgress { stage: 1, stages: 2, stage_name: "sr".into(), step: 3, total_steps: 10, fraction: 0.65, preview: None };
    let (queued, running, done, failed) =
        (sample_job(Some("a"), 1), sample_job(Some("b"), 2), sample_job(None, 3), sample_job(None, 4));
    let before = {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        for job in [&queued, &running, &done, &failed] {
            store.create(job).expect("create");
        }
        store.start(running.id, 10).expect("start");
        store.set_progress(running.id, &progress).expect("progress");
        store.complete(done.id, &[(info, png.clone())], 20).expect("complete");
        store.fail(failed.id, &JobError { kind: "internal".into(), message: "boom".into() }, 30).expect("fail");
        [queued.id, running.id, done.id, failed.id].map(|id| store.get(id).expect("get").expect("present"))
    };

    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    for record in &before {
        assert_eq!(
            store.get(record.id).expect("get").as_ref(),
            Some(record),
            "record {} changed across reopen",
            record.id
        );
    }
    let statuses: Vec<JobStatus> = before.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed]);
    assert_eq!(before[1].progress.as_ref(), Some(&progress));
    assert_eq!(store.image(done.id, 0).expect("image"), Some(png), "image bytes changed across reopen");
    let unfinished: Vec<JobId> = store.unfinished().expect("unfinished").iter().map(|r| r.id).collect();
    assert_eq!(unfinished, [queued.id, running.id]);
}

/// Tells the re-executed test binary to act as the crashing child.
const CRASH_DIR_ENV: &str = "DIFFUSIOND_CRASH_CHILD_DIR";
const CRASH_JOBS: usize = 20;

/// The child half of `accepted_jobs_survive_abort`: creates jobs, writes their
/// ids to a side file (flushed before each create, so the parent knows what to
/// look for), then aborts the instant the last `create` returns, with no
/// destructor, no checkpoint and no clean close.
#[test]
#[ignore = "run only as the child of accepted_jobs_survive_abort"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let store = EmbeddedStore::open(&dir).expect("child: open");
    let mut ids = String::new();
    for i in 0..CRASH_JOBS {
        let job = sample_job(Some("crash"), i as i64);
        ids.push_str(&format!("{}\n", job.id));
        std::fs::write(dir.join("ids.txt"), &ids).expect("child: write ids");
        let outcome = store.create(&job).expect("child: create");
        assert!(outcome.created);
        if i % 4 == 0 {
            store.start(job.id, 100).expect("child: start");
        }
    }
    std::process::abort();
}

#[test]
fn accepted_jobs_survive_abort() {
    let dir = TempDir::new("crash");
    std::fs::create_dir_all(dir.path()).expect("mkdir");
    let exe = std::env::current_exe().expect("current test executable");
    let status = Command::new(exe)
        .args(["--exact", "crash_child", "--ignored", "--test-threads=1"])
        .env(CRASH_DIR_ENV, dir.path())
        // Its harness chatter would interleave with ours; a panic still shows on stderr.
        .stdout(Stdio::null())
        .status()
        .expect("spawn the crashing child");
    // A panic (a failed create) exits with 101; only SIGABRT means the child got
    // through every create and was killed right after.
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(6), "the child must die by SIGABRT after its creates ({status})");
    }
    assert!(!status.success(), "the child must die by abort, not exit cleanly ({status})");
    let wal = dir.path().join(format!("{}-wal", diffusiond::jobs::embedded::DB_FILE));
    assert!(wal.exists(), "an aborted writer leaves its WAL behind for recovery");

    let ids: Vec<JobId> = std::fs::read_to_string(dir.path().join("ids.txt"))
        .expect("the child wrote its ids")
        .lines()
        .map(|l| l.parse().expect("a job id"))
        .collect();
    assert_eq!(ids.len(), CRASH_JOBS, "the child must have got through every create before aborting");
    let store = EmbeddedStore::open(dir.path()).expect("reopen after the crash");
    for (i, id) in ids.iter().enumerate() {
        let record =
            store.get(*id).expect("get").unwrap_or_else(|| panic!("job {i} ({id}) was accepted but lost in the crash"));
        let expected = if i % 4 == 0 { JobStatus::Running } else { JobStatus::Queued };
        assert_eq!(record.status, expected, "job {i} status after the crash");
    }
    assert_eq!(store.unfinished().expect("unfinished").len(), CRASH_JOBS);
}

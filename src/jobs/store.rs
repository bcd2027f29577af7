//! The job store: where accepted jobs, their progress and their images live,
//! behind a trait so that the embedded store (one process, a data directory)
//! and a shared one (Redis, many replicas) are interchangeable.
//!
//! Methods are synchronous and quick (a few local writes); async callers run
//! them on the blocking pool. Every transition is idempotent and checks the
//! current state, so a job run twice (after a crash) still ends with one result,
//! and a canceled job is never revived by a late progress update.

use super::model::{ImageInfo, JobError, JobId, JobProgress, JobRecord, JobStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (disk, database, network); details are for the log.
    #[error("job store backend failed: {0}")]
    Backend(String),
    /// A stored record could not be read back (written by an incompatible version).
    #[error("job {id} is corrupt: {reason}")]
    Corrupt { id: JobId, reason: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The outcome of [`JobStore::create`].
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The stored record: the new one, or the existing one with that id.
    pub record: JobRecord,
    /// False when a job with this id already existed (an idempotent retry).
    pub created: bool,
}

/// Counts of jobs by status, for metrics and `/info`.
pub type StatusCounts = Vec<(JobStatus, u64)>;

pub trait JobStore: Send + Sync + 'static {
    /// Inserts `job` (status queued). When a job with the same id exists, nothing
    /// changes and the existing record comes back with `created: false`.
    fn create(&self, job: &JobRecord) -> Result<Created>;

    fn get(&self, id: JobId) -> Result<Option<JobRecord>>;

    /// Queued and running jobs, oldest first: the work to resume after a restart.
    fn unfinished(&self) -> Result<Vec<JobRecord>>;

    /// queued|running → running; sets `started_at` the first time and counts the
    /// attempt. Returns false (and changes nothing) when the job is terminal or absent.
    fn start(&self, id: JobId, now: i64) -> Result<bool>;

    /// Records progress of a running job; ignored otherwise.
    fn set_progress(&self, id: JobId, progress: &JobProgress) -> Result<()>;

    /// Stores the PNGs and marks the job succeeded, in one transaction. Ignored
    /// (returns false) when the job is already terminal: a job run twice keeps
    /// its first result.
    fn complete(&self, id: JobId, images: &[(ImageInfo, Vec<u8>)], now: i64) -> Result<bool>;

    /// Marks the job failed unless it is already terminal.
    fn fail(&self, id: JobId, error: &JobError, now: i64) -> Result<bool>;

    /// Marks a queued or running job canceled; a terminal job is left as is.
    /// Returns the record afterwards (None when absent).
    fn cancel(&self, id: JobId, now: i64) -> Result<Option<JobRecord>>;

    /// The PNG of image `index` of a succeeded job.
    fn image(&self, id: JobId, index: usize) -> Result<Option<Vec<u8>>>;

    /// Deletes terminal jobs completed before `before` (ms), with their images.
    fn purge_finished(&self, before: i64) -> Result<usize>;

    fn counts(&self) -> Result<StatusCounts>;
}

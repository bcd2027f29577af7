//! Sync requests: wait for a job's end, cancel it when the client goes away,
//! and fetch its images.
//!
//! The waiter subscribes to the event broadcast *before* the job is submitted,
//! so it cannot miss the end; when it lags behind (the broadcast overwrote
//! events) it re-reads the store, which holds every state change. The wait is
//! bounded by `sync_timeout`. Cancel-on-drop follows mini-redis's drop guards:
//! hyper drops the handler's future when the client disconnects, and the guard's
//! `Drop` cancels the job so that no GPU time goes to an answer nobody reads.

use tokio::sync::broadcast::{self, error::RecvError};

use crate::api::errors::ApiError;
use crate::api::state::AppState;
use crate::jobs::{now_ms, JobEvent, JobId, JobRecord, JobStatus};

/// Cancels the job when dropped while armed (the response was not produced).
pub struct CancelOnDrop {
    state: AppState,
    id: JobId,
    armed: bool,
}

impl CancelOnDrop {
    pub fn new(state: &AppState, id: JobId) -> Self {
        Self { state: state.clone(), id, armed: true }
    }

    /// The job's outcome is in hand: leave it alone.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (id, store) = (self.id, std::sync::Arc::clone(&self.state.store));
        tracing::info!(job = %id, "client gone before its job finished; canceling");
        self.state.queue.cancel(id);
        let cancel = move || {
            if let Err(e) = store.cancel(id, now_ms()) {
                tracing::error!(job = %id, error = %e, "could not record the cancellation");
            }
        };
        // Drop cannot await; the store call goes to the blocking pool.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(cancel)),
            Err(_) => cancel(),
        }
    }
}

/// Waits until job `id` is terminal and returns its record; 504 after `sync_timeout`.
pub async fn finished(state: &AppState, id: JobId, mut events: broadcast::Receiver<JobEvent>) -> Result<JobRecord, ApiError> {
    let limit = state.config.sync_timeout;
    match tokio::time::timeout(limit, wait(state, id, &mut events)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::Timeout { secs: limit.as_secs() }),
    }
}

async fn wait(state: &AppState, id: JobId, events: &mut broadcast::Receiver<JobEvent>) -> Result<JobRecord, ApiError> {
    loop {
        let closed = match events.recv().await {
            Ok(JobEvent::Finished { id: done, .. }) if done == id => false,
            Ok(_) => continue,
            // Ours may be among the events we missed; the store knows.
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(job = %id, missed, "event stream lagged; re-reading the job");
                false
            }
            Err(RecvError::Closed) => true,
        };
        // Purged under a waiting client: a server problem, not an unknown job.
        let record = state.job(id).await.map_err(|e| match e {
            ApiError::NotFound(_) => ApiError::internal(format!("job {id} vanished while a client waited on it")),
            other => other,
        })?;
        if record.status.is_terminal() {
            return Ok(record);
        }
        if closed {
            return Err(ApiError::internal("the job event channel closed"));
        }
    }
}

/// A terminal record as the sync result: itself when it succeeded, its error otherwise.
pub fn succeeded(record: JobRecord) -> Result<JobRecord, ApiError> {
    match record.status {
        JobStatus::Succeeded => Ok(record),
        JobStatus::Canceled => Err(ApiError::Canceled),
        JobStatus::Failed => Err(ApiError::JobFailed(
            record.error.unwrap_or_else(|| crate::jobs::JobError { kind: "generation_failed".into(), message: "the job failed".into() }),
        )),
        other => Err(ApiError::internal(format!("job {} is {} after its end", record.id, other.as_str()))),
    }
}

/// The PNGs of a succeeded job, in image order.
pub async fn pngs(state: &AppState, record: &JobRecord) -> Result<Vec<Vec<u8>>, ApiError> {
    let (id, indices): (JobId, Vec<usize>) = (record.id, record.images.iter().map(|i| i.index).collect());
    state
        .with_store(move |s| indices.into_iter().map(|i| s.image(id, i)).collect::<Result<Vec<_>, _>>())
        .await?
        .into_iter()
        .zip(&record.images)
        .map(|(png, info)| png.ok_or_else(|| ApiError::internal(format!("job {id} image {} is missing from the store", info.index))))
        .collect()
}

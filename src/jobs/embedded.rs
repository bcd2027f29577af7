//! The embedded job store: one SQLite file (`jobs.sqlite3`) in the server's
//! data directory, for a single process that needs no other service.
//!
//! Durability comes first: a job the API has accepted must still be there
//! after `kill -9` or a power cut, so the database runs in WAL mode with
//! `synchronous=FULL` (every commit is fsynced) and every mutation is one
//! `BEGIN IMMEDIATE` transaction. The whole [`JobRecord`] is kept as JSON (the
//! source of truth); `status`, `owner`, `created_at` and `completed_at` are
//! copied into columns only so that they can be indexed. PNGs live in their own
//! table so that `complete` writes images and status in one transaction while
//! `get` never drags megabytes of image data along.
//!
//! One connection behind a `Mutex`: SQLite serialises writers anyway, the
//! methods are a few local writes each, and a single connection keeps the
//! state-machine checks (read, decide, write) trivially atomic.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::model::{ImageInfo, JobError, JobId, JobProgress, JobRecord, JobStatus};
use super::store::{Created, JobStore, Result, StatusCounts, StoreError};

/// The file inside the data directory.
pub const DB_FILE: &str = "jobs.sqlite3";

/// Bumped whenever the schema changes; `open` migrates older files forward and
/// refuses newer ones (a downgrade would silently misread them).
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another connection's lock (a second process
/// opening the same directory, or a backup tool) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema version 1. Images reference their job with `ON DELETE CASCADE`, so
/// purging a job can never leave orphaned PNGs behind.
const SCHEMA_V1: &str = "
CREATE TABLE jobs (
    id           TEXT PRIMARY KEY NOT NULL,
    owner        TEXT,
    status       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    completed_at INTEGER,
    record       TEXT NOT NULL
);
CREATE INDEX jobs_by_status ON jobs (status, created_at);
CREATE INDEX jobs_by_completion ON jobs (completed_at) WHERE completed_at IS NOT NULL;
CREATE TABLE images (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx    INTEGER NOT NULL,
    png    BLOB NOT NULL,
    PRIMARY KEY (job_id, idx)
);
";

/// The statuses stored in the `status` column, as SQL literals for `IN (…)`.
const UNFINISHED_SQL: &str = "('queued', 'running')";
const TERMINAL_SQL: &str = "('succeeded', 'failed', 'canceled')";

/// A [`JobStore`] in one SQLite file; cheap to share behind an `Arc`.
pub struct EmbeddedStore {
    /// Held only for the few statements of one method, never across `.await`
    /// (callers run store methods on the blocking pool).
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.path).finish_non_exhaustive()
    }
}

fn backend(context: &str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("sqlite: {context}: {e}"))
}

impl EmbeddedStore {
    /// Opens (creating it and the directory when missing) `data_dir/jobs.sqlite3`,
    /// and migrates its schema to the current version.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Backend(format!("cannot create data directory {}: {e}", data_dir.display())))?;
        let path = data_dir.join(DB_FILE);
        let mut conn =
            Connection::open(&path).map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        configure(&conn)?;
        migrate(&mut conn)?;
        Ok(Self { conn: Mutex::new(conn), path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held dropped its transaction, which rolls
        // back; the connection itself is still sound, so poisoning is ignored.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `change` on job `id` inside one write transaction. `change` returns
    /// whether it modified the record; only then is the record written back.
    /// Returns the record afterwards and that flag, or None when absent.
    fn update<F>(&self, id: JobId, change: F) -> Result<Option<(JobRecord, bool)>>
    where
        F: FnOnce(&mut JobRecord, &Transaction<'_>) -> Result<bool>,
    {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend("begin"))?;
        let Some(mut record) = load(&tx, id)? else {
            return Ok(None);
        };
        let changed = change(&mut record, &tx)?;
        if changed {
            save(&tx, &record)?;
        }
        tx.commit().map_err(backend("commit"))?;
        Ok(Some((record, changed)))
    }
}

/// Connection settings; these are per connection, so they run on every open.
fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT).map_err(backend("busy_timeout"))?;
    // journal_mode answers with the mode in force: a filesystem that cannot do
    // WAL leaves it unchanged, and we would rather fail than run undurably.
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)).map_err(backend("journal_mode"))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!("sqlite: cannot enable WAL journal (journal_mode is {mode})")));
    }
    // FULL: the WAL is fsynced at every commit, so a committed job survives a
    // power cut, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL").map_err(backend("synchronous"))?;
    conn.pragma_update(None, "foreign_keys", true).map_err(backend("foreign_keys"))?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend("begin migration"))?;
    let version: i64 =
        tx.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(backend("user_version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "sqlite: schema version {version} was written by a newer diffusiond (this one knows {SCHEMA_VERSION})"
        )));
    }
    if version < 1 {
        tx.execute_batch(SCHEMA_V1).map_err(backend("create schema v1"))?;
    }
    // Later versions add `if version < 2 { … }` steps here, in order.
    tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(backend("set user_version"))?;
    tx.commit().map_err(backend("commit migration"))
}

fn decode(id_text: &str, json: &str) -> Result<JobRecord> {
    let record: JobRecord = serde_json::from_str(json).map_err(|e| match id_text.parse::<JobId>() {
        Ok(id) => StoreError::Corrupt { id, reason: format!("record is not valid JSON for this version: {e}") },
        Err(_) => {
            StoreError::Backend(format!("sqlite: job row {id_text:?} has an invalid id and an unreadable record: {e}"))
        }
    })?;
    if record.id.to_string() != id_text {
        return Err(StoreError::Corrupt { id: record.id, reason: format!("stored under another id ({id_text})") });
    }
    Ok(record)
}

fn load(conn: &Connection, id: JobId) -> Result<Option<JobRecord>> {
    let id_text = id.to_string();
    let json: Option<String> = conn
        .query_row("SELECT record FROM jobs WHERE id = ?1", [&id_text], |row| row.get(0))
        .optional()
        .map_err(backend("load job"))?;
    json.map(|json| decode(&id_text, &json)).transpose()
}

/// Writes the record JSON and its indexed columns together, so they never disagree.
fn save(conn: &Connection, record: &JobRecord) -> Result<()> {
    let json = serde_json::to_string(record)
        .map_err(|e| StoreError::Backend(format!("cannot serialise job {}: {e}", record.id)))?;
    conn.execute(
        "INSERT INTO jobs (id, owner, status, created_at, completed_at, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, status = excluded.status,
             created_at = excluded.created_at, completed_at = excluded.completed_at, record = excluded.record",
        params![
            record.id.to_string(),
            record.owner,
            record.status.as_str(),
            record.created_at,
            record.completed_at,
            json
        ],
    )
    .map_err(backend("save job"))?;
    Ok(())
}

impl JobStore for EmbeddedStore {
    fn create(&self, job: &JobRecord) -> Result<Created> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend("begin"))?;
        // Checked inside the transaction, so two racing creates of one id
        // cannot both report `created: true`.
        if let Some(existing) = load(&tx, job.id)? {
            return Ok(Created { record: existing, created: false });
        }
        save(&tx, job)?;
        tx.commit().map_err(backend("commit create"))?;
        Ok(Created { record: job.clone(), created: true })
    }

    fn get(&self, id: JobId) -> Result<Option<JobRecord>> {
        load(&self.conn(), id)
    }

    fn unfinished(&self) -> Result<Vec<JobRecord>> {
        let conn = self.conn();
        // rowid breaks ties in insertion order: jobs created in the same millisecond.
        let sql = format!("SELECT id, record FROM jobs WHERE status IN {UNFINISHED_SQL} ORDER BY created_at, rowid");
        let mut stmt = conn.prepare_cached(&sql).map_err(backend("prepare unfinished"))?;
        let rows = stmt
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
            .map_err(backend("query unfinished"))?;
        rows.map(|row| {
            let (id, json) = row.map_err(backend("read unfinished"))?;
            decode(&id, &json)
        })
        .collect()
    }

    fn start(&self, id: JobId, now: i64) -> Result<bool> {
        let outcome = self.update(id, |job, _| {
            if job.status.is_terminal() {
                return Ok(false);
            }
            job.status = JobStatus::Running;
            job.started_at.get_or_insert(now);
            job.attempts = job.attempts.saturating_add(1);
            // A new attempt starts from the first step; progress from an attempt
            // cut short by a restart would be a lie.
            job.progress = None;
            Ok(true)
        })?;
        Ok(outcome.is_some_and(|(_, changed)| changed))
    }

    fn set_progress(&self, id: JobId, progress: &JobProgress) -> Result<()> {
        self.update(id, |job, _| {
            if job.status != JobStatus::Running {
                return Ok(false);
            }
            job.progress = Some(progress.clone());
            Ok(true)
        })?;
        Ok(())
    }

    fn complete(&self, id: JobId, images: &[(ImageInfo, Vec<u8>)], now: i64) -> Result<bool> {
        let outcome = self.update(id, |job, tx| {
            if job.status.is_terminal() {
                return Ok(false);
            }
            let mut insert = tx
                .prepare_cached("INSERT OR REPLACE INTO images (job_id, idx, png) VALUES (?1, ?2, ?3)")
                .map_err(backend("prepare image insert"))?;
            let id_text = id.to_string();
            for (info, png) in images {
                let index = i64::try_from(info.index).map_err(|_| {
                    StoreError::Backend(format!("image index {} of job {id} is out of range", info.index))
                })?;
                insert.execute(params![id_text, index, png]).map_err(backend("store image"))?;
            }
            job.status = JobStatus::Succeeded;
            job.completed_at = Some(now);
            job.images = images.iter().map(|(info, _)| info.clone()).collect();
            Ok(true)
        })?;
        Ok(outcome.is_some_and(|(_, changed)| changed))
    }

    fn fail(&self, id: JobId, error: &JobError, now: i64) -> Result<bool> {
        let outcome = self.update(id, |job, _| {
            if job.status.is_terminal() {
                return Ok(false);
            }
            job.status = JobStatus::Failed;
            job.completed_at = Some(now);
            job.error = Some(error.clone());
            Ok(true)
        })?;
        Ok(outcome.is_some_and(|(_, changed)| changed))
    }

    fn cancel(&self, id: JobId, now: i64) -> Result<Option<JobRecord>> {
        let outcome = self.update(id, |job, _| {
            if job.status.is_terminal() {
                return Ok(false);
            }
            job.status = JobStatus::Canceled;
            job.completed_at = Some(now);
            Ok(true)
        })?;
        Ok(outcome.map(|(record, _)| record))
    }

    fn image(&self, id: JobId, index: usize) -> Result<Option<Vec<u8>>> {
        let Ok(index) = i64::try_from(index) else {
            return Ok(None);
        };
        self.conn()
            .query_row("SELECT png FROM images WHERE job_id = ?1 AND idx = ?2", params![id.to_string(), index], |row| {
                row.get(0)
            })
            .optional()
            .map_err(backend("load image"))
    }

    fn purge_finished(&self, before: i64) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(backend("begin"))?;
        // Images go with their jobs through the foreign key's ON DELETE CASCADE.
        let sql = format!("DELETE FROM jobs WHERE completed_at < ?1 AND status IN {TERMINAL_SQL}");
        let deleted = tx.execute(&sql, [before]).map_err(backend("purge jobs"))?;
        tx.commit().map_err(backend("commit purge"))?;
        Ok(deleted)
    }

    fn counts(&self) -> Result<StatusCounts> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            .map_err(backend("prepare counts"))?;
        let rows = stmt
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
            .map_err(backend("query counts"))?;
        // Every status appears, zeros included, so gauges fall back to 0.
        let mut counts: StatusCounts = ALL_STATUSES.iter().map(|&s| (s, 0)).collect();
        for row in rows {
            let (status, n) = row.map_err(backend("read counts"))?;
            let status = JobStatus::parse(&status)
                .ok_or_else(|| StoreError::Backend(format!("sqlite: jobs table holds unknown status {status:?}")))?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| *s == status) {
                slot.1 = u64::try_from(n).unwrap_or(0);
            }
        }
        Ok(counts)
    }
}

const ALL_STATUSES: [JobStatus; 5] =
    [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::conformance::sample_job;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("diffusiond-embedded-{}", uuid::Uuid::new_v4()));
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn pragma<T: rusqlite::types::FromSql>(store: &EmbeddedStore, name: &str) -> T {
        store.conn().pragma_query_value(None, name, |row| row.get(0)).expect("pragma")
    }

    #[test]
    fn open_sets_durable_pragmas_and_schema_version() {
        let dir = TempDir::new();
        let store = EmbeddedStore::open(&dir.0.join("nested/data")).expect("open");
        assert!(store.path().ends_with(DB_FILE) && store.path().exists());
        assert_eq!(pragma::<String>(&store, "journal_mode"), "wal");
        assert_eq!(pragma::<i64>(&store, "synchronous"), 2, "synchronous must be FULL");
        assert_eq!(pragma::<i64>(&store, "foreign_keys"), 1);
        assert_eq!(pragma::<i64>(&store, "user_version"), SCHEMA_VERSION);
        assert_eq!(pragma::<i64>(&store, "busy_timeout"), BUSY_TIMEOUT.as_millis() as i64);
    }

    #[test]
    fn reopening_keeps_the_schema_and_a_newer_one_is_refused() {
        let dir = TempDir::new();
        drop(EmbeddedStore::open(&dir.0).expect("first open"));
        let store = EmbeddedStore::open(&dir.0).expect("reopen at the same version");
        store.conn().pragma_update(None, "user_version", SCHEMA_VERSION + 1).expect("bump");
        drop(store);
        let err = EmbeddedStore::open(&dir.0).expect_err("a newer schema must be refused");
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn columns_follow_the_record() {
        let dir = TempDir::new();
        let store = EmbeddedStore::open(&dir.0).expect("open");
        let job = sample_job(Some("owner-a"), 1_000);
        store.create(&job).expect("create");
        store.fail(job.id, &JobError { kind: "oom".into(), message: "out of memory".into() }, 2_000).expect("fail");
        let (owner, status, created, completed): (Option<String>, String, i64, Option<i64>) = store
            .conn()
            .query_row(
                "SELECT owner, status, created_at, completed_at FROM jobs WHERE id = ?1",
                [job.id.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .expect("row");
        assert_eq!(
            (owner.as_deref(), status.as_str(), created, completed),
            (Some("owner-a"), "failed", 1_000, Some(2_000))
        );
    }

    #[test]
    fn unreadable_record_is_reported_as_corrupt() {
        let dir = TempDir::new();
        let store = EmbeddedStore::open(&dir.0).expect("open");
        let job = sample_job(None, 1);
        store.create(&job).expect("create");
        store
            .conn()
            .execute("UPDATE jobs SET record = '{\"id\": 3}' WHERE id = ?1", [job.id.to_string()])
            .expect("damage");
        match store.get(job.id) {
            Err(StoreError::Corrupt { id, .. }) => assert_eq!(id, job.id),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(store.unfinished(), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn restarting_a_job_clears_stale_progress() {
        let dir = TempDir::new();
        let store = EmbeddedStore::open(&dir.0).expect("open");
        let job = sample_job(None, 1);
        store.create(&job).expect("create");
        assert!(store.start(job.id, 10).expect("start"));
        let progress =
            JobProgress { stage: 0, stages: 1, stage_name: "base".into(), step: 5, total_steps: 10, fraction: 0.5, preview: None };
        store.set_progress(job.id, &progress).expect("progress");
        assert!(store.start(job.id, 20).expect("restart"));
        let after = store.get(job.id).expect("get").expect("present");
        assert_eq!((after.progress, after.attempts, after.started_at), (None, 2, Some(10)));
    }

    #[test]
    fn huge_image_index_is_simply_absent() {
        let dir = TempDir::new();
        let store = EmbeddedStore::open(&dir.0).expect("open");
        assert_eq!(store.image(uuid::Uuid::new_v4(), usize::MAX).expect("image"), None);
    }
}

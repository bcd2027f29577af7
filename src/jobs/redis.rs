//! The shared job store: job records, progress, images and retention in Redis,
//! so that several diffusiond replicas behind a load balancer answer for every
//! job, whichever replica accepted or ran it.
//!
//! # Key schema
//!
//! Every key starts with a prefix (`diffusiond` unless [`RedisOptions::prefix`]
//! says otherwise), so several deployments, or tests, can share one Redis.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{p}:meta` | hash | `schema` → layout version; `open` refuses a newer one |
//! | `{p}:seq` | string | a counter; each job takes the next value when created |
//! | `{p}:job:{id}` | hash | one job (fields below), never image data |
//! | `{p}:job:{id}:images` | hash | image index (decimal) → PNG bytes, written by `complete` |
//! | `{p}:jobs:queued`, `{p}:jobs:running` | sorted set | job ids scored by `created_at` |
//! | `{p}:jobs:succeeded`, `…:failed`, `…:canceled` | sorted set | job ids scored by `completed_at` |
//! | `{p}:queue`, `{p}:queue:…` | | the work queue (a Redis stream and its dead letters), which lives beside this store: see `stream` |
//!
//! A job hash has `spec` (JSON `{owner, request}`, never changed after create),
//! `status`, `created_at`, `seq`, `attempts`, and, once they have values,
//! `started_at`, `completed_at`, `progress` (JSON), `error` (JSON) and `images`
//! (JSON list of image metadata). Each job is in exactly one status set, so
//! `counts` is five `ZCARD`s, `unfinished` reads two sets (ties on `created_at`
//! are broken by `seq`, i.e. creation order), and `purge_finished` walks the
//! terminal sets by score.
//!
//! # Why Lua scripts
//!
//! Replicas race: two workers may finish the same job (at-least-once delivery),
//! a cancel may arrive on one replica while another reports progress. Every
//! operation that reads a status and then writes is one Lua script, which Redis
//! runs atomically, so "complete unless already terminal" holds across replicas
//! exactly as a SQLite transaction holds within one process: the first result is
//! kept, later ones change nothing. Scripts never parse the request JSON (Lua's
//! cjson would round seeds above 2^53); they move opaque strings and integers.
//!
//! # Retention
//!
//! When a job finishes, its hash and its images get a TTL of
//! [`RedisOptions::retention`], so Redis frees results even when no replica
//! runs `purge_finished`. Unfinished jobs never expire. The status sets keep an
//! expired job's id (a few dozen bytes) until the next purge, so until then
//! `counts` still includes it; `purge_finished` removes such entries, and
//! `create` drops them if the id is reused.
//!
//! # Deployment notes
//!
//! Standalone Redis (or a primary behind Sentinel/a managed endpoint): scripts
//! touch keys derived from job ids, which Redis Cluster would reject. Use
//! `maxmemory-policy noeviction` (or a `volatile-*` policy, which can evict only
//! finished jobs); `open` warns about `allkeys-*`. Durability of accepted jobs
//! is Redis's: enable AOF (`appendfsync everysec` or `always`).
//!
//! # Connections
//!
//! The trait is synchronous (callers are on the blocking pool), so this uses the
//! synchronous client with a small pool of idle connections (`redis_pool`): a
//! failed connection is dropped, a pooled one found closed is retried once on a
//! fresh connection. Every transition is idempotent, so even the
//! rare ambiguous retry is harmless: at worst `start` counts one extra attempt,
//! or `complete` reports `false` for a result its first try did store. A call
//! that times out is not retried (Redis may still be running it).

use std::collections::HashMap;
use std::time::Duration;

use ::redis::{Script, ScriptInvocation};
use serde::{Deserialize, Serialize};

use super::model::{ImageInfo, JobError, JobId, JobProgress, JobRecord, JobStatus};
use super::redis_pool::Pool;
use super::store::{Created, JobStore, Result, StatusCounts, StoreError};
use crate::pipeline::GenerationRequest;

/// The key prefix unless the options name another.
pub const DEFAULT_PREFIX: &str = "diffusiond";

/// Bumped whenever the key layout changes; `open` refuses a newer layout.
const SCHEMA_VERSION: u32 = 1;

/// Jobs a purge script deletes per status set per call, so that one call never
/// blocks Redis for long; the store loops until a batch comes back short.
const PURGE_BATCH: usize = 500;

/// Every status, in the order the scripts take their sets as KEYS.
const ALL_STATUSES: [JobStatus; 5] =
    [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled];
const TERMINAL_STATUSES: [JobStatus; 3] = [JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled];

/// How to reach and use Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Namespace of every key.
    pub prefix: String,
    /// TTL of finished jobs and their images; `None` keeps them until purged.
    pub retention: Option<Duration>,
    /// Connect, read and write timeout of each connection: a stalled Redis
    /// fails a call instead of hanging a blocking-pool thread.
    pub timeout: Duration,
    /// Idle connections kept for reuse; more are opened under load and closed after.
    pub max_idle: usize,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self { prefix: DEFAULT_PREFIX.into(), retention: None, timeout: Duration::from_secs(5), max_idle: 8 }
    }
}

impl RedisOptions {
    /// The defaults, with finished jobs expiring after `retention`.
    pub fn with_retention(retention: Duration) -> Self {
        Self { retention: Some(retention), ..Self::default() }
    }

    /// The TTL argument of the scripts, in ms (0: none; at least 1 otherwise,
    /// since `PEXPIRE 0` would delete at once).
    fn ttl_ms(&self) -> u64 {
        self.retention.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1))
    }
}

/// Whether `location` names a Redis server (as opposed to the embedded store).
pub fn is_redis_url(location: &str) -> bool {
    ["redis://", "rediss://", "redis+unix://", "unix://"].iter().any(|scheme| location.starts_with(scheme))
}

/// A [`JobStore`] in Redis, shared by every replica that opens the same server
/// and prefix; cheap to share behind an `Arc`.
pub struct RedisStore {
    pool: Pool,
    keys: Keys,
    scripts: Scripts,
    ttl_ms: u64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The address only: the URL may carry a password.
        f.debug_struct("RedisStore")
            .field("server", &self.pool.server())
            .field("prefix", &self.keys.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://[:password@]host:port/db` or
    /// `redis+unix:///path/to/socket?db=N`), checks the key layout version and
    /// records it on first use. Fails when Redis cannot be reached.
    pub fn open(url: &str, options: RedisOptions) -> Result<Self> {
        let store = Self {
            pool: Pool::open(url, options.timeout, options.max_idle)?,
            keys: Keys { prefix: options.prefix.clone() },
            scripts: Scripts::new(),
            ttl_ms: options.ttl_ms(),
        };
        store.check_schema()?;
        store.warn_about_eviction();
        Ok(store)
    }

    fn check_schema(&self) -> Result<()> {
        let meta = self.keys.meta();
        let version: u32 = self.pool.run("schema version", |conn| {
            ::redis::pipe()
                .atomic()
                .hset_nx(&meta, "schema", SCHEMA_VERSION)
                .ignore()
                .hget(&meta, "schema")
                .query::<(u32,)>(conn)
                .map(|(v,)| v)
        })?;
        // Later versions migrate older layouts here, in order.
        if version != SCHEMA_VERSION {
            let who = if version > SCHEMA_VERSION { "a newer" } else { "an older" };
            return Err(StoreError::Backend(format!(
                "redis: key layout version {version} under prefix {:?} was written by {who} diffusiond (this one knows {SCHEMA_VERSION})",
                self.keys.prefix
            )));
        }
        Ok(())
    }

    /// An `allkeys-*` eviction policy may drop queued jobs under memory pressure.
    /// Managed services often forbid CONFIG, so failing to ask is not an error.
    fn warn_about_eviction(&self) {
        let policy = self.pool.run("config get", |conn| {
            ::redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy").query::<HashMap<String, String>>(conn)
        });
        if let Some(policy) = policy.ok().and_then(|mut m| m.remove("maxmemory-policy")) {
            if policy.starts_with("allkeys") {
                tracing::warn!(server = %self.pool.server(), %policy, "redis may evict unfinished jobs; use noeviction or a volatile-* policy");
            }
        }
    }

    fn set_keys(&self, invocation: &mut ScriptInvocation<'_>, statuses: &[JobStatus]) {
        for &status in statuses {
            invocation.key(self.keys.status(status));
        }
    }

    /// Runs the finish script: queued|running → `status`, with extra record
    /// fields and images. Returns whether it changed the job, and the record after.
    fn finish(
        &self,
        id: JobId,
        status: JobStatus,
        now: i64,
        fields: &[(&str, Vec<u8>)],
        images: &[(ImageInfo, Vec<u8>)],
    ) -> Result<(bool, Option<JobRecord>)> {
        let mut invocation = self.scripts.finish.prepare_invoke();
        invocation.key(self.keys.job(id)).key(self.keys.images(id));
        self.set_keys(&mut invocation, &[JobStatus::Queued, JobStatus::Running, status]);
        invocation.arg(id.to_string()).arg(status.as_str()).arg(now).arg(self.ttl_ms).arg(fields.len());
        for (name, value) in fields {
            invocation.arg(*name).arg(value.as_slice());
        }
        for (info, png) in images {
            invocation.arg(info.index).arg(png.as_slice());
        }
        let (changed, stored): (u8, HashMap<String, Vec<u8>>) =
            self.pool.run(status.as_str(), |conn| invocation.invoke(conn))?;
        Ok((changed == 1, decode(id, stored)?.map(|d| d.record)))
    }
}

impl JobStore for RedisStore {
    fn create(&self, job: &JobRecord) -> Result<Created> {
        let fields = encode(job)?;
        let (score, ttl) = match job.status {
            s if s.is_terminal() => (job.completed_at.unwrap_or(job.created_at), self.ttl_ms),
            _ => (job.created_at, 0),
        };
        let mut invocation = self.scripts.create.prepare_invoke();
        invocation.key(self.keys.job(job.id)).key(self.keys.images(job.id)).key(self.keys.seq());
        self.set_keys(&mut invocation, &ALL_STATUSES);
        invocation.arg(job.id.to_string()).arg(job.status.as_str()).arg(score).arg(ttl);
        for (name, value) in &fields {
            invocation.arg(*name).arg(value.as_slice());
        }
        // The script answers nil when it stored the job, else the existing record.
        let existing: Option<HashMap<String, Vec<u8>>> = self.pool.run("create", |conn| invocation.invoke(conn))?;
        match existing {
            None => Ok(Created { record: job.clone(), created: true }),
            Some(stored) => {
                let record = decode(job.id, stored)?
                    .ok_or_else(|| StoreError::Corrupt { id: job.id, reason: "existing record is empty".into() })?;
                Ok(Created { record: record.record, created: false })
            }
        }
    }

    fn get(&self, id: JobId) -> Result<Option<JobRecord>> {
        let key = self.keys.job(id);
        let stored: HashMap<String, Vec<u8>> =
            self.pool.run("get", |conn| ::redis::cmd("HGETALL").arg(&key).query(conn))?;
        Ok(decode(id, stored)?.map(|d| d.record))
    }

    fn unfinished(&self) -> Result<Vec<JobRecord>> {
        let mut invocation = self.scripts.unfinished.prepare_invoke();
        self.set_keys(&mut invocation, &[JobStatus::Queued, JobStatus::Running]);
        invocation.arg(self.keys.job_prefix());
        let rows: Vec<(String, HashMap<String, Vec<u8>>)> =
            self.pool.run("unfinished", |conn| invocation.invoke(conn))?;
        let mut jobs = Vec::with_capacity(rows.len());
        for (id_text, stored) in rows {
            let id = id_text
                .parse::<JobId>()
                .map_err(|_| StoreError::Backend(format!("redis: a status set holds an invalid job id {id_text:?}")))?;
            // An id whose hash is gone (deleted by hand) is skipped, not an error.
            jobs.extend(decode(id, stored)?);
        }
        jobs.sort_by_key(|d| (d.record.created_at, d.seq));
        Ok(jobs.into_iter().map(|d| d.record).collect())
    }

    fn start(&self, id: JobId, now: i64) -> Result<bool> {
        let mut invocation = self.scripts.start.prepare_invoke();
        invocation.key(self.keys.job(id));
        self.set_keys(&mut invocation, &[JobStatus::Queued, JobStatus::Running]);
        invocation.arg(id.to_string()).arg(now);
        let started: u8 = self.pool.run("start", |conn| invocation.invoke(conn))?;
        Ok(started == 1)
    }

    fn set_progress(&self, id: JobId, progress: &JobProgress) -> Result<()> {
        let json = to_json(id, progress)?;
        let mut invocation = self.scripts.progress.prepare_invoke();
        invocation.key(self.keys.job(id)).arg(json);
        let _: u8 = self.pool.run("set_progress", |conn| invocation.invoke(conn))?;
        Ok(())
    }

    fn complete(&self, id: JobId, images: &[(ImageInfo, Vec<u8>)], now: i64) -> Result<bool> {
        let infos: Vec<&ImageInfo> = images.iter().map(|(info, _)| info).collect();
        let fields = [("images", to_json(id, &infos)?)];
        Ok(self.finish(id, JobStatus::Succeeded, now, &fields, images)?.0)
    }

    fn fail(&self, id: JobId, error: &JobError, now: i64) -> Result<bool> {
        let fields = [("error", to_json(id, error)?)];
        Ok(self.finish(id, JobStatus::Failed, now, &fields, &[])?.0)
    }

    fn cancel(&self, id: JobId, now: i64) -> Result<Option<JobRecord>> {
        Ok(self.finish(id, JobStatus::Canceled, now, &[], &[])?.1)
    }

    fn image(&self, id: JobId, index: usize) -> Result<Option<Vec<u8>>> {
        let key = self.keys.images(id);
        self.pool.run("image", |conn| ::redis::cmd("HGET").arg(&key).arg(index).query(conn))
    }

    fn purge_finished(&self, before: i64) -> Result<usize> {
        let mut invocation = self.scripts.purge.prepare_invoke();
        self.set_keys(&mut invocation, &TERMINAL_STATUSES);
        invocation.arg(before).arg(self.keys.job_prefix()).arg(PURGE_BATCH);
        let mut purged = 0;
        loop {
            let (n, more): (usize, u8) = self.pool.run("purge", |conn| invocation.invoke(conn))?;
            purged += n;
            if more == 0 {
                return Ok(purged);
            }
        }
    }

    fn counts(&self) -> Result<StatusCounts> {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for status in ALL_STATUSES {
            pipe.zcard(self.keys.status(status));
        }
        let counts: Vec<u64> = self.pool.run("counts", |conn| pipe.query(conn))?;
        Ok(ALL_STATUSES.into_iter().zip(counts).collect())
    }
}

/// Key names; the Lua scripts derive `{p}:job:{id}` and `…:images` from
/// [`Keys::job_prefix`] the same way.
struct Keys {
    prefix: String,
}

impl Keys {
    fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }

    fn seq(&self) -> String {
        format!("{}:seq", self.prefix)
    }

    fn job_prefix(&self) -> String {
        format!("{}:job:", self.prefix)
    }

    fn job(&self, id: JobId) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    fn images(&self, id: JobId) -> String {
        format!("{}:job:{id}:images", self.prefix)
    }

    fn status(&self, status: JobStatus) -> String {
        format!("{}:jobs:{}", self.prefix, status.as_str())
    }
}

/// What never changes after create, stored as one JSON field.
#[derive(Serialize, Deserialize)]
struct Spec {
    owner: Option<String>,
    request: GenerationRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
}

fn to_json<T: Serialize + ?Sized>(id: JobId, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("cannot serialise job {id}: {e}")))
}

/// The hash fields of a record (absent options are left out).
fn encode(job: &JobRecord) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let spec = Spec { owner: job.owner.clone(), request: job.request.clone(), request_id: job.request_id.clone() };
    let int = |n: i64| n.to_string().into_bytes();
    let mut fields = vec![
        ("spec", to_json(job.id, &spec)?),
        ("status", job.status.as_str().as_bytes().to_vec()),
        ("created_at", int(job.created_at)),
        ("attempts", job.attempts.to_string().into_bytes()),
        ("images", to_json(job.id, &job.images)?),
    ];
    fields.extend(job.started_at.map(|t| ("started_at", int(t))));
    fields.extend(job.completed_at.map(|t| ("completed_at", int(t))));
    if let Some(progress) = &job.progress {
        fields.push(("progress", to_json(job.id, progress)?));
    }
    if let Some(error) = &job.error {
        fields.push(("error", to_json(job.id, error)?));
    }
    Ok(fields)
}

/// A record read back, with its creation sequence number (for ordering).
struct Decoded {
    record: JobRecord,
    seq: u64,
}

/// Rebuilds a record from its hash; an empty hash is an absent job.
fn decode(id: JobId, stored: HashMap<String, Vec<u8>>) -> Result<Option<Decoded>> {
    if stored.is_empty() {
        return Ok(None);
    }
    let fields = Fields { id, stored };
    let spec: Spec = fields.required("spec", Fields::json)?;
    let status = fields.required("status", |f, name| {
        f.text(name)?.map(|s| JobStatus::parse(s).ok_or_else(|| f.corrupt(format!("unknown status {s:?}")))).transpose()
    })?;
    let record = JobRecord {
        id,
        owner: spec.owner,
        status,
        request: spec.request,
        request_id: spec.request_id,
        created_at: fields.required("created_at", Fields::int)?,
        started_at: fields.int("started_at")?,
        completed_at: fields.int("completed_at")?,
        progress: fields.json("progress")?,
        error: fields.json("error")?,
        images: fields.json("images")?.unwrap_or_default(),
        attempts: fields.required("attempts", Fields::int)?,
    };
    Ok(Some(Decoded { record, seq: fields.required("seq", Fields::int)? }))
}

/// Typed access to one job hash; every failure names the job and the field.
struct Fields {
    id: JobId,
    stored: HashMap<String, Vec<u8>>,
}

impl Fields {
    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt { id: self.id, reason }
    }

    fn text(&self, name: &str) -> Result<Option<&str>> {
        self.stored
            .get(name)
            .map(|bytes| std::str::from_utf8(bytes).map_err(|_| self.corrupt(format!("field {name} is not UTF-8"))))
            .transpose()
    }

    fn int<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        self.text(name)?
            .map(|s| s.parse().map_err(|_| self.corrupt(format!("field {name} is not an integer: {s:?}"))))
            .transpose()
    }

    fn json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        self.stored
            .get(name)
            .map(|bytes| {
                serde_json::from_slice(bytes)
                    .map_err(|e| self.corrupt(format!("field {name} is not valid JSON for this version: {e}")))
            })
            .transpose()
    }

    fn required<T>(&self, name: &str, read: impl Fn(&Self, &str) -> Result<Option<T>>) -> Result<T> {
        read(self, name)?.ok_or_else(|| self.corrupt(format!("field {name} is missing")))
    }
}

/// The Lua scripts (see the module docs for why). Each declares every key it
/// is given in KEYS; `unfinished` and `purge` also build job keys from the
/// prefix in ARGV.
struct Scripts {
    create: Script,
    start: Script,
    progress: Script,
    finish: Script,
    unfinished: Script,
    purge: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            create: Script::new(CREATE_LUA),
            start: Script::new(START_LUA),
            progress: Script::new(PROGRESS_LUA),
            finish: Script::new(FINISH_LUA),
            unfinished: Script::new(UNFINISHED_LUA),
            purge: Script::new(PURGE_LUA),
        }
    }
}

/// KEYS: job, images, seq, then the status sets in `ALL_STATUSES` order.
/// ARGV: id, status, score, ttl ms (0: none), then field/value pairs.
/// Returns nil when it stored the job, else the existing job's fields.
const CREATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HGETALL', KEYS[1])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'seq', redis.call('INCR', KEYS[3]), unpack(ARGV, 5))
local statuses = {'queued', 'running', 'succeeded', 'failed', 'canceled'}
for i, status in ipairs(statuses) do
  -- A job with this id that expired by TTL may still be listed: drop it.
  redis.call('ZREM', KEYS[i + 3], ARGV[1])
  if status == ARGV[2] then
    redis.call('ZADD', KEYS[i + 3], ARGV[3], ARGV[1])
  end
end
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return false
";

/// KEYS: job, queued set, running set. ARGV: id, now. Returns 1 when started.
const START_LUA: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then
  return 0
end
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running')
-- A new attempt starts from the first step.
redis.call('HDEL', KEYS[1], 'progress')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
return 1
";

/// KEYS: job. ARGV: progress JSON. Only a running job takes progress.
const PROGRESS_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return 0
end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
return 1
";

/// KEYS: job, images, queued set, running set, the new status's set.
/// ARGV: id, new status, now, ttl ms (0: none), n, n field/value pairs, then
/// image index/PNG pairs. Returns {changed, the job's fields afterwards}.
const FINISH_LUA: &str = r"
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then
  return {0, redis.call('HGETALL', KEYS[1])}
end
local fields_end = 5 + 2 * tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'completed_at', ARGV[3], unpack(ARGV, 6, fields_end))
if #ARGV > fields_end then
  redis.call('HSET', KEYS[2], unpack(ARGV, fields_end + 1))
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
if tonumber(ARGV[4]) > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return {1, redis.call('HGETALL', KEYS[1])}
";

/// KEYS: queued set, running set. ARGV: job key prefix.
/// Returns {id, fields} for each, one consistent snapshot.
const UNFINISHED_LUA: &str = r"
local out = {}
for _, set in ipairs(KEYS) do
  for _, id in ipairs(redis.call('ZRANGE', set, 0, -1)) do
    out[#out + 1] = {id, redis.call('HGETALL', ARGV[1] .. id)}
  end
end
return out
";

/// KEYS: succeeded, failed, canceled sets. ARGV: cutoff (exclusive), job key
/// prefix, batch size. Returns {jobs deleted, 1 when a set may hold more}.
const PURGE_LUA: &str = r"
local statuses = {'succeeded', 'failed', 'canceled'}
local purged, more = 0, 0
for i, set in ipairs(KEYS) do
  local ids = redis.call('ZRANGEBYSCORE', set, '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[3])
  for _, id in ipairs(ids) do
    local job = ARGV[2] .. id
    -- Only the job this entry lists: an expired id may have been created anew.
    if redis.call('HGET', job, 'status') == statuses[i] then
      redis.call('DEL', job .. ':images')
      purged = purged + redis.call('DEL', job)
    end
    redis.call('ZREM', set, id)
  end
  if #ids == tonumber(ARGV[3]) then
    more = 1
  end
end
return {purged, more}
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::conformance::sample_job;

    #[test]
    fn records_round_trip_through_hash_fields() {
        let mut job = sample_job(Some("owner"), 1_700_000_000_123);
        job.status = JobStatus::Failed;
        job.started_at = Some(5);
        job.completed_at = Some(9);
        job.attempts = 3;
        job.error = Some(JobError { kind: "oom".into(), message: "out of memory".into() });
        job.images = vec![ImageInfo { index: 0, seed: u64::MAX, width: 64, height: 32 }];
        let mut stored: HashMap<String, Vec<u8>> =
            encode(&job).expect("encode").into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        stored.insert("seq".into(), b"42".to_vec());
        let decoded = decode(job.id, stored).expect("decode").expect("present");
        assert_eq!(decoded.record, job);
        assert_eq!(decoded.seq, 42);
        assert!(decode(job.id, HashMap::new()).expect("decode").is_none(), "an empty hash is an absent job");
    }

    #[test]
    fn damaged_fields_are_corrupt_and_name_the_field() {
        let job = sample_job(None, 1);
        let good: HashMap<String, Vec<u8>> = encode(&job)
            .expect("encode")
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .chain([("seq".to_owned(), b"1".to_vec())])
            .collect();
        for (field, value) in [("status", Some(&b"paused"[..])), ("created_at", Some(b"soon")), ("spec", None)] {
            let mut stored = good.clone();
            match value {
                Some(v) => stored.insert(field.into(), v.to_vec()),
                None => stored.remove(field),
            };
            match decode(job.id, stored) {
                Err(StoreError::Corrupt { id, reason }) => {
                    assert_eq!(id, job.id);
                    assert!(reason.contains(field), "{reason}");
                }
                other => panic!("damaged {field} must be corrupt, got {:?}", other.map(|d| d.map(|d| d.record))),
            }
        }
    }

    #[test]
    fn keys_follow_the_documented_schema() {
        let keys = Keys { prefix: "p".into() };
        let id = JobId::nil();
        assert_eq!(keys.job(id), format!("p:job:{id}"));
        assert_eq!(keys.images(id), format!("{}{id}:images", keys.job_prefix()));
        assert_eq!(keys.status(JobStatus::Canceled), "p:jobs:canceled");
        assert_eq!((keys.meta(), keys.seq()), ("p:meta".to_owned(), "p:seq".to_owned()));
    }

    #[test]
    fn retention_becomes_a_positive_ttl() {
        assert_eq!(RedisOptions::default().ttl_ms(), 0, "no retention, no TTL");
        assert_eq!(RedisOptions::with_retention(Duration::from_secs(2)).ttl_ms(), 2000);
        assert_eq!(RedisOptions::with_retention(Duration::ZERO).ttl_ms(), 1, "PEXPIRE 0 would delete at once");
    }

    #[test]
    fn redis_urls_are_recognised_and_never_echoed() {
        assert!(is_redis_url("redis://cache:6379/2") && is_redis_url("redis+unix:///run/redis.sock"));
        assert!(!is_redis_url("data") && !is_redis_url("/var/lib/diffusiond"));
        let err = RedisStore::open("redis://:hunter2@127.0.0.1:1/0", RedisOptions::default())
            .expect_err("nothing listens on port 1");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1/0"), "{err}");
    }
}

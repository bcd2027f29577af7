//! The work queue that replicas share: a Redis stream of job ids read through
//! one consumer group, so that each job goes to one replica at a time and a
//! replica that dies mid-job loses nothing. This file is the protocol (every
//! Redis command the queue sends); `redis_queue` is the HTTP side's view of it
//! and `worker::redis_intake` the compute side's.
//!
//! # Names (docker/compose.yaml, deploy/base and KEDA use them too)
//!
//! | name | type | holds |
//! |---|---|---|
//! | `{p}:queue` | stream | one entry per submitted job: field `id` → the job's UUID |
//! | `workers` on `{p}:queue` | consumer group | one consumer per server process |
//! | `{p}:queue:dead` | stream (capped) | jobs given up on: `id`, `entry`, `deliveries`, `consumer` |
//! | `{p}:queue:cancel` | pub/sub channel | job ids to stop wherever they run (`redis_events`) |
//! | `{p}:events` | pub/sub channel | job events for listeners on other replicas (`redis_events`) |
//!
//! # Semantics: at-least-once
//!
//! - Submit is `XADD {p}:queue * id <uuid>`, after the job is in the store.
//! - A replica reads with `XREADGROUP GROUP workers <consumer> COUNT k BLOCK t`,
//!   only as many entries as it can start at once, so work it cannot start
//!   soon stays undelivered for another replica.
//! - It acknowledges (`XACK`) an entry once the job's outcome (result,
//!   failure or cancellation) is in the store.
//! - A live replica keeps its entries: [`WorkStream::keep`] re-claims them
//!   (`XCLAIM … 0 <ids> JUSTID`, which resets their idle time without counting
//!   a delivery), but only the ones it still owns.
//! - An entry idle longer than the reclaim timeout belongs to a replica that
//!   stopped: [`WorkStream::reclaim`] (`XAUTOCLAIM`) hands it to a replica with
//!   room, counting one more delivery. The job runs again from its first step;
//!   the store keeps one result however often it runs.
//! - An entry delivered more than the allowed number of times is a dead letter:
//!   the job is failed in the store, recorded in `{p}:queue:dead`, and acknowledged.
//! - Acknowledged entries are trimmed with `XTRIM MINID` below both the group's
//!   last delivered id and its oldest pending entry (never `XDEL`, whose
//!   tombstones would make the group's `lag` unknown).
//!
//! The backlog is the group's `lag` (Redis 7: entries not yet delivered); on
//! a server without it the entries after the last delivered id are counted.

use std::cmp::Ordering;
use std::time::Duration;

use ::redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamInfoGroupsReply, StreamPendingCountReply,
    StreamPendingReply, StreamRangeReply, StreamReadReply,
};
use ::redis::{Connection, RedisError, RedisResult, Script};

use super::model::JobId;
use super::redis::DEFAULT_PREFIX;
use super::redis_pool::Pool;
use super::store::Result;

/// The consumer group every replica reads through.
pub const GROUP: &str = "workers";

/// The entry field that holds the job id.
const FIELD: &str = "id";

/// Counting the backlog by hand (no `lag`) stops here.
const COUNT_CAP: usize = 10_000;

/// How to reach the queue.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Namespace of every key and channel (the store's prefix).
    pub prefix: String,
    /// Connect, read and write timeout of short commands.
    pub timeout: Duration,
    /// Idle connections kept for reuse.
    pub max_idle: usize,
    /// Dead letters kept in `{p}:queue:dead` (approximately; older ones are trimmed).
    pub dead_letters_kept: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self { prefix: DEFAULT_PREFIX.into(), timeout: Duration::from_secs(5), max_idle: 4, dead_letters_kept: 10_000 }
    }
}

/// The queue's key and channel names under one prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueKeys {
    pub stream: String,
    pub dead: String,
    pub cancel: String,
    pub events: String,
}

impl QueueKeys {
    pub fn new(prefix: &str) -> Self {
        Self {
            stream: format!("{prefix}:queue"),
            dead: format!("{prefix}:queue:dead"),
            cancel: format!("{prefix}:queue:cancel"),
            events: format!("{prefix}:events"),
        }
    }
}

/// An entry handed to a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The stream entry id (`<ms>-<seq>`).
    pub entry: String,
    pub job: JobId,
    /// Times the entry has been delivered, this time included.
    pub deliveries: u64,
}

/// The group's view of the queue.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backlog {
    /// Entries not delivered to any consumer yet: jobs waiting to start.
    pub waiting: usize,
    /// Entries delivered and not acknowledged: jobs running, or held by a
    /// replica that stopped until they are reclaimed.
    pub pending: usize,
    /// The last entry id delivered to the group.
    pub last_delivered: String,
}

/// The shared queue's commands; cheap to share behind an `Arc`.
pub struct WorkStream {
    pool: Pool,
    keys: QueueKeys,
    dead_letters_kept: usize,
    scripts: Scripts,
}

impl std::fmt::Debug for WorkStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkStream").field("server", &self.pool.server()).field("stream", &self.keys.stream).finish_non_exhaustive()
    }
}

/// Whether `e` says the stream or its group is gone (a flushed or restarted Redis).
pub fn is_missing_group(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("no such key")
}

impl WorkStream {
    /// Connects to `url` and creates the stream and its group when missing.
    pub fn open(url: &str, options: StreamOptions) -> Result<Self> {
        let stream = Self {
            pool: Pool::open(url, options.timeout, options.max_idle)?,
            keys: QueueKeys::new(&options.prefix),
            dead_letters_kept: options.dead_letters_kept,
            scripts: Scripts::new(),
        };
        stream.ensure_group()?;
        Ok(stream)
    }

    pub fn keys(&self) -> &QueueKeys {
        &self.keys
    }

    /// The server, safe to log.
    pub fn server(&self) -> &str {
        self.pool.server()
    }

    /// Creates the group (reading from the stream's start) unless it exists.
    pub fn ensure_group(&self) -> Result<()> {
        self.pool.run("create the consumer group", |conn| {
            let created: RedisResult<()> =
                ::redis::cmd("XGROUP").arg("CREATE").arg(&self.keys.stream).arg(GROUP).arg("0").arg("MKSTREAM").query(conn);
            match created {
                Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
                other => other,
            }
        })
    }

    /// A connection of the caller's own, for blocking reads and subscriptions.
    pub fn dedicated(&self, read_timeout: Duration) -> Result<Connection> {
        self.pool.dedicated(read_timeout).map_err(|e| self.pool.error("connect", e))
    }

    /// Queues `job`; returns its entry id.
    pub fn add(&self, job: JobId) -> Result<String> {
        let id = job.to_string();
        self.pool.run("xadd", |conn| ::redis::cmd("XADD").arg(&self.keys.stream).arg("*").arg(FIELD).arg(&id).query(conn))
    }

    fn group_info(&self) -> Result<::redis::streams::StreamInfoGroup> {
        let reply: StreamInfoGroupsReply = self.pool.run("xinfo groups", |conn| {
            ::redis::cmd("XINFO").arg("GROUPS").arg(&self.keys.stream).query(conn)
        })?;
        reply
            .groups
            .into_iter()
            .find(|g| g.name == GROUP)
            .ok_or_else(|| self.pool.error("xinfo groups", format!("NOGROUP: no group {GROUP:?} on {}", self.keys.stream)))
    }

    /// Waiting and pending entries, cluster-wide.
    pub fn backlog(&self) -> Result<Backlog> {
        let group = self.group_info()?;
        let waiting = match group.lag {
            Some(lag) => lag,
            None => self.after(&group.last_delivered_id, COUNT_CAP)?.len(),
        };
        Ok(Backlog { waiting, pending: group.pending, last_delivered: group.last_delivered_id })
    }

    /// The backlog and the first `limit` waiting jobs, oldest first (the next to start first).
    pub fn waiting(&self, limit: usize) -> Result<(Backlog, Vec<JobId>)> {
        let group = self.group_info()?;
        let entries = self.after(&group.last_delivered_id, limit.max(1))?;
        let jobs: Vec<JobId> = entries.iter().filter_map(job_of).collect();
        let waiting = group.lag.unwrap_or(entries.len());
        Ok((Backlog { waiting, pending: group.pending, last_delivered: group.last_delivered_id }, jobs.into_iter().take(limit).collect()))
    }

    /// Up to `count` entries after `entry` (exclusive).
    fn after(&self, entry: &str, count: usize) -> Result<Vec<StreamId>> {
        let reply: StreamRangeReply = self.pool.run("xrange", |conn| {
            ::redis::cmd("XRANGE").arg(&self.keys.stream).arg(format!("({entry}")).arg("+").arg("COUNT").arg(count).query(conn)
        })?;
        Ok(reply.ids)
    }

    /// Reads up to `count` new entries for `consumer` on its own connection,
    /// waiting up to `block` for the first. Entries without a valid job id
    /// are acknowledged and skipped.
    pub fn read(&self, conn: &mut Connection, consumer: &str, count: usize, block: Duration) -> RedisResult<Vec<Delivery>> {
        let reply: Option<StreamReadReply> = ::redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&self.keys.stream)
            .arg(">")
            .query(conn)?;
        let entries = reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default();
        let (deliveries, malformed) = self.deliveries(entries, |_| 1);
        if !malformed.is_empty() {
            ::redis::cmd("XACK").arg(&self.keys.stream).arg(GROUP).arg(&malformed).query::<()>(conn)?;
        }
        Ok(deliveries)
    }

    /// Splits entries into deliveries and the ids of malformed ones (logged).
    fn deliveries(&self, entries: Vec<StreamId>, count: impl Fn(&str) -> u64) -> (Vec<Delivery>, Vec<String>) {
        let mut good = Vec::with_capacity(entries.len());
        let mut bad = Vec::new();
        for e in entries {
            match job_of(&e) {
                Some(job) => good.push(Delivery { deliveries: count(&e.id), entry: e.id, job }),
                None => {
                    tracing::warn!(stream = %self.keys.stream, entry = %e.id, "a queue entry without a job id; dropping it");
                    bad.push(e.id);
                }
            }
        }
        (good, bad)
    }

    /// Acknowledges entries; returns how many were pending.
    pub fn ack(&self, entries: &[String]) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        self.pool.run("xack", |conn| ::redis::cmd("XACK").arg(&self.keys.stream).arg(GROUP).arg(entries).query(conn))
    }

    /// The heartbeat: resets the idle time of those of `entries` that
    /// `consumer` still owns (without counting a delivery) and returns them;
    /// the others were acknowledged or taken over by another replica.
    pub fn keep(&self, consumer: &str, entries: &[String]) -> Result<Vec<String>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.scripts.keep.prepare_invoke();
        invocation.key(&self.keys.stream).arg(GROUP).arg(consumer).arg(entries);
        self.pool.run("keep", |conn| invocation.invoke(conn))
    }

    /// Takes over up to `count` entries idle for at least `idle` (their
    /// consumer stopped), counting a delivery for each.
    pub fn reclaim(&self, consumer: &str, idle: Duration, count: usize) -> Result<Vec<Delivery>> {
        let mut claimed = Vec::new();
        let mut cursor = "0-0".to_owned();
        let idle_ms = idle.as_millis() as u64;
        while claimed.len() < count {
            let reply: StreamAutoClaimReply = self.pool.run("xautoclaim", |conn| {
                ::redis::cmd("XAUTOCLAIM")
                    .arg(&self.keys.stream)
                    .arg(GROUP)
                    .arg(consumer)
                    .arg(idle_ms)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(count - claimed.len())
                    .query(conn)
            })?;
            claimed.extend(reply.claimed);
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
        }
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        // XAUTOCLAIM does not say how often an entry was delivered; XPENDING does.
        let counts: Vec<StreamPendingCountReply> = self.pool.run("xpending", |conn| {
            let mut pipe = ::redis::pipe();
            for e in &claimed {
                pipe.cmd("XPENDING").arg(&self.keys.stream).arg(GROUP).arg(&e.id).arg(&e.id).arg(1);
            }
            pipe.query(conn)
        })?;
        let times: std::collections::HashMap<String, u64> =
            counts.into_iter().flat_map(|r| r.ids).map(|p| (p.id, p.times_delivered as u64)).collect();
        let (deliveries, malformed) = self.deliveries(claimed, |id| times.get(id).copied().unwrap_or(1));
        self.ack(&malformed)?;
        Ok(deliveries)
    }

    /// Gives `entry` back unstarted (a draining replica): acknowledges it and
    /// queues its job again as a new entry, in one step. False when the entry
    /// was no longer pending (nothing is queued then).
    pub fn requeue(&self, entry: &str, job: JobId) -> Result<bool> {
        let mut invocation = self.scripts.requeue.prepare_invoke();
        invocation.key(&self.keys.stream).arg(GROUP).arg(entry).arg(job.to_string());
        let added: Option<String> = self.pool.run("requeue", |conn| invocation.invoke(conn))?;
        Ok(added.is_some())
    }

    /// Records `delivery` in the dead-letter stream and acknowledges it, in one
    /// transaction. (The caller fails the job in the store first.)
    pub fn dead_letter(&self, delivery: &Delivery, consumer: &str) -> Result<()> {
        self.pool.run("dead letter", |conn| {
            ::redis::pipe()
                .atomic()
                .cmd("XADD")
                .arg(&self.keys.dead)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.dead_letters_kept)
                .arg("*")
                .arg(FIELD)
                .arg(delivery.job.to_string())
                .arg("entry")
                .arg(&delivery.entry)
                .arg("deliveries")
                .arg(delivery.deliveries)
                .arg("consumer")
                .arg(consumer)
                .ignore()
                .cmd("XACK")
                .arg(&self.keys.stream)
                .arg(GROUP)
                .arg(&delivery.entry)
                .ignore()
                .query::<()>(conn)
        })
    }

    /// Drops acknowledged entries: those below both the group's last delivered
    /// id and its oldest pending entry. Returns how many went.
    pub fn trim(&self) -> Result<usize> {
        // The last delivered id first: whatever is delivered after this read
        // has a larger id, so the floor below stays safe.
        let last = self.group_info()?.last_delivered_id;
        let pending: StreamPendingReply = self.pool.run("xpending", |conn| {
            ::redis::cmd("XPENDING").arg(&self.keys.stream).arg(GROUP).query(conn)
        })?;
        let floor = match &pending {
            StreamPendingReply::Data(d) if compare_ids(&d.start_id, &last) == Ordering::Less => d.start_id.clone(),
            _ => last,
        };
        if floor == "0-0" {
            return Ok(0);
        }
        self.pool.run("xtrim", |conn| {
            ::redis::cmd("XTRIM").arg(&self.keys.stream).arg("MINID").arg("~").arg(&floor).query(conn)
        })
    }

    /// Removes consumers other than `me` that hold no entries and have been idle
    /// for `idle` (processes that stopped); returns how many went. The check
    /// and the removal are one script, so a consumer that reads in between
    /// loses nothing.
    pub fn forget_consumers(&self, me: &str, idle: Duration) -> Result<usize> {
        let reply: StreamInfoConsumersReply = self.pool.run("xinfo consumers", |conn| {
            ::redis::cmd("XINFO").arg("CONSUMERS").arg(&self.keys.stream).arg(GROUP).query(conn)
        })?;
        let mut forgotten = 0;
        for c in reply.consumers {
            if c.name == me || c.pending > 0 || (c.idle as u128) < idle.as_millis() {
                continue;
            }
            let mut invocation = self.scripts.forget.prepare_invoke();
            invocation.key(&self.keys.stream).arg(GROUP).arg(&c.name);
            let removed: i64 = self.pool.run("forget consumer", |conn| invocation.invoke(conn))?;
            if removed >= 0 {
                tracing::info!(consumer = %c.name, idle_s = c.idle / 1000, "forgot a stopped queue consumer");
                forgotten += 1;
            }
        }
        Ok(forgotten)
    }

    /// The whole pending list, as (entry, consumer, deliveries): for tests and operators.
    pub fn pending(&self, limit: usize) -> Result<Vec<(String, String, u64)>> {
        let reply: StreamPendingCountReply = self.pool.run("xpending", |conn| {
            ::redis::cmd("XPENDING").arg(&self.keys.stream).arg(GROUP).arg("-").arg("+").arg(limit).query(conn)
        })?;
        Ok(reply.ids.into_iter().map(|p| (p.id, p.consumer, p.times_delivered as u64)).collect())
    }
}

/// The job id an entry carries.
fn job_of(entry: &StreamId) -> Option<JobId> {
    entry.get::<String>(FIELD).and_then(|s| s.parse().ok())
}

/// Orders stream ids (`<ms>-<seq>`) numerically.
fn compare_ids(a: &str, b: &str) -> Ordering {
    let parse = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0))
    };
    parse(a).cmp(&parse(b))
}

struct Scripts {
    keep: Script,
    requeue: Script,
    forget: Script,
}

impl Scripts {
    fn new() -> Self {
        Self { keep: Script::new(KEEP_LUA), requeue: Script::new(REQUEUE_LUA), forget: Script::new(FORGET_LUA) }
    }
}

/// KEYS: stream. ARGV: group, consumer, entry ids. Re-claims (idle time 0,
/// delivery count unchanged) each entry the consumer still owns; returns them.
const KEEP_LUA: &str = r"
local kept = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p == 1 and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
";

/// KEYS: stream. ARGV: group, entry id, job id. Acknowledges the entry and,
/// when it was pending, queues the job again; returns the new entry id.
const REQUEUE_LUA: &str = r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  return redis.call('XADD', KEYS[1], '*', 'id', ARGV[3])
end
return false
";

/// KEYS: stream. ARGV: group, consumer. Deletes the consumer when it holds no
/// entries (returns 0 or 1), else returns -1.
const FORGET_LUA: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_deployment_files() {
        let keys = QueueKeys::new(DEFAULT_PREFIX);
        // deploy/base/scaledobject.yaml and deploy/check_consistency.py name these.
        assert_eq!(keys.stream, "diffusiond:queue");
        assert_eq!(GROUP, "workers");
        assert_eq!((keys.dead.as_str(), keys.cancel.as_str(), keys.events.as_str()), ("diffusiond:queue:dead", "diffusiond:queue:cancel", "diffusiond:events"));
    }

    #[test]
    fn stream_ids_compare_numerically() {
        assert_eq!(compare_ids("9-1", "10-0"), Ordering::Less);
        assert_eq!(compare_ids("10-2", "10-10"), Ordering::Less);
        assert_eq!(compare_ids("10-10", "10-10"), Ordering::Equal);
        assert_eq!(compare_ids("0-0", "1-0"), Ordering::Less);
    }
}

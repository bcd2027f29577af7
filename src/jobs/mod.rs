//! Jobs: the model of a job, the store that persists them, the embedded
//! (SQLite) store that is the default, and the Redis store that replicas share.
//!
//! | file | owns |
//! |---|---|
//! | `model` | job records, statuses, progress, errors, image metadata |
//! | `store` | the `JobStore` trait every backend implements |
//! | `queue` | the `JobQueue` trait handlers submit through, and job events |
//! | `embedded` | the SQLite store in a data directory (WAL, synchronous writes) |
//! | `redis` | the Redis store several replicas share (Lua scripts, TTL retention) |
//! | `redis_pool` | the pooled and dedicated Redis connections the store and the queue use |
//! | `stream` | the shared work queue's protocol: a Redis stream, consumer group `workers` |
//! | `redis_queue` | the HTTP side's `JobQueue` over that stream (cluster-wide capacity) |
//! | `redis_events` | job events and cancellations across replicas (pub/sub, store fallback) |
//! | `conformance` | the checks every `JobStore` backend must pass (test support) |

pub mod conformance;
pub mod embedded;
pub mod model;
pub mod queue;
pub mod redis;
pub mod redis_events;
mod redis_pool;
pub mod redis_queue;
pub mod store;
pub mod stream;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use self::redis::{is_redis_url, RedisOptions, RedisStore};
pub use embedded::EmbeddedStore;
pub use model::{now_ms, ImageInfo, JobError, JobId, JobPreview, JobProgress, JobRecord, JobStatus};
pub use queue::{event_channel, EventSender, JobEvent, JobQueue, QueueError};
pub use redis_events::{EventRelay, RelayConfig, RelayHandle, RelayTargets};
pub use redis_queue::{RedisQueue, SharedLimits};
pub use store::{Created, JobStore, StoreError};
pub use stream::{Backlog, Delivery, QueueKeys, StreamOptions, WorkStream};

/// Opens the store a `--store` setting names: a Redis URL (`redis://host:port/db`,
/// `redis+unix:///path?db=N`; see [`is_redis_url`]) opens the shared store, whose
/// finished jobs expire after `retention`; `None` opens the embedded store in
/// `data_dir`.
pub fn open_store(
    location: Option<&str>,
    data_dir: &Path,
    retention: Duration,
) -> Result<Arc<dyn JobStore>, StoreError> {
    match location {
        None => Ok(Arc::new(EmbeddedStore::open(data_dir)?)),
        Some(url) if is_redis_url(url) => Ok(Arc::new(RedisStore::open(url, RedisOptions::with_retention(retention))?)),
        // Never echo the value: a mistyped URL may still hold a password.
        Some(_) => Err(StoreError::Backend(
            "unsupported job store location (expected redis://, rediss://, redis+unix:// or unix://)".into(),
        )),
    }
}

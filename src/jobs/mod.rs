//! Jobs: the model of a job, the store that persists them, and the embedded
//! (SQLite) store that is the default.
//!
//! | file | owns |
//! |---|---|
//! | `model` | job records, statuses, progress, errors, image metadata |
//! | `store` | the `JobStore` trait every backend implements |
//! | `queue` | the `JobQueue` trait handlers submit through, and job events |
//! | `embedded` | the SQLite store in a data directory (WAL, synchronous writes) |
//! | `conformance` | the checks every `JobStore` backend must pass (test support) |

pub mod conformance;
pub mod embedded;
pub mod model;
pub mod queue;
pub mod store;

pub use embedded::EmbeddedStore;
pub use model::{now_ms, ImageInfo, JobError, JobId, JobProgress, JobRecord, JobStatus};
pub use queue::{event_channel, EventSender, JobEvent, JobQueue, QueueError};
pub use store::{Created, JobStore, StoreError};

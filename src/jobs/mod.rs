//! Jobs: the model of a job, the store that persists them, and the embedded
//! (SQLite) store that is the default.
//!
//! | file | owns |
//! |---|---|
//! | `model` | job records, statuses, progress, errors, image metadata |
//! | `store` | the `JobStore` trait every backend implements |
//! | `embedded` | the SQLite store in a data directory (WAL, synchronous writes) |

pub mod embedded;
pub mod model;
pub mod store;

pub use model::{now_ms, ImageInfo, JobError, JobId, JobProgress, JobRecord, JobStatus};
pub use store::{Created, JobStore, StoreError};

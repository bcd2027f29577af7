//! The compute side: a dedicated thread owns the models and advances every
//! running job by one denoising step per UNet call (step-level continuous batching).
//!
//! | file | owns |
//! |---|---|
//! | `readiness` | loading / ready / draining, published to the HTTP side |
//! | `queue` | the in-process waiting list, cancellations and capacity (`JobQueue`) |
//! | `engine` | the batching loop: admission, text cache, grouped UNet calls, completion |
//! | `service` | starting the thread: load, warm up, resume, announce readiness |

pub mod engine;
pub mod queue;
pub mod readiness;
pub mod service;

pub use engine::{EngineConfig, EngineStats};
pub use queue::{LocalQueue, QueueLimits};
pub use readiness::{readiness_channel, Readiness, ReadinessReceiver, ReadinessSender};
pub use service::{spawn, WorkerHandle, WorkerSettings};

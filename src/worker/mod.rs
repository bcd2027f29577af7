//! The compute side: a dedicated thread owns the models and advances every
//! running job by one denoising step per UNet call (step-level continuous batching).
//!
//! | file | owns |
//! |---|---|
//! | `readiness` | loading / ready / draining, published to the HTTP side |
//! | `queue` | the in-process waiting list, cancellations and capacity (`JobQueue`) |
//! | `engine` | the batching loop: admission, text cache, grouped UNet calls, completion |
//! | `service` | starting the thread: load, warm up, resume, announce readiness |
//! | `redis_intake` | with a shared Redis queue: reading it into the local queue, acks, heartbeats, reclaim, dead letters |
//! | `shared` | wiring a replica that shares Redis: compute thread, intake, event relay, `RedisQueue` |

pub mod engine;
pub mod queue;
pub mod readiness;
pub mod redis_intake;
pub mod service;
pub mod shared;

pub use engine::{EngineConfig, EngineStats};
pub use queue::{LocalQueue, QueueLimits};
pub use readiness::{readiness_channel, Readiness, ReadinessReceiver, ReadinessSender};
pub use service::{spawn, spawn_with, Resume, WorkerHandle, WorkerSettings};
pub use shared::{SharedQueueConfig, SharedWorker};

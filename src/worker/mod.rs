//! The compute side: a dedicated thread owns the models and advances every
//! running job by one denoising step per UNet call (step-level continuous batching).
//!
//! | file | owns |
//! |---|---|
//! | `readiness` | loading / ready / draining, published to the HTTP side |

pub mod readiness;

pub use readiness::{readiness_channel, Readiness, ReadinessReceiver, ReadinessSender};

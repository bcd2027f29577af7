//! Whether the server can take work: models loading, ready (after one warm-up
//! generation), draining for shutdown, or failed to load. The compute side
//! publishes it on a `watch` channel; `/ready`, `/info` and request admission read it.

use std::sync::Arc;

use tokio::sync::watch;

use crate::pipeline::CascadeInfo;

#[derive(Debug, Clone)]
pub enum Readiness {
    /// Models are loading or warming up.
    Loading,
    /// Serving; the cascade's description for validation and `/info`.
    Ready(Arc<CascadeInfo>),
    /// Shutting down: running jobs finish, no new work is accepted.
    Draining(Arc<CascadeInfo>),
    /// The models could not be loaded (the message is for operators; it names the file).
    Failed(String),
}

impl Readiness {
    /// The cascade, when loaded (ready or draining).
    pub fn cascade(&self) -> Option<&Arc<CascadeInfo>> {
        match self {
            Self::Ready(c) | Self::Draining(c) => Some(c),
            _ => None,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready(_))
    }
}

pub type ReadinessSender = watch::Sender<Readiness>;
pub type ReadinessReceiver = watch::Receiver<Readiness>;

pub fn readiness_channel() -> (ReadinessSender, ReadinessReceiver) {
    watch::channel(Readiness::Loading)
}

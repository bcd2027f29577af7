//! diffusiond: a text-to-image diffusion inference server.
pub mod api;
pub mod diffusion;
pub mod eval;
pub mod jobs;
pub mod metrics;
pub mod nn;
pub mod pipeline;
pub mod server;
pub mod train;
pub mod worker;

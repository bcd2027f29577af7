//! diffusiond: a text-to-image diffusion inference server.
pub mod diffusion;
pub mod jobs;
pub mod nn;
pub mod pipeline;
pub mod worker;

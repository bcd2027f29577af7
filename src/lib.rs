//! diffusiond: a text-to-image diffusion inference server.
pub mod diffusion;
pub mod nn;
pub mod pipeline;

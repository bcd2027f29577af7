//! The `diffusiond` command line: one file per subcommand, `main.rs` stays thin.

mod dataset;
mod env;
mod eval;
mod eval_clip;
mod eval_decoder;
mod eval_prior;
mod generate;
mod info;
mod openapi;
mod schedule;
mod serve;
mod train;
mod train_clip;
mod train_decoder;
mod train_prior;
mod unclip;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "diffusiond", version, about = "Text-to-image diffusion inference server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report libtorch's devices: CUDA availability, GPU count, cuDNN, CPU threads.
    Env(env::EnvArgs),
    /// Print the timesteps a sampler visits and the noise level at each.
    Schedule(schedule::ScheduleArgs),
    /// Generate images from a prompt with a cascade.
    Generate(generate::GenerateArgs),
    /// Describe a cascade: encoder, stages, sizes, parameters, defaults.
    Info(info::InfoArgs),
    /// Train one stage of a cascade (resumes from the run folder's checkpoint).
    Train(train::TrainArgs),
    /// Serve the HTTP API (sync and async generation, jobs, OpenAI-compatible endpoint).
    Serve(serve::ServeArgs),
    /// Print the HTTP API's OpenAPI document (JSON).
    Openapi(openapi::OpenApiArgs),
    /// Preview the synthetic captioned-shapes training data: a grid of samples and their captions.
    Dataset(dataset::DatasetArgs),
    /// Score prompt adherence, GenEval-style: per-category accuracy of a cascade's samples (or of ground-truth renders).
    Eval(eval::EvalArgs),
    /// Train the noised CLIP (GLIDE-style, on x_t and t) on the captioned renders; resumes from the run folder.
    TrainClip(train_clip::TrainClipArgs),
    /// Zero-shot retrieval of a noised CLIP on held-out renders: top-1 accuracy per noise level, both directions.
    EvalClip(eval_clip::EvalClipArgs),
    /// Train DALL-E 2's diffusion prior in a noised CLIP's embedding space; resumes from the run folder.
    TrainPrior(train_prior::TrainPriorArgs),
    /// Score an unCLIP cascade's decoder on held-out renders: retrieval and cosine of what it draws from their CLIP embeddings, vs caption only and unconditional.
    EvalDecoder(eval_decoder::EvalDecoderArgs),
    /// Train DALL-E 2's decoder from the base stage, conditioned on a noised CLIP's image embeddings; resumes from the run folder.
    TrainDecoder(train_decoder::TrainDecoderArgs),
    /// Score a trained prior on held-out renders: image retrieval and cosine of its samples vs the text embedding alone.
    EvalPrior(eval_prior::EvalPriorArgs),
}

impl Cli {
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Env(args) => env::run(args),
            Command::Schedule(args) => schedule::run(args),
            Command::Generate(args) => generate::run(args),
            Command::Info(args) => info::run(args),
            Command::Serve(args) => serve::run(args),
            Command::Train(args) => train::run(args),
            Command::Openapi(args) => openapi::run(args),
            Command::Dataset(args) => dataset::run(args),
            Command::Eval(args) => eval::run(args),
            Command::TrainClip(args) => train_clip::run(args),
            Command::EvalClip(args) => eval_clip::run(args),
            Command::TrainPrior(args) => train_prior::run(args),
            Command::EvalPrior(args) => eval_prior::run(args),
            Command::TrainDecoder(args) => train_decoder::run(args),
            Command::EvalDecoder(args) => eval_decoder::run(args),
        }
    }
}

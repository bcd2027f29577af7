//! `diffusiond openapi`: prints (or writes) the HTTP API's OpenAPI document —
//! the same one the server serves at `/openapi.json` and the repository keeps
//! in `openapi/openapi.json`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct OpenApiArgs {
    /// Write to this file instead of standard output.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub fn run(args: OpenApiArgs) -> anyhow::Result<()> {
    let text = diffusiond::api::openapi::openapi_json();
    match args.output {
        Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display())),
        None => {
            use std::io::Write;
            std::io::stdout().write_all(text.as_bytes()).context("writing to standard output")
        }
    }
}

//! `diffusiond info`: what a cascade holds — encoder, stages, sizes, parameter
//! counts, schedulers and default settings — as text or JSON.

use clap::Args;
use diffusiond::pipeline::Cascade;
use serde_json::{json, Value};

use super::generate::ModelArgs;

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The cascade described as JSON (also what the text form prints).
pub fn describe(cascade: &Cascade) -> Value {
    let enc = &cascade.encoder;
    let stages: Vec<Value> = cascade
        .stages
        .iter()
        .map(|s| {
            let sched = s.scheduler.config();
            json!({
                "name": s.name,
                "kind": s.kind.name(),
                "size": s.size_label(),
                "parameters": s.parameter_count(),
                "scheduler": {
                    "class": sched.class_name,
                    "beta_schedule": sched.beta_schedule.map(|b| format!("{b:?}")),
                    "variance_type": sched.variance_type.map(|v| format!("{v:?}")),
                    "prediction_type": sched.prediction_type.map(|p| format!("{p:?}")),
                    "thresholding": sched.thresholding,
                    "train_timesteps": s.scheduler.schedule().len(),
                },
                "defaults": {
                    "sampler": s.defaults.sampler.name(),
                    "steps": s.defaults.steps,
                    "guidance_scale": s.defaults.guidance_scale,
                    "eta": s.defaults.eta,
                    "noise_level": s.defaults.noise_level,
                },
            })
        })
        .collect();
    json!({
        "name": cascade.manifest.name,
        "description": cascade.manifest.description,
        "directory": cascade.dir.display().to_string(),
        "device": format!("{:?}", cascade.device()),
        "precision": format!("{:?}", cascade.kind()),
        "text_encoder": {
            "directory": enc.dir().display().to_string(),
            "type": match enc.config() { diffusiond::nn::text::EncoderConfig::Bert(_) => "bert", diffusiond::nn::text::EncoderConfig::T5(_) => "t5", diffusiond::nn::text::EncoderConfig::Clip(_) => "clip" },
            "hidden_size": enc.hidden_size(),
            "max_length": enc.max_length(),
        },
        "stages": stages,
    })
}

pub fn run(args: InfoArgs) -> anyhow::Result<()> {
    let cascade = args.model.load()?;
    let info = describe(&cascade);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("{} ({})", info["name"].as_str().unwrap_or(""), info["directory"].as_str().unwrap_or(""));
    if let Some(d) = info["description"].as_str() {
        println!("  {d}");
    }
    println!("device {}, precision {}", info["device"].as_str().unwrap_or(""), info["precision"].as_str().unwrap_or(""));
    let enc = &info["text_encoder"];
    println!("text encoder: {} ({}-wide, {} tokens) from {}", enc["type"], enc["hidden_size"], enc["max_length"], enc["directory"].as_str().unwrap_or(""));
    for (i, s) in info["stages"].as_array().into_iter().flatten().enumerate() {
        let d = &s["defaults"];
        let noise = d["noise_level"].as_i64().map(|l| format!(", noise level {l}")).unwrap_or_default();
        println!(
            "stage {i} `{}`: {} {}, {:.2} M parameters; {} {} steps, guidance {}{noise}; scheduler {} {} {}",
            s["name"].as_str().unwrap_or(""),
            s["kind"].as_str().unwrap_or(""),
            s["size"].as_str().unwrap_or(""),
            s["parameters"].as_f64().unwrap_or(0.0) / 1e6,
            d["sampler"].as_str().unwrap_or(""),
            d["steps"],
            d["guidance_scale"],
            s["scheduler"]["beta_schedule"].as_str().unwrap_or("-"),
            s["scheduler"]["variance_type"].as_str().unwrap_or("-"),
            s["scheduler"]["prediction_type"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

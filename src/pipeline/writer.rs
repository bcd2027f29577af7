//! Writing stage folders and cascades in the layout `Cascade::load` reads and
//! diffusers' `IFPipeline` / `IFSuperResolutionPipeline.from_pretrained` load:
//! `model_index.json`, `unet/`, `scheduler/` and, for super-resolution stages,
//! `image_noising_scheduler/`. Used by training and by tests that build
//! random cascades.

use std::path::Path;

use serde_json::json;
use tch::Kind;

use super::error::{PipelineError, Result};
use super::stage::StageKind;
use crate::diffusion::SchedulerConfig;
use crate::nn::unet::config::DIFFUSERS_VERSION;
use crate::nn::unet::LoadedUNet;

fn write_json(file: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).map_err(|e| PipelineError::model(parent, e.to_string()))?;
    }
    let text = serde_json::to_string_pretty(value).expect("JSON serialises") + "\n";
    std::fs::write(file, text).map_err(|e| PipelineError::model(file, e.to_string()))
}

/// The `scheduler_config.json` of `config`, with the class name diffusers needs.
fn scheduler_json(config: &SchedulerConfig) -> serde_json::Value {
    let mut value = serde_json::to_value(config).expect("scheduler config serialises");
    if let serde_json::Value::Object(map) = &mut value {
        map.entry("_class_name").or_insert_with(|| "DDPMScheduler".into());
        map.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
    }
    value
}

/// One stage: what it is, its network and its schedulers.
pub struct StageFiles<'a> {
    pub kind: StageKind,
    pub unet: &'a LoadedUNet,
    pub scheduler: &'a SchedulerConfig,
    /// Required for super-resolution stages.
    pub noising: Option<&'a SchedulerConfig>,
    /// The kind the weights are stored in (f16 for shipped models).
    pub weights: Kind,
}

/// Writes a stage folder at `dir`.
pub fn write_stage(dir: &Path, stage: &StageFiles<'_>) -> Result<()> {
    stage.unet.save(&dir.join("unet"), stage.weights)?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler_json(stage.scheduler))?;
    let scheduler_class = |c: &SchedulerConfig| c.class_name.clone().unwrap_or_else(|| "DDPMScheduler".into());
    let mut index = json!({
        "_class_name": "IFPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler_class(stage.scheduler)],
        "text_encoder": [null, null],
        "tokenizer": [null, null],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "watermarker": [null, null],
    });
    if stage.kind == StageKind::SuperResolution {
        let noising = stage
            .noising
            .ok_or_else(|| PipelineError::model(dir, "a super-resolution stage needs its image-noising scheduler"))?;
        write_json(&dir.join("image_noising_scheduler/scheduler_config.json"), &scheduler_json(noising))?;
        index["_class_name"] = "IFSuperResolutionPipeline".into();
        index["image_noising_scheduler"] = json!(["diffusers", scheduler_class(noising)]);
    }
    write_json(&dir.join("model_index.json"), &index)
}

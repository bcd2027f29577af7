//! The diffusers IF-pipeline reference run on the fixture cascade
//! (`tests/fixtures/cascade`, from scripts/fixtures_pipeline.py), and replaying it.

use std::collections::HashMap;
use std::ops::ControlFlow;

use diffusiond::diffusion::{BatchNoise, NoiseSource, ReplayNoise};
use diffusiond::pipeline::{Cascade, GenerationRequest, RequestSpec};
use tch::Tensor;

pub struct Reference {
    pub prompt: String,
    pub n: i64,
    /// Every recorded draw, in order; the first `split` belong to stage I.
    pub draws: Vec<Tensor>,
    pub split: usize,
    pub tensors: HashMap<String, Tensor>,
}

pub fn reference() -> Reference {
    let meta = super::load_json("cascade/reference.json");
    let tensors = super::load_tensors("cascade/reference.safetensors");
    let draws = (0..meta["draws"].as_u64().unwrap()).map(|i| tensors[&format!("draw.{i:03}")].shallow_clone()).collect();
    Reference {
        prompt: meta["prompt"].as_str().unwrap().to_owned(),
        n: meta["n"].as_i64().unwrap(),
        draws,
        split: meta["stage1_draws"].as_u64().unwrap() as usize,
        tensors,
    }
}

/// Image b replays element b of each draw.
pub fn replay(draws: &[Tensor], n: i64) -> BatchNoise {
    BatchNoise::new((0..n).map(|b| Box::new(ReplayNoise::new(draws.iter().map(|d| d.get(b)))) as Box<dyn NoiseSource>).collect())
}

impl Reference {
    /// The request diffusers ran (the cascade's defaults for the prompt and n).
    pub fn request(&self, cascade: &Cascade) -> GenerationRequest {
        cascade.plan(&RequestSpec { prompt: self.prompt.clone(), n: self.n as usize, seed: Some(0), ..Default::default() }).unwrap()
    }

    /// Runs stage `stage` of the reference request with its recorded noise.
    pub fn run_stage(&self, cascade: &Cascade, stage: usize, low_res: Option<&Tensor>) -> Tensor {
        let request = self.request(cascade);
        let text = cascade.request_text(&request).unwrap();
        let draws = if stage == 0 { &self.draws[..self.split] } else { &self.draws[self.split..] };
        let mut job = cascade.start_stage_with(&request, stage, &text, low_res, replay(draws, self.n)).unwrap();
        cascade.run_job(&cascade.stages[stage], &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();
        job.sample().to_device(tch::Device::Cpu)
    }
}

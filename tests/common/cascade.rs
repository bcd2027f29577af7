//! The diffusers IF-pipeline reference run on the fixture cascade
//! (`tests/fixtures/cascade`, from scripts/fixtures_pipeline.py), and replaying it.

use std::collections::HashMap;
use std::ops::ControlFlow;

use diffusiond::diffusion::{BatchNoise, NoiseSource, ReplayNoise};
use diffusiond::diffusion::SamplerKind;
use diffusiond::eval::batch::generate_many;
use diffusiond::pipeline::{Cascade, GeneratedImage, GenerationRequest, RequestSpec};
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

/// `n` images of `prompt` from `seed` with stochastic DDIM (η 0.5), so that
/// every noise draw of a step is exercised: the guidance tests' request.
pub fn ddim_spec(prompt: &str, n: usize, seed: u64) -> RequestSpec {
    RequestSpec { prompt: prompt.into(), n, seed: Some(seed), sampler: Some(SamplerKind::Ddim), eta: Some(0.5), ..Default::default() }
}

/// Plans and generates `spec` on `cascade`, to the end.
pub fn generate(cascade: &Cascade, spec: &RequestSpec) -> Vec<GeneratedImage> {
    cascade.generate(&cascade.plan(spec).unwrap(), &mut |_| ControlFlow::Continue(())).unwrap()
}

/// Each image's RGB bytes.
pub fn pixels(images: &[GeneratedImage]) -> Vec<&[u8]> {
    images.iter().map(|g| g.image.as_raw().as_slice()).collect()
}

/// A guided request of two images (`guided(n, seed)` makes it) batched with an
/// unguided one, every job of a stage in one UNet call as the worker batches:
/// each guided image has the bits it has alone (image 1 of seed 20 is seed 21
/// alone) and in its own request, and the unguided neighbour is untouched.
pub fn assert_guided_batch_invariant(cascade: &Cascade, guided: impl Fn(usize, u64) -> RequestSpec) {
    let plan = cascade.plan(&guided(2, 20)).unwrap();
    let unguided = cascade.plan(&RequestSpec { guidance_scale: Some(2.0), ..ddim_spec("two green stars", 2, 40) }).unwrap();
    let batched = generate_many(cascade, &[unguided.clone(), plan.clone()], 64, &mut |_| {}).unwrap();
    for (i, seed) in [20u64, 21].into_iter().enumerate() {
        let alone = generate(cascade, &guided(1, seed)).remove(0);
        assert_eq!(batched[1][i].image.as_raw(), alone.image.as_raw(), "image {i} batched with an unguided job");
    }
    let own = cascade.generate(&plan, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(pixels(&own), pixels(&batched[1]));
    let plain = cascade.generate(&unguided, &mut |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(pixels(&plain), pixels(&batched[0]), "the unguided neighbour is untouched");
}

//! Many requests through a cascade at once: every request's rows of one stage
//! go through the UNet together, step by step, as the server's batching worker
//! does (see `worker::engine`), but synchronously and with no queue.
//!
//! A benchmark asks for hundreds of short requests; one at a time, each UNet
//! call would carry a handful of images. Batching never changes an image: the
//! rows of a call are computed independently and each image draws its noise
//! from its own seeded stream, so the result equals `Cascade::generate` run
//! request by request.

use tch::Tensor;

use crate::pipeline::denoise::{ModelRows, StageJob};
use crate::pipeline::stage::Stage;
use crate::pipeline::{Cascade, GeneratedImage, GenerationRequest, PipelineError, Result};

/// Where a batch is, after each UNet call.
#[derive(Debug, Clone, Copy)]
pub struct BatchProgress {
    /// Index into the requests' stages.
    pub stage: usize,
    pub stages: usize,
    /// Steps done by the slowest job of the group in this call, and its total.
    pub step: usize,
    pub total_steps: usize,
}

/// Runs `requests` to the end, at most `max_rows` UNet rows per call (a
/// guided image takes two); the images come back per request, in order.
pub fn generate_many(
    cascade: &Cascade,
    requests: &[GenerationRequest],
    max_rows: usize,
    observer: &mut dyn FnMut(&BatchProgress),
) -> Result<Vec<Vec<GeneratedImage>>> {
    let texts = requests.iter().map(|r| cascade.request_text(r)).collect::<Result<Vec<_>>>()?;
    let stages = requests.iter().map(|r| r.stages.len()).max().unwrap_or(0);
    let mut images: Vec<Option<Tensor>> = requests.iter().map(|_| None).collect();
    for k in 0..stages {
        // Requests with k stages or fewer are done; the rest run stage k.
        let running: Vec<usize> = (0..requests.len()).filter(|&i| k < requests[i].stages.len()).collect();
        for group in pack(requests, &running, k, max_rows) {
            let mut jobs = Vec::with_capacity(group.len());
            for &i in &group {
                jobs.push(cascade.start_stage(&requests[i], k, &texts[i], images[i].as_ref())?);
            }
            let stage = &cascade.stages[requests[group[0]].stages[k].index];
            while jobs.iter().any(|j| !j.is_done()) {
                step(cascade, stage, &mut jobs)?;
                let slowest = jobs.iter().min_by_key(|j| j.step_index()).expect("a non-empty group");
                observer(&BatchProgress { stage: k, stages, step: slowest.step_index(), total_steps: slowest.total_steps() });
            }
            for (&i, job) in group.iter().zip(&jobs) {
                images[i] = Some(job.sample().shallow_clone());
            }
        }
    }
    requests
        .iter()
        .zip(images)
        .map(|(r, img)| cascade.finish(r, &img.ok_or_else(|| PipelineError::invalid("stages", "a request runs at least one stage"))?))
        .collect()
}

/// Splits the running requests into groups of at most `max_rows` rows at stage
/// `k` (a request larger than that runs alone), each group on one UNet.
fn pack(requests: &[GenerationRequest], running: &[usize], k: usize, max_rows: usize) -> Vec<Vec<usize>> {
    let rows = |i: usize| {
        let plan = &requests[i].stages[k];
        requests[i].n * if plan.guidance_scale > 1.0 { 2 } else { 1 }
    };
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for &i in running {
        let same_stage = groups.last().is_some_and(|g| requests[g[0]].stages[k].index == requests[i].stages[k].index);
        if !same_stage || used + rows(i) > max_rows.max(1) {
            groups.push(Vec::new());
            used = 0;
        }
        groups.last_mut().expect("just pushed").push(i);
        used += rows(i);
    }
    groups
}

/// One UNet call over every unfinished job's rows, then one sampler step each.
pub(crate) fn step(cascade: &Cascade, stage: &Stage, jobs: &mut [StageJob]) -> Result<()> {
    let live: Vec<usize> = (0..jobs.len()).filter(|&j| !jobs[j].is_done()).collect();
    let rows = live.iter().map(|&j| jobs[j].model_input()).collect::<Result<Vec<ModelRows>>>()?;
    let cat = |f: &dyn Fn(&ModelRows) -> &Tensor| Tensor::cat(&rows.iter().map(f).collect::<Vec<_>>(), 0);
    let labels: Option<Vec<&Tensor>> = rows.iter().map(|r| r.class_labels.as_ref()).collect();
    let all = ModelRows {
        sample: cat(&|r| &r.sample),
        timesteps: cat(&|r| &r.timesteps),
        text: cat(&|r| &r.text),
        class_labels: labels.map(|l| Tensor::cat(&l, 0)),
    };
    let out = cascade.forward(stage, &all)?;
    let mut offset = 0;
    for &j in &live {
        let n = jobs[j].rows();
        jobs[j].advance(&out.narrow(0, offset, n), stage, cascade.clip())?;
        offset += n;
    }
    Ok(())
}

//! A cascade that is DALL-E 2's unCLIP (a `prior` stage, then a `decoder`,
//! then super-resolution) on tiny random weights: the prior stage's batched
//! step machine samples what the reference prior loop (`sample_prior`, whose
//! parity with diffusers `tests/unclip_parity.rs` checks) samples; the
//! decoder reads the prior's embedding; unCLIP jobs batch with each other in
//! the worker and keep the bits they have alone; image variations draw from
//! a source image's CLIP embedding in place of the prior's; requests an
//! unCLIP cascade cannot run are refused naming the field; the server serves
//! it end to end, the OpenAI variations route included.

mod common;

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::cascade::{assert_guided_batch_invariant, ddim_spec, generate, pixels};
use common::server::start;
use common::unclip::unclip_cascade;
use common::worker::{assert_same_as_alone, run_jobs, start_worker};
use diffusiond::api::ApiConfig;
use diffusiond::diffusion::{BatchNoise, SamplerKind};
use diffusiond::jobs::embedded::EmbeddedStore;
use diffusiond::jobs::JobStore;
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::stage::Network;
use diffusiond::pipeline::unclip::{sample_prior, PriorCondition};
use diffusiond::pipeline::{Cascade, LoadOptions, Manifest, NoiseMix, Picture, RequestSpec, Source, SourceSpec, StageOverride};
use diffusiond::server::ServerConfig;
use diffusiond::worker::{EngineConfig, QueueLimits};
use serde_json::{json, Value};
use tch::Tensor;

const CPU: LoadOptions = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };

fn spec(prompt: &str, n: usize, seed: u64) -> RequestSpec {
    RequestSpec { prompt: prompt.into(), n, seed: Some(seed), ..Default::default() }
}

/// A `w`x`h` picture of smooth colour ramps that `seed` shifts.
fn picture(w: u32, h: u32, seed: u32) -> Picture {
    let image = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) * 40 + seed * 97) as u8]));
    Picture::from_image(&image::DynamicImage::ImageRgb8(image))
}

/// An image variation of `image`: the decoder and what follows, from its CLIP embedding.
fn variation(prompt: &str, image: Picture, n: usize, seed: u64) -> RequestSpec {
    RequestSpec { source: Some(SourceSpec::ImageEmbedding { image }), ..spec(prompt, n, seed) }
}

#[test]
fn the_prior_stage_samples_what_the_reference_prior_loop_samples() {
    let dir = unclip_cascade("prior", 1);
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    let plan = cascade.plan(&RequestSpec { negative_prompt: Some("a green star".into()), ..spec("a red circle", 2, 5) }).unwrap();
    assert_eq!(plan.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["prior", "decoder", "sr"]);
    let text = cascade.request_text(&plan).unwrap();
    let mut job = cascade.start_stage(&plan, 0, &text, None).unwrap();
    assert_eq!(job.rows(), 4, "guided: [uncond; cond] rows");
    let prior_stage = &cascade.stages[0];
    cascade.run_job(prior_stage, &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();
    assert!(job.preview().is_none(), "an embedding has no preview");
    let Network::Prior(prior) = &prior_stage.network else { panic!("stage 0 is a prior") };
    let ours = prior.model.post_process_latents(job.sample());

    // The reference: the same captions' CLIP embeddings, the same noise streams.
    let clip = cascade.clip().unwrap();
    let (embeds, _) = clip.text_conditioning(&cascade.encoder, &["a red circle", "a green star"]).unwrap();
    let rows = Tensor::cat(&[embeds.narrow(0, 1, 1).repeat([2, 1]), embeds.narrow(0, 0, 1).repeat([2, 1])], 0);
    let mut noise = BatchNoise::seeded(&[plan.stream_seed(0, 0), plan.stream_seed(1, 0)]);
    let condition = PriorCondition { proj_embedding: &rows, hidden: None, mask: None, guided: true };
    let reference = sample_prior(&prior.model, &prior_stage.scheduler, &condition, 5, 4.0, &mut noise).unwrap();
    let diff = (&ours - &reference).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "prior stage vs sample_prior: max |Δ| {diff}");
    assert!(ours.std(true).double_value(&[]) > 0.01, "a sampled embedding, not a constant");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_decoder_draws_from_the_prior_embedding_and_the_cascade_makes_images() {
    let dir = unclip_cascade("decoder", 2);
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    let plan = cascade.plan(&spec("two blue squares", 1, 9)).unwrap();
    let text = cascade.request_text(&plan).unwrap();
    let decode = |latents: &Tensor| {
        let mut job = cascade.start_stage(&plan, 1, &text, Some(latents)).unwrap();
        cascade.run_job(&cascade.stages[1], &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();
        job.sample().shallow_clone()
    };
    let a = Tensor::randn([1, common::unclip::WIDTH], (tch::Kind::Float, tch::Device::Cpu));
    let b = Tensor::randn([1, common::unclip::WIDTH], (tch::Kind::Float, tch::Device::Cpu));
    let (from_a, again, from_b) = (decode(&a), decode(&a), decode(&b));
    assert_eq!(from_a.size(), [1, 3, 16, 16]);
    assert!(from_a.equal(&again), "the same embedding and noise give the same image");
    assert!((&from_a - &from_b).abs().max().double_value(&[]) > 1e-3, "the decoder reads the embedding");

    // The whole cascade: prior, decoder, super-resolution; the record names every stage.
    let images = generate(&cascade, &spec("two blue squares", 2, 9));
    assert_eq!(images.len(), 2);
    assert_eq!(images[0].image.dimensions(), (32, 32));
    let stages: Vec<&str> = images[0].record.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(stages, ["prior", "decoder", "sr"]);
    assert_eq!(images[0].record.stages[0].size, format!("{}-d CLIP embedding", common::unclip::WIDTH));
    assert_ne!(pixels(&images)[0], pixels(&images)[1], "two seeds, two images");
    // Seeded: the same request gives the same bits.
    assert_eq!(pixels(&images), pixels(&generate(&cascade, &spec("two blue squares", 2, 9))));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unclip_jobs_batch_and_keep_the_bits_they_have_alone() {
    let dir = unclip_cascade("batch", 3);
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    // Prior steps, decoder steps and SR steps each in one call with an unguided neighbour.
    assert_guided_batch_invariant(&cascade, |n, seed| RequestSpec { guidance_scale: Some(4.0), ..ddim_spec("a red circle", n, seed) });

    // The worker: requests of several settings at once, each equal to itself alone.
    let unguided = StageOverride { guidance_scale: Some(1.0), steps: Some(3), ..Default::default() };
    let specs = [
        spec("a red circle", 2, 1),
        RequestSpec { stage_overrides: vec![(0, unguided.clone())], ..spec("two yellow stars", 1, 2) },
        RequestSpec { negative_prompt: Some("blue".into()), guidance_scale: Some(1.0), ..spec("a green square", 1, 3) },
        RequestSpec { stages: Some(2), sampler: Some(SamplerKind::Ddim), ..spec("a purple triangle", 3, 4) },
        variation("", picture(32, 32, 1), 2, 5),
        RequestSpec { layout_guidance_scale: Some(300.0), ..spec("a red circle above a blue square", 1, 6) },
        RequestSpec { noise: NoiseMix::Interpolation { seed: 9, prompt: Some("a blue square".into()) }, ..spec("a red circle", 3, 7) },
    ];
    let requests: Vec<_> = specs.iter().map(|s| cascade.plan(s).unwrap()).collect();
    let alone: Vec<_> = requests.iter().map(|r| cascade.generate(r, &mut |_| ControlFlow::Continue(())).unwrap()).collect();
    let sequential: usize = requests.iter().map(|r| cascade.total_steps(r)).sum();
    let data = std::env::temp_dir().join(format!("diffusiond-unclip-worker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let store: Arc<dyn JobStore> = Arc::new(EmbeddedStore::open(&data).unwrap());
    let worker = start_worker(&dir, store.clone(), true);
    let warm_up = worker.stats.unet_calls.load(Ordering::Relaxed);
    let records = run_jobs(&worker, store.as_ref(), &requests, Duration::from_secs(120));
    assert_same_as_alone(store.as_ref(), &records, &alone);
    let calls = worker.stats.unet_calls.load(Ordering::Relaxed) - warm_up;
    println!("{} unCLIP requests: {calls} batched calls vs {sequential} one at a time", requests.len());
    // Perfect packing would take as many calls as the longest prior, decoder
    // and SR runs (19); a variation skips its prior, and jobs arriving one by
    // one join running batches at the next step.
    assert!(calls * 3 < sequential as u64 * 2, "{calls} calls is not far fewer than {sequential}");
    worker.queue.close();
    worker.thread.join().unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn what_an_unclip_cascade_cannot_run_is_refused_naming_the_field() {
    let dir = unclip_cascade("refusals", 4);
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    let refused = |spec: RequestSpec| cascade.plan(&spec).unwrap_err().to_string();
    let base = spec("a red circle", 1, 1);
    for (spec, field) in [
        (RequestSpec { stages: Some(1), ..base.clone() }, "stages"),
        (RequestSpec { source: Some(SourceSpec::Image { image: picture(16, 16, 0), strength: None }), ..base.clone() }, "source"),
        (RequestSpec { noise: NoiseMix::Variation { seed: 2, strength: 1.5 }, ..base.clone() }, "variation.strength"),
        (RequestSpec { n: 1, noise: NoiseMix::Interpolation { seed: 2, prompt: None }, ..base.clone() }, "n"),
        (RequestSpec { clip_guidance_scale: Some(10.0), ..base.clone() }, "clip_guidance_scale"),
        (RequestSpec { classifier_guidance_scale: Some(3.0), ..base.clone() }, "classifier_guidance_scale"),
        (RequestSpec { stage_overrides: vec![(0, StageOverride { strength: Some(0.5), ..Default::default() })], ..base.clone() }, "stages[0].strength"),
        (RequestSpec { stage_overrides: vec![(1, StageOverride { strength: Some(0.5), ..Default::default() })], ..base.clone() }, "stages[1].strength"),
        (RequestSpec { stage_overrides: vec![(0, StageOverride { noise_level: Some(3), ..Default::default() })], ..base.clone() }, "stages[0].noise_level"),
        (RequestSpec { stage_overrides: vec![(0, StageOverride { steps: Some(0), ..Default::default() })], ..base.clone() }, "stages[0].steps"),
        (RequestSpec { stages: Some(1), ..variation("", picture(32, 32, 0), 1, 1) }, "stages"),
        (variation("", picture(32, 16, 0), 1, 1), "source.image"),
    ] {
        let err = refused(spec);
        assert!(err.contains(field), "{field}: {err}");
    }
    // The request-wide settings are the decoder's (it draws the image); the prior keeps its own.
    let plan = cascade.plan(&RequestSpec { steps: Some(3), guidance_scale: Some(2.0), sampler: Some(SamplerKind::Ddim), eta: Some(0.5), ..base.clone() }).unwrap();
    assert_eq!((plan.stages[0].sampler.kind, plan.stages[0].sampler.steps, plan.stages[0].guidance_scale), (SamplerKind::Ddpm, 5, 4.0));
    assert_eq!((plan.stages[1].sampler.kind, plan.stages[1].sampler.steps, plan.stages[1].guidance_scale, plan.stages[1].sampler.eta), (SamplerKind::Ddim, 3, 2.0, 0.5));
    let prior = StageOverride { steps: Some(2), guidance_scale: Some(1.0), ..Default::default() };
    let plan = cascade.plan(&RequestSpec { stage_overrides: vec![(0, prior)], ..base }).unwrap();
    assert_eq!((plan.stages[0].sampler.steps, plan.stages[0].guidance_scale), (2, 1.0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_variations_decode_the_source_image_clip_embedding_in_place_of_the_prior() {
    let dir = unclip_cascade("variations", 8);
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    // Two decoder steps: the embedding's round trip through the prior's
    // standardisation rounds, and random weights amplify that with every step.
    let two = || vec![(1, StageOverride { steps: Some(2), ..Default::default() })];
    let request = cascade.plan(&RequestSpec { stage_overrides: two(), ..variation("a red circle", picture(32, 32, 0), 2, 6) }).unwrap();
    assert_eq!(request.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["decoder", "sr"], "the prior does not run");
    let text = cascade.request_text(&request).unwrap();
    let mut job = cascade.start_stage(&request, 0, &text, None).unwrap();
    cascade.run_job(&cascade.stages[1], &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();

    // The same as decoding that embedding as if the prior had sampled it,
    // with the same caption and noise (the route `eval-decoder` takes).
    let Some(Source::ImageEmbedding { image }) = &request.source else { panic!("planned as an image embedding") };
    assert_eq!(image.dimensions(), (16, 16), "kept at the decoder's size");
    let clip = cascade.clip().unwrap();
    let side = clip.image_size();
    let embedding = clip.image_embeds(&image.tensor((side, side), tch::Device::Cpu).unwrap()).unwrap();
    let Network::Prior(prior) = &cascade.stages[0].network else { panic!("stage 0 is a prior") };
    let plain = cascade.plan(&RequestSpec { stage_overrides: two(), ..spec("a red circle", 2, 6) }).unwrap();
    let plain_text = cascade.request_text(&plain).unwrap();
    let sample = job.sample();
    let decode = |embedding: &Tensor| {
        let mut job = cascade.start_stage(&plain, 1, &plain_text, Some(&prior.to_latents(&embedding.repeat([2, 1])))).unwrap();
        cascade.run_job(&cascade.stages[1], &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();
        (job.sample() - sample).abs().max().double_value(&[])
    };
    let diff = decode(&embedding);
    assert!(diff < 1e-4, "variation vs decoding the embedding: max |Δ| {diff}");
    let other = picture(16, 16, 5).tensor((side, side), tch::Device::Cpu).unwrap();
    let diff = decode(&clip.image_embeds(&other).unwrap());
    assert!(diff > 1e-2, "another picture's embedding draws other images: max |Δ| {diff}");

    // Whole requests: seeded, the picture read, the empty prompt allowed.
    let images = generate(&cascade, &variation("", picture(32, 32, 0), 2, 6));
    assert_eq!(images[0].image.dimensions(), (32, 32));
    assert_eq!(images[0].record.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["decoder", "sr"]);
    assert_eq!(pixels(&images), pixels(&generate(&cascade, &variation("", picture(32, 32, 0), 2, 6))));
    assert_ne!(pixels(&images), pixels(&generate(&cascade, &variation("", picture(32, 32, 3), 2, 6))), "another picture, other images");
    // Only an unCLIP cascade has an embedding to draw from.
    let plain = Cascade::load(&common::fixture_dir().join("cascade"), &CPU).unwrap();
    let err = plain.plan(&variation("a red circle", picture(32, 32, 0), 1, 1)).unwrap_err().to_string();
    assert!(err.contains("source") && err.contains("unCLIP"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn layout_guidance_guides_the_decoder_past_its_image_tokens() {
    let dir = unclip_cascade("layout", 9);
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    let prompt = "a red circle above a blue square";
    let guided = |scale: f32, spec: RequestSpec| RequestSpec { layout_guidance_scale: Some(scale), ..spec };
    let plan = cascade.plan(&guided(300.0, spec(prompt, 2, 3))).unwrap();
    let scales: Vec<f32> = plan.stages.iter().map(|s| s.layout_guidance_scale).collect();
    assert_eq!(scales, [0.0, 300.0, 0.0], "the decoder draws the image, so it is the stage guided");
    // The decoder's context is 4 image tokens, then the prompt's: the guide
    // reads the prompt's words there (a misplaced mark would name an image token).
    let text = cascade.request_text(&plan).unwrap();
    let Some(Network::Prior(prior)) = cascade.stages.first().map(|s| &s.network) else { panic!("stage 0 is a prior") };
    let latents = prior.to_latents(&Tensor::randn([2, common::unclip::WIDTH], (tch::Kind::Float, tch::Device::Cpu)));
    let decode = |plan: &diffusiond::pipeline::GenerationRequest| {
        let mut job = cascade.start_stage(plan, 1, &text, Some(&latents)).unwrap();
        cascade.run_job(&cascade.stages[1], &mut job, &mut |_, _| ControlFlow::Continue(())).unwrap();
        job.sample().shallow_clone()
    };
    let unguided = cascade.plan(&guided(0.0, spec(prompt, 2, 3))).unwrap();
    let moved = (decode(&plan) - decode(&unguided)).abs().max().double_value(&[]);
    assert!(moved > 1e-3, "layout guidance moves the decoder's sample: max |Δ| {moved}");
    // Whole requests, variations included, and a prompt without a layout is planned unguided.
    let images = generate(&cascade, &guided(300.0, spec(prompt, 1, 3)));
    assert_eq!(images[0].image.dimensions(), (32, 32));
    let variation_plan = cascade.plan(&guided(300.0, variation(prompt, picture(32, 32, 0), 1, 3))).unwrap();
    assert_eq!(variation_plan.stages[0].layout_guidance_scale, 300.0);
    assert_eq!(cascade.plan(&guided(300.0, spec("red circles", 1, 3))).unwrap().stages[1].layout_guidance_scale, 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unclip_variations_and_interpolations_end_on_the_seeds_they_name() {
    let dir = unclip_cascade("mix", 10);
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    // Deterministic prior and decoder: the image is a function of both noises and the prompt.
    let ddim = StageOverride { sampler: Some(SamplerKind::Ddim), eta: Some(0.0), ..Default::default() };
    let base = RequestSpec { stages: Some(2), stage_overrides: vec![(0, ddim.clone()), (1, ddim)], ..spec("a red circle", 1, 3) };
    let image = |spec: RequestSpec| generate(&cascade, &spec).into_iter().map(|g| g.image).collect::<Vec<_>>();
    let plain = |seed: u64, prompt: &str| image(RequestSpec { seed: Some(seed), prompt: prompt.into(), ..base.clone() }).remove(0);
    let vary = |strength: f64| image(RequestSpec { noise: NoiseMix::Variation { seed: 50, strength }, ..base.clone() }).remove(0);
    assert_eq!(vary(0.0), plain(3, "a red circle"));
    assert_eq!(vary(1.0), plain(50, "a red circle"), "the prior's and the decoder's noise both move to the seed's");
    let halfway = vary(0.5);
    assert!(halfway != plain(3, "a red circle") && halfway != plain(50, "a red circle"));

    let frames = image(RequestSpec { n: 4, noise: NoiseMix::Interpolation { seed: 60, prompt: Some("two green stars".into()) }, ..base.clone() });
    assert_eq!(frames[0], plain(3, "a red circle"));
    assert_eq!(frames[3], plain(60, "two green stars"), "the caption's CLIP embedding and tokens end on the other prompt's");
    assert!(frames[1] != frames[0] && frames[2] != frames[3]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn manifests_that_misplace_or_misread_unclip_stages_are_refused() {
    let dir = unclip_cascade("manifests", 5);
    let good = Manifest::from_dir(&dir).unwrap();
    let load_err = |m: &Manifest| {
        m.write(&dir).unwrap();
        Cascade::load(&dir, &CPU).unwrap_err().to_string()
    };
    let mut m = good.clone();
    m.clip = None;
    assert!(load_err(&m).contains("noised CLIP"), "{}", load_err(&m));
    let mut m = good.clone();
    m.stages.swap(0, 1);
    assert!(load_err(&m).contains("first stage"), "{}", load_err(&m));
    let mut m = good.clone();
    m.stages.remove(1);
    assert!(load_err(&m).contains("decoder"), "{}", load_err(&m));
    let mut m = good.clone();
    m.stages[1].kind = None;
    let err = load_err(&m);
    assert!(err.contains("unet") || err.contains("decoder"), "{err}");
    good.write(&dir).unwrap();
    assert!(Cascade::load(&dir, &CPU).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_serves_an_unclip_cascade() {
    let dir = unclip_cascade("server", 6);
    let data_dir = std::env::temp_dir().join(format!("diffusiond-unclip-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let config = ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        model_dir: dir.clone(),
        data_dir: data_dir.clone(),
        store: None,
        shared_queue: Default::default(),
        load: CPU,
        engine: EngineConfig::default(),
        limits: QueueLimits { max_waiting_jobs: 16, retry_after_secs: 2 },
        api: ApiConfig::default(),
        warmup: true,
        drain_timeout: Duration::from_secs(30),
        retention: Duration::from_secs(3600),
    };
    let (server, base) = start(config).await;
    let client = reqwest::Client::new();
    let info: Value = client.get(format!("{base}/info")).send().await.unwrap().json().await.unwrap();
    let kinds: Vec<&str> = info["stages"].as_array().unwrap().iter().map(|s| s["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["prior", "decoder", "super_resolution"]);
    assert_eq!(info["limits"]["sizes"], json!(["16x16", "32x32"]), "no request stops at the prior");
    let body = json!({"prompt": "a red circle", "seed": 3, "size": "16x16", "stage_overrides": [{"stage": 0, "steps": 3}]});
    let png = client.post(format!("{base}/generate")).header("Accept", "image/png").json(&body).send().await.unwrap();
    assert_eq!(png.status(), 200);
    let bytes = png.bytes().await.unwrap();
    assert_eq!(image::load_from_memory(&bytes).unwrap().to_rgb8().dimensions(), (16, 16));
    for (body, field) in [
        (json!({"prompt": "a red circle", "size": format!("{}-d CLIP embedding", common::unclip::WIDTH)}), "size"),
        (json!({"prompt": "a red circle", "clip_guidance_scale": 5}), "clip_guidance_scale"),
        (json!({"prompt": "a red circle", "stages": 1}), "stages"),
    ] {
        let r = client.post(format!("{base}/generate")).json(&body).send().await.unwrap();
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
        let err: Value = r.json().await.unwrap();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    // Image variations, natively and on OpenAI's route (DALL-E 2's own).
    let mut png = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 90])))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let png = png.into_inner();
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png);
    let body = json!({"prompt": "", "seed": 4, "source": {"kind": "image_embedding", "image": b64}});
    let r = client.post(format!("{base}/generate")).header("Accept", "image/png").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(image::load_from_memory(&r.bytes().await.unwrap()).unwrap().to_rgb8().dimensions(), (32, 32));
    let body = json!({"prompt": "a red circle", "source": {"kind": "image", "image": b64}});
    let err: Value = client.post(format!("{base}/generate")).json(&body).send().await.unwrap().json().await.unwrap();
    assert!(err.to_string().contains("image_embedding"), "{err}");
    let form = |extra: &[(&str, &str)]| {
        let mut body = b"--X\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n".to_vec();
        body.extend_from_slice(&png);
        for (name, value) in [("n", "2"), ("size", "32x32")].iter().chain(extra) {
            body.extend_from_slice(format!("\r\n--X\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}").as_bytes());
        }
        body.extend_from_slice(b"\r\n--X--\r\n");
        client.post(format!("{base}/v1/images/variations")).header("content-type", "multipart/form-data; boundary=X").body(body)
    };
    let r = form(&[]).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let reply: Value = r.json().await.unwrap();
    assert_eq!(reply["data"].as_array().unwrap().len(), 2);
    let r = form(&[("strength", "0.5")]).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["param"], "strength", "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    drop(server);
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[test]
fn eval_decoder_scores_the_four_conditionings_reproducibly() {
    use diffusiond::eval::decoder::{evaluate, DecoderEvalConfig};
    let dir = unclip_cascade("eval", 7);
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    let teacher = diffusiond::train::clip::FrozenClip::load(&dir.join("clip"), tch::Device::Cpu).unwrap();
    let config = DecoderEvalConfig { samples: 6, candidates: 3, seed: 12, steps: Some(2), guidance_scale: None, batch: 4 };
    let report = evaluate(&cascade, &teacher, &config).unwrap();
    let labels: Vec<&str> = report.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["its CLIP image embedding (empty caption)", "its caption (null embedding)", "both", "neither (unconditional)"]);
    for r in &report.rows {
        assert!((0.0..=1.0).contains(&r.top1) && (-1.0..=1.0).contains(&r.cosine), "{r:?}");
    }
    // The conditionings draw different images.
    assert!(report.rows.windows(2).any(|w| w[0].cosine != w[1].cosine), "{report:?}");
    assert_eq!(evaluate(&cascade, &teacher, &config).unwrap(), report, "seeded: the same numbers again");
    assert!(report.markdown().contains("| both |"));
    // The default cascade is not unCLIP.
    let plain = Cascade::load(&common::fixture_dir().join("cascade"), &CPU).unwrap();
    assert!(evaluate(&plain, &teacher, &config).unwrap_err().to_string().contains("not an unCLIP cascade"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shipped_unclip_cascade_loads_and_draws() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/unclip");
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    let kinds: Vec<_> = cascade.stages.iter().map(|s| s.kind.name()).collect();
    assert_eq!(kinds, ["prior", "decoder", "super_resolution", "super_resolution"]);
    // Layout guidance is the decoder's by default, as the base stage's in the default cascade.
    let plan = cascade.plan(&spec("a yellow star above a red circle", 1, 1)).unwrap();
    assert_eq!(plan.stages.iter().map(|s| s.layout_guidance_scale).collect::<Vec<_>>(), [0.0, 300.0, 0.0, 0.0]);
    let two = StageOverride { steps: Some(2), ..Default::default() };
    let images = generate(&cascade, &RequestSpec { stages: Some(2), steps: Some(2), stage_overrides: vec![(0, two)], ..spec("a red circle", 1, 1) });
    assert_eq!(images[0].image.dimensions(), (32, 32));
}

/// On the shipped weights: a variation of a held-out render looks like that
/// render to the CLIP, more than like the other renders.
#[test]
fn the_shipped_unclip_cascade_draws_variations_that_resemble_their_source() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/unclip");
    let cascade = Cascade::load(&dir, &CPU).unwrap();
    let dataset = diffusiond::train::dataset::Dataset::new(77);
    let renders: Vec<Picture> = (0..6).map(|i| Picture(diffusiond::train::render::render(&dataset.sample(i).scene, 32))).collect();
    let steps = StageOverride { steps: Some(10), ..Default::default() };
    let embed = |pictures: Vec<Picture>| {
        let clip = cascade.clip().unwrap();
        let side = clip.image_size();
        let batch: Vec<Tensor> = pictures.iter().map(|p| p.tensor((side, side), tch::Device::Cpu).unwrap()).collect();
        clip.image_embeds(&Tensor::cat(&batch, 0)).unwrap()
    };
    let drawn: Vec<Picture> = renders
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let spec = RequestSpec { stages: Some(2), stage_overrides: vec![(1, steps.clone())], ..variation("", r.clone(), 1, i as u64) };
            Picture(generate(&cascade, &spec).remove(0).image)
        })
        .collect();
    let similarity = embed(drawn).matmul(&embed(renders).tr());
    let n = similarity.size()[0];
    let own = similarity.diagonal(0, 0, 1).mean(tch::Kind::Float).double_value(&[]);
    let others = ((similarity.sum(tch::Kind::Float) - similarity.diagonal(0, 0, 1).sum(tch::Kind::Float)) / (n * (n - 1)) as f64).double_value(&[]);
    let top1 = similarity.argmax(1, false).eq_tensor(&Tensor::arange(n, (tch::Kind::Int64, tch::Device::Cpu))).sum(tch::Kind::Int64).int64_value(&[]);
    println!("variations vs their renders: cosine {own:.3} to their own, {others:.3} to the others; {top1}/{n} nearest their own");
    assert!(own > others + 0.3, "own {own:.3}, others {others:.3}");
    assert!(top1 * 3 >= n * 2, "{top1} of {n} variations are nearest their own render");
}

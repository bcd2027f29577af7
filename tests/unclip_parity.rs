//! unCLIP parity with diffusers: tiny random `PriorTransformer`s and an
//! `UnCLIPTextProjModel` written by diffusers' `save_pretrained` (fixtures from
//! `scripts/fixtures_unclip.py`) load in diffusiond and reproduce diffusers'
//! outputs on the same inputs. (The `UnCLIPScheduler` trajectories are in
//! `diffusion_parity.rs`.)

mod common;

use std::collections::HashMap;

use common::{fixture_dir, load_json, load_tensors, relative_error};
use diffusiond::nn::unclip::{LoadedPrior, LoadedTextProj, PriorInput};
use diffusiond::nn::unet::unet2d::LoadedUNet2D;
use diffusiond::nn::unet::{LoadedUNet, UNetInput};
use tch::{Device, Kind, Tensor};

/// The bound the network layer promises in f32 (max |ours − theirs| / max |theirs|).
const TOLERANCE: f64 = 1e-4;

fn check(name: &str, ours: &Tensor, theirs: &Tensor) {
    assert_eq!(ours.size(), theirs.size(), "{name}: shape");
    let err = relative_error(ours, theirs);
    println!("{name}: max relative error {err:.2e}");
    assert!(err <= TOLERANCE, "{name}: relative error {err:e}");
}

fn prior_case(name: &str, io: &HashMap<String, Tensor>) {
    let prior = LoadedPrior::load(&fixture_dir().join("unclip").join(name), Device::Cpu, Kind::Float)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let get = |k: &str| io.get(&format!("{name}.{k}"));
    let input = PriorInput {
        hidden_states: get("hidden_states").unwrap(),
        timesteps: get("timestep").unwrap(),
        proj_embedding: get("proj_embedding").unwrap(),
        encoder_hidden_states: get("encoder_hidden_states"),
        attention_mask: get("attention_mask"),
    };
    let out = tch::no_grad(|| prior.model.forward(&input)).unwrap();
    check(name, &out, get("output").unwrap());
    check(&format!("{name} post-processed"), &prior.model.post_process_latents(&out), get("post_processed").unwrap());
    // A row's prediction does not depend on the rows beside it.
    let one = |t: &Tensor| t.narrow(0, 1, 1);
    let (h, t, p) = (one(input.hidden_states), one(input.timesteps), one(input.proj_embedding));
    let (e, m) = (input.encoder_hidden_states.map(one), input.attention_mask.map(one));
    let single = PriorInput { hidden_states: &h, timesteps: &t, proj_embedding: &p, encoder_hidden_states: e.as_ref(), attention_mask: m.as_ref() };
    let alone = tch::no_grad(|| prior.model.forward(&single)).unwrap();
    assert!(alone.get(0).equal(&out.get(1)), "{name}: a row alone differs from the same row in a batch");
}

#[test]
fn tiny_priors_written_by_diffusers_match_diffusers_outputs() {
    let meta = load_json("unclip/cases.json");
    let io = load_tensors("unclip/io.safetensors");
    let priors: Vec<&String> = meta["cases"].as_object().unwrap().iter().filter(|(_, c)| c["kind"] == "prior").map(|(n, _)| n).collect();
    assert_eq!(priors.len(), 3);
    for name in priors {
        prior_case(name, &io);
    }
}

#[test]
fn the_text_projection_matches_diffusers_with_and_without_guidance() {
    let io = load_tensors("unclip/io.safetensors");
    let model = LoadedTextProj::load(&fixture_dir().join("unclip/text_proj"), Device::Cpu, Kind::Float).unwrap();
    for (case, guided) in [("text_proj", false), ("text_proj_guided", true)] {
        let get = |k: &str| io.get(&format!("{case}.{k}")).unwrap_or_else(|| panic!("{case}.{k}"));
        let out = tch::no_grad(|| {
            model.model.forward(get("image_embeddings"), get("prompt_embeds"), get("text_encoder_hidden_states"), guided)
        })
        .unwrap();
        check(&format!("{case} hidden states"), &out.hidden_states, get("hidden_states"));
        check(&format!("{case} time embeddings"), &out.time_embeddings, get("time_embeddings"));
    }
}

#[test]
fn a_karlo_style_decoder_matches_diffusers_with_its_text_mask() {
    let io = load_tensors("unclip/io.safetensors");
    let unet = LoadedUNet::load(&fixture_dir().join("unclip/decoder"), Device::Cpu, Kind::Float).unwrap();
    let get = |k: &str| io.get(&format!("decoder.{k}")).unwrap_or_else(|| panic!("decoder.{k}"));
    let input = |mask: Option<&Tensor>| {
        let input = UNetInput {
            sample: get("sample"),
            timesteps: get("timestep"),
            encoder_hidden_states: get("encoder_hidden_states"),
            class_labels: Some(get("class_labels")),
            text_mask: mask,
        };
        tch::no_grad(|| unet.model.forward(&input)).unwrap()
    };
    let masked = input(Some(get("attention_mask")));
    check("decoder", &masked, get("output"));
    // The mask is used: row 0 has padding, row 1 has none.
    let unmasked = input(None);
    assert!(!unmasked.get(0).allclose(&masked.get(0), 1e-4, 1e-4, false), "padding changed nothing");
    assert!(unmasked.get(1).allclose(&masked.get(1), 1e-6, 1e-6, false));
    // The identity class embedding takes a vector of the time-embedding width.
    let short = get("class_labels").narrow(1, 0, 5);
    let bad = UNetInput { sample: get("sample"), timesteps: get("timestep"), encoder_hidden_states: get("encoder_hidden_states"), class_labels: Some(&short), text_mask: None };
    assert!(unet.model.forward(&bad).unwrap_err().to_string().contains("class_labels"));
}

#[test]
fn super_resolution_unet2d_models_match_diffusers() {
    let meta = load_json("unclip/cases.json");
    let io = load_tensors("unclip/io.safetensors");
    let cases: Vec<&String> = meta["cases"].as_object().unwrap().iter().filter(|(_, c)| c["kind"] == "super_res").map(|(n, _)| n).collect();
    assert_eq!(cases.len(), 2);
    for name in cases {
        let unet = LoadedUNet2D::load(&fixture_dir().join("unclip").join(name), Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{name}: {e}"));
        let get = |k: &str| io.get(&format!("{name}.{k}"));
        let out = tch::no_grad(|| unet.model.forward(get("sample").unwrap(), get("timestep").unwrap(), get("class_labels"))).unwrap();
        check(name, &out, get("output").unwrap());
        // A row alone gets the bits it has in the batch.
        let one = |t: &Tensor| t.narrow(0, 2, 1);
        let labels = get("class_labels").map(one);
        let alone = tch::no_grad(|| unet.model.forward(&one(get("sample").unwrap()), &one(get("timestep").unwrap()), labels.as_ref())).unwrap();
        assert!(alone.get(0).equal(&out.get(2)), "{name}: a row alone differs from the same row in a batch");
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_input() {
    let io = load_tensors("unclip/io.safetensors");
    let prior = LoadedPrior::load(&fixture_dir().join("unclip/prior_karlo"), Device::Cpu, Kind::Float).unwrap();
    let get = |k: &str| io.get(&format!("prior_karlo.{k}")).unwrap();
    let short = get("proj_embedding").narrow(1, 0, 5);
    let four_words = get("attention_mask").narrow(1, 0, 4);
    let cases: [(&str, PriorInput<'_>); 3] = [
        ("proj_embedding", PriorInput { hidden_states: get("hidden_states"), timesteps: get("timestep"), proj_embedding: &short, encoder_hidden_states: Some(get("encoder_hidden_states")), attention_mask: None }),
        ("encoder_hidden_states", PriorInput { hidden_states: get("hidden_states"), timesteps: get("timestep"), proj_embedding: get("proj_embedding"), encoder_hidden_states: None, attention_mask: None }),
        ("attention_mask", PriorInput { hidden_states: get("hidden_states"), timesteps: get("timestep"), proj_embedding: get("proj_embedding"), encoder_hidden_states: Some(get("encoder_hidden_states")), attention_mask: Some(&four_words) }),
    ];
    for (field, input) in cases {
        let err = prior.model.forward(&input).unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    let model = LoadedTextProj::load(&fixture_dir().join("unclip/text_proj"), Device::Cpu, Kind::Float).unwrap();
    let tp = |k: &str| io.get(&format!("text_proj.{k}")).unwrap();
    // Guided needs twice the prompt rows.
    let err = model.model.forward(tp("image_embeddings"), tp("prompt_embeds"), tp("text_encoder_hidden_states"), true).err().unwrap();
    assert!(err.to_string().contains("prompt_embeds"), "{err}");
}

/// Each image's recorded draws of one stage: its start, then one per step.
fn replay(io: &HashMap<String, Tensor>, stage: &str, images: i64) -> diffusiond::diffusion::BatchNoise {
    use diffusiond::diffusion::{NoiseSource, ReplayNoise};
    let start = &io[&format!("{stage}/start")];
    let steps = &io[&format!("{stage}/steps")];
    let streams = (0..images)
        .map(|i| {
            let mut draws = vec![start.get(i)];
            if steps.numel() > 0 {
                draws.extend((0..steps.size()[0]).map(|k| steps.get(k).get(i)));
            }
            Box::new(ReplayNoise::new(draws)) as Box<dyn NoiseSource>
        })
        .collect();
    diffusiond::diffusion::BatchNoise::new(streams)
}

#[test]
fn a_tiny_unclip_pipeline_matches_diffusers_on_the_same_noise() {
    use diffusiond::pipeline::unclip::{UnClipNoise, UnClipPipeline, UnClipSettings};
    let dir = fixture_dir().join("unclip/pipeline");
    let meta = load_json("unclip/pipeline/reference.json");
    let io = load_tensors("unclip/pipeline/reference.safetensors");
    let pipeline = UnClipPipeline::load(&dir).unwrap();
    let prompts: Vec<String> = serde_json::from_value(meta["prompts"].clone()).unwrap();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let n = |k: &str| meta[k].as_u64().unwrap() as usize;
    let settings = UnClipSettings {
        prior_steps: n("prior_num_inference_steps"),
        decoder_steps: n("decoder_num_inference_steps"),
        super_res_steps: n("super_res_num_inference_steps"),
        prior_guidance_scale: meta["prior_guidance_scale"].as_f64().unwrap() as f32,
        decoder_guidance_scale: meta["decoder_guidance_scale"].as_f64().unwrap() as f32,
    };
    let b = prompts.len() as i64;
    let mut noise = UnClipNoise { prior: replay(&io, "prior", b), decoder: replay(&io, "decoder", b), super_res: replay(&io, "super_res", b) };
    let out = pipeline.generate(&prompts, &settings, &mut noise).unwrap();
    let abs = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let embeddings = abs(&out.image_embeddings, &io["image_embeddings"]);
    let image = abs(&out.image, &io["image"]);
    println!("unCLIP pipeline: image embeddings max abs difference {embeddings:.2e}, image {image:.2e}");
    assert!(embeddings <= 1e-3 && image <= 1e-3, "embeddings {embeddings:e}, image {image:e}");
    // The image is not trivially saturated: some pixels are inside (0, 1).
    let inside = io["image"].gt(0.01).logical_and(&io["image"].lt(0.99)).sum(Kind::Int64).int64_value(&[]);
    assert!(inside > 100, "only {inside} unsaturated pixels");
}

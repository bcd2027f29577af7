//! The `generate` and `info` subcommands, run as a user runs them.

mod common;

use std::process::Command;

use common::fixture_dir;
use diffusiond::pipeline::png::read_text_chunks;

fn diffusiond() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffusiond"))
}

#[test]
fn generate_writes_pngs_with_their_parameters() {
    let out = std::env::temp_dir().join(format!("diffusiond-cli-{}", std::process::id()));
    let model = fixture_dir().join("cascade");
    let run = diffusiond()
        .args(["generate", "a red circle above a blue square", "--seed", "7", "-n", "2", "--steps", "4"])
        .args(["--guidance", "4", "--sampler", "ddim", "--device", "cpu", "--model"])
        .arg(&model)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let files: Vec<String> = String::from_utf8(run.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(files.len(), 2);
    assert!(files[1].ends_with("a-red-circle-above-a-blue-square-8.png"));
    let png = std::fs::read(&files[0]).unwrap();
    let chunks = read_text_chunks(&png).unwrap();
    let params = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains("Steps: 4, Sampler: ddim, CFG scale: 4, Seed: 7, Size: 32x32, Model: tiny-if"), "{params}");
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 32);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn generate_edits_inpaints_and_interpolates_from_files() {
    let out = std::env::temp_dir().join(format!("diffusiond-cli-edit-{}", std::process::id()));
    let (model, edit) = (fixture_dir().join("cascade"), fixture_dir().join("edit"));
    let run = |args: &[&str]| {
        let run = diffusiond().args(args).args(["--steps", "4", "--device", "cpu", "--model"]).arg(&model).arg("-o").arg(&out).output().unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        String::from_utf8(run.stdout).unwrap().lines().map(str::to_owned).collect::<Vec<_>>()
    };
    let image = edit.join("image32.png");
    let mask = edit.join("mask32.png");
    let inpainted = run(&["generate", "a blue square", "--seed", "3", "--init-image", image.to_str().unwrap(), "--mask", mask.to_str().unwrap()]);
    let result = image::open(&inpainted[0]).unwrap().to_rgb8();
    let (source, mask) = (image::open(&image).unwrap().to_rgb8(), image::open(&mask).unwrap().to_luma8());
    assert!(result.enumerate_pixels().all(|(x, y, p)| mask.get_pixel(x, y).0[0] >= 128 || p == source.get_pixel(x, y)));
    let jpeg = run(&["generate", "a blue square", "--init-image", image.to_str().unwrap(), "--strength", "0.5", "--format", "jpeg", "--quality", "80"]);
    assert!(jpeg[0].ends_with(".jpg") && std::fs::read(&jpeg[0]).unwrap().starts_with(&[0xff, 0xd8, 0xff]), "{jpeg:?}");
    // Interpolation frames share the seed: the index names the file.
    let frames = run(&["generate", "a red ring", "--seed", "9", "-n", "3", "--interpolate-seed", "10", "--stages", "1"]);
    assert_eq!(frames.len(), 3);
    assert!(frames[2].ends_with("a-red-ring-9-002.png"), "{frames:?}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_flags_and_values_are_clear_errors() {
    let model = fixture_dir().join("cascade");
    let err = |args: &[&str]| {
        let out = diffusiond().args(args).arg("--model").arg(&model).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(err(&["generate", "x", "--sampler", "euler"]).contains("`euler` is not one of ddpm, ddim, dpmsolver++"));
    assert!(err(&["generate", "x", "--device", "gpu"]).contains("unknown device `gpu`"));
    assert!(err(&["generate", "x", "-n", "0", "--device", "cpu"]).contains("invalid `n`: 0 is outside 1..=16"));
    assert!(err(&["generate", "x", "--noise-level", "5000", "--device", "cpu"]).contains("`stages[1].noise_level`"));
    assert!(err(&["generate", "x", "--mask", "m.png"]).contains("--init-image"));
    assert!(err(&["generate", "x", "--init-image", "/nonexistent.png", "--device", "cpu"]).contains("/nonexistent.png"));
}

#[test]
fn info_describes_the_cascade() {
    let out = diffusiond().args(["info", "--json", "--device", "cpu", "--model"]).arg(fixture_dir().join("cascade")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["name"], "tiny-if");
    assert_eq!(info["text_encoder"]["type"], "bert");
    assert_eq!(info["stages"][1]["kind"], "super_resolution");
    assert_eq!(info["stages"][1]["size"], "32x32");
    assert_eq!(info["stages"][1]["defaults"]["noise_level"], 250);
    assert!(info["stages"][0]["parameters"].as_i64().unwrap() > 100_000);
}

#[test]
fn generate_runs_an_unclip_pipeline_folder() {
    let out = std::env::temp_dir().join(format!("diffusiond-cli-unclip-{}", std::process::id()));
    let model = fixture_dir().join("unclip/pipeline");
    let run = |n: &str, seed: &str, dir: &str| {
        diffusiond()
            .args(["generate", "a red circle", "--seed", seed, "-n", n, "--steps", "4", "--sr-steps", "3", "--model"])
            .arg(&model)
            .arg("-o")
            .arg(out.join(dir))
            .output()
            .unwrap()
    };
    let batch = run("2", "3", "batch");
    assert!(batch.status.success(), "{}", String::from_utf8_lossy(&batch.stderr));
    let files: Vec<String> = String::from_utf8(batch.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(files.len(), 2);
    assert!(files[1].ends_with("a-red-circle-4.png"));
    let image = image::open(&files[1]).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (16, 16));
    // Image i uses seed + i: the second image alone is the same picture.
    let alone = run("1", "4", "alone");
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));
    let single = image::open(out.join("alone/a-red-circle-4.png")).unwrap().to_rgb8();
    assert_eq!(single, image, "an unCLIP image changed with its batch");
    // Cascade-only options are refused by name.
    let refused = diffusiond().args(["generate", "x", "--init-image", "x.png", "--model"]).arg(&model).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--init-image"));
    std::fs::remove_dir_all(&out).unwrap();
}

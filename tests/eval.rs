//! The benchmark end to end: the detector on ground-truth renders of the
//! suite, batched generation against one-request-at-a-time generation, and the
//! `eval` subcommand as a user runs it.

mod common;

use std::ops::ControlFlow;
use std::process::Command;

use common::fixture_dir;
use diffusiond::eval::batch::generate_many;
use diffusiond::eval::score::{describe, judge_image, Rules, Tally};
use diffusiond::eval::suite::{suite, Category};
use diffusiond::nn::device::{DeviceSetting, Precision};
use diffusiond::pipeline::{Cascade, LoadOptions, RequestSpec, StageOverride};
use diffusiond::train::render::render;

/// Scores the suite's own scenes drawn at `size` under the strict rules (every
/// colour judged, nothing extra allowed), printing whatever fails.
fn ground_truth(size: u32, per_category: usize) -> Tally {
    let mut tally = Tally::default();
    for case in suite(0, per_category) {
        let (verdict, detection) = judge_image(&case, &render(&case.scene, size), Rules::Strict).unwrap();
        if !verdict.passed {
            println!("{size} px, \"{}\": {:?}\n  drawn: {}\n  seen:  {}", case.prompt, verdict.failures, describe(&case.scene), describe(&detection.scene));
        }
        tally.add(case.category, verdict.passed);
    }
    tally
}

#[test]
fn detector_reads_ground_truth_renders() {
    // 32 px (the base stage) is reported with a looser floor: a small ring
    // there is a band 1.3 px wide.
    for (size, floor) in [(32, 0.95), (64, 0.98), (128, 0.98)] {
        let tally = ground_truth(size, 50);
        let per: Vec<String> = Category::ALL.iter().map(|&c| format!("{} {:.1}", c.name(), 100.0 * tally.accuracy(c).unwrap())).collect();
        println!("{size} px: overall {:.1}% ({})", 100.0 * tally.overall().unwrap(), per.join(", "));
        for c in Category::ALL {
            assert!(tally.accuracy(c).unwrap() >= floor, "{size} px, {}: {:?}", c.name(), tally.count(c));
        }
        assert!(tally.overall().unwrap() >= floor);
    }
}

#[test]
fn batched_generation_equals_one_request_at_a_time() {
    tch::set_num_threads(1);
    let options = LoadOptions { device: DeviceSetting::Cpu, precision: Precision::F32 };
    let cascade = Cascade::load(&fixture_dir().join("cascade"), &options).unwrap();
    let spec = |prompt: &str, n, seed, guidance| RequestSpec {
        prompt: prompt.into(),
        n,
        seed: Some(seed),
        stage_overrides: vec![(0, StageOverride { steps: Some(4), guidance_scale: Some(guidance), ..Default::default() })],
        ..Default::default()
    };
    let requests: Vec<_> = [spec("a red circle", 2, 5, 4.0), spec("two blue stars", 1, 9, 1.0), spec("a green ring on the left", 3, 1, 7.0)]
        .iter()
        .map(|s| cascade.plan(s).unwrap())
        .collect();
    // Six rows per call: the first two requests share calls, the third runs alone.
    let batched = generate_many(&cascade, &requests, 6, &mut |_| {}).unwrap();
    for (request, images) in requests.iter().zip(&batched) {
        let alone = cascade.generate(request, &mut |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(images.len(), request.n);
        for (a, b) in images.iter().zip(&alone) {
            assert_eq!((a.seed, a.image.dimensions()), (b.seed, (32, 32)));
            let worst = a.image.as_raw().iter().zip(b.image.as_raw()).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
            assert!(worst <= 1, "\"{}\" seed {}: off by {worst}", request.prompt, a.seed);
        }
    }
}

/// Runs `diffusiond eval` on one thread: the tiny test cascade gains nothing
/// from more, and tests running side by side would oversubscribe the cores.
fn eval(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffusiond")).env("OMP_NUM_THREADS", "1").arg("eval").args(args).output().unwrap()
}

#[test]
fn eval_prints_tables() {
    let out = eval(&["--ground-truth", "--per-category", "3", "--size", "96"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("| setting | single_object | colour | two_objects | counting | position | colour_attribution | overall | 95% interval | images |"), "{table}");
    assert!(table.contains("| ground truth, 96 px | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 82.4–100.0 | 18 |"), "{table}");

    // A random-weight cascade: the plumbing, not the accuracy.
    let model = fixture_dir().join("cascade");
    let model = model.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("diffusiond-eval-{}", std::process::id()));
    let grid = dir.join("grid.png");
    let out = eval(&["--model", model, "--device", "cpu", "--per-category", "1", "--images", "1", "--table", "guidance", "--size", "16"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 5, "{table}");
    assert!(rows[0].starts_with("| ddpm 10 steps, guidance 1 |") && rows[4].ends_with("| 6 |"), "{table}");

    let out = eval(&["--model", model, "--device", "cpu", "--per-category", "1", "--images", "1", "--grid", grid.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = std::fs::read_to_string(dir.join("grid.txt")).unwrap();
    assert_eq!(lines.lines().count(), 6);
    assert_eq!(image::open(&grid).unwrap().width(), 3 * 32 + 4 * 2);
    std::fs::remove_dir_all(&dir).unwrap();

    // The base stage alone, resized to the cascade's output size before judging.
    let out = eval(&["--model", model, "--device", "cpu", "--per-category", "1", "--images", "1", "--size", "16", "--upscale-to", "32", "--grid", grid.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains(", 16 px bicubic to 32 |"), "{table}");
    assert_eq!(image::open(&grid).unwrap().width(), 3 * 32 + 4 * 2);
    std::fs::remove_dir_all(&dir).unwrap();
    let out = eval(&["--model", model, "--device", "cpu", "--size", "32", "--upscale-to", "16"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success() && err.contains("--upscale-to 16: below the 32 px"), "{err}");

    let out = eval(&["--model", model, "--device", "cpu", "--size", "64"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success() && err.contains("no stage of tiny-if outputs 64x64 (its stages give 16x16, 32x32)"), "{err}");
}

//! The synthetic captioned-shapes dataset, checked as a training run and an
//! evaluation rely on it: determinism, anti-aliasing, resolution independence,
//! captions that are true (and say what they claim), coverage of the
//! vocabulary, and the `dataset --preview` command.

use std::collections::HashSet;
use std::process::Command;

use diffusiond::train::caption::vocabulary;
use diffusiond::train::claims::{Claim, Relation};
use diffusiond::train::dataset::{Dataset, Sample};
use diffusiond::train::layout::{Content, MIN_GAP};
use diffusiond::train::render::{render, render_planes, render_tensor};
use diffusiond::train::scene::{Colour, Scene, Shape, Size};

const MANY: u64 = 3000;

fn samples(seed: u64, n: u64) -> impl Iterator<Item = Sample> {
    Dataset::new(seed).iter().take(n as usize)
}

/// Whether `phrase` occurs in `caption` as whole words.
fn says(caption: &str, phrase: &str) -> bool {
    format!(" {} ", caption.replace(',', " ")).contains(&format!(" {phrase} "))
}

#[test]
fn same_seed_same_bytes_different_seed_different_data() {
    let (a, b, c) = (Dataset::new(42), Dataset::new(42), Dataset::new(43));
    for i in [0, 1, 17, 1_000_000] {
        let (sa, sb) = (a.sample(i), b.sample(i));
        assert_eq!(sa, sb);
        assert_eq!(sa.image(48).as_raw(), sb.image(48).as_raw());
    }
    let (ta, ca) = a.batch(&[0, 1, 2, 3], 32).unwrap();
    let (tb, cb) = b.batch(&[0, 1, 2, 3], 32).unwrap();
    assert_eq!(ca, cb);
    assert!(ta.equal(&tb));
    let (tc, cc) = c.batch(&[0, 1, 2, 3], 32).unwrap();
    assert_ne!(ca, cc);
    assert!(!ta.equal(&tc));
}

#[test]
fn batches_match_single_renders_and_stay_in_range() {
    let data = Dataset::new(5);
    let indices = [9, 2, 7];
    let (images, captions) = data.batch(&indices, 40).unwrap();
    assert_eq!(images.size(), [3, 3, 40, 40]);
    assert_eq!(images.kind(), tch::Kind::Float);
    assert!(images.min().double_value(&[]) >= -1.0 && images.max().double_value(&[]) <= 1.0);
    for (k, &i) in indices.iter().enumerate() {
        let sample = data.sample(i);
        assert_eq!(captions[k], sample.caption);
        assert!(images.get(k as i64).equal(&render_tensor(&sample.scene, 40).unwrap()));
    }
}

#[test]
fn edges_are_anti_aliased() {
    for sample in samples(1, 100) {
        let img = sample.image(64);
        let bg = sample.scene.background.rgb();
        let colours: Vec<[u8; 3]> = sample.scene.objects.iter().map(|o| o.colour.rgb()).collect();
        let mut partial = 0;
        for p in img.pixels() {
            if p.0 == bg || colours.contains(&p.0) {
                continue;
            }
            // Anything else must be a blend of the background and an object colour.
            let between = |c: &[u8; 3]| (0..3).all(|k| p.0[k] >= bg[k].min(c[k]) && p.0[k] <= bg[k].max(c[k]));
            assert!(colours.iter().any(between), "sample {}: {:?} is no blend", sample.index, p.0);
            partial += 1;
        }
        assert!(partial >= 4 * colours.len(), "sample {}: only {partial} edge pixels", sample.index);
    }
}

#[test]
fn the_same_scene_at_twice_the_resolution_pools_to_the_smaller_render() {
    let mut total = 0.0f64;
    let mut count = 0usize;
    for sample in samples(2, 200) {
        let (mut large, mut small) = (vec![0.0; 3 * 128 * 128], vec![0.0; 3 * 64 * 64]);
        render_planes(&sample.scene, 128, &mut large);
        render_planes(&sample.scene, 64, &mut small);
        let mut worst = 0.0f32;
        for c in 0..3 {
            for y in 0..64 {
                for x in 0..64 {
                    let at = |yy: usize, xx: usize| large[c * 128 * 128 + yy * 128 + xx];
                    let pooled = (at(2 * y, 2 * x) + at(2 * y + 1, 2 * x) + at(2 * y, 2 * x + 1) + at(2 * y + 1, 2 * x + 1)) / 4.0;
                    let err = (pooled - small[c * 64 * 64 + y * 64 + x]).abs();
                    worst = worst.max(err);
                    total += err as f64;
                    count += 1;
                }
            }
        }
        // Pooling and analytic coverage only disagree along edges, and only by part of one pixel.
        assert!(worst < 0.5, "sample {}: worst pixel differs by {worst}", sample.index);
    }
    let mean = total / count as f64;
    assert!(mean < 0.004, "mean absolute difference {mean}");
}

#[test]
fn every_claim_holds_and_every_object_is_described() {
    for sample in samples(3, MANY) {
        for claim in &sample.claims {
            if let Err(e) = claim.verify(&sample.scene) {
                panic!("sample {} \"{}\": {e}", sample.index, sample.caption);
            }
        }
        // The counts account for every object exactly once: the caption is complete.
        let counted: Vec<_> = sample
            .claims
            .iter()
            .filter_map(|c| match c {
                Claim::Count { what, count } => Some((what, *count)),
                _ => None,
            })
            .collect();
        assert_eq!(counted.iter().map(|(_, n)| n).sum::<usize>(), sample.scene.objects.len(), "{}", sample.caption);
        for o in &sample.scene.objects {
            assert_eq!(counted.iter().filter(|(w, _)| w.matches(o)).count(), 1, "{}: {o:?}", sample.caption);
        }
    }
}

#[test]
fn objects_never_overlap_and_stay_inside() {
    for sample in samples(4, MANY) {
        let n = sample.scene.objects.len();
        assert!((1..=4).contains(&n), "{n} objects");
        assert!(sample.scene.fits_canvas());
        if let Some(gap) = sample.scene.min_gap() {
            assert!(gap >= MIN_GAP - 1e-6, "sample {}: gap {gap}", sample.index);
        }
        for o in &sample.scene.objects {
            assert!(o.size.admits(o.half_extent), "{o:?}");
            assert_ne!(o.colour, sample.scene.background);
        }
    }
}

/// Reads the caption back: its relation and count words must be exactly
/// those of its claims, and it must name every object's shape and colour.
#[test]
fn captions_say_what_their_claims_say() {
    for sample in samples(5, MANY) {
        let text = &sample.caption;
        let said_relations: HashSet<Relation> =
            Relation::ALL.into_iter().filter(|&r| vocabulary::relation(r).iter().any(|w| says(text, w))).collect();
        let mut relations = HashSet::new();
        for claim in &sample.claims {
            match claim {
                Claim::Related { relation, .. } => {
                    relations.insert(*relation);
                }
                Claim::Count { what, count } => {
                    if *count > 1 {
                        assert!(vocabulary::count(*count).iter().any(|w| says(text, w)), "{text}: count {count}");
                    }
                    let (sing, plural): (Vec<_>, Vec<_>) = vocabulary::shape(what.shape).iter().copied().unzip();
                    let nouns = if *count == 1 { sing } else { plural };
                    assert!(nouns.iter().any(|w| says(text, w)), "{text}: {:?}", what.shape);
                    assert!(vocabulary::colour(what.colour).iter().any(|w| says(text, w)), "{text}: {:?}", what.colour);
                }
            }
        }
        assert_eq!(said_relations, relations, "{text}");
        // Backgrounds are never named: no background colour word appears.
        for colour in Colour::BACKGROUNDS {
            assert!(!says(text, colour.name()) && !text.contains("background"), "{text}");
        }
    }
}

#[test]
fn many_samples_cover_the_whole_vocabulary() {
    let mut shapes = HashSet::new();
    let mut colours = HashSet::new();
    let mut backgrounds = HashSet::new();
    let mut sizes = HashSet::new();
    let mut relations = HashSet::new();
    let mut counts = HashSet::new();
    let mut kinds = HashSet::new();
    let mut object_counts = HashSet::new();
    let mut captions = HashSet::new();
    for sample in samples(6, MANY) {
        for o in &sample.scene.objects {
            shapes.insert(o.shape);
            colours.insert(o.colour);
            sizes.insert(o.size);
        }
        backgrounds.insert(sample.scene.background);
        object_counts.insert(sample.scene.objects.len());
        kinds.insert(std::mem::discriminant(&sample.description.content));
        if let Content::Pair { relation, .. } = sample.description.content {
            relations.insert(relation);
        }
        for claim in &sample.claims {
            if let Claim::Count { count, .. } = claim {
                counts.insert(*count);
            }
        }
        captions.insert(sample.caption);
    }
    assert_eq!(shapes.len(), Shape::ALL.len());
    assert_eq!(colours, HashSet::from(Colour::OBJECTS));
    assert_eq!(backgrounds, HashSet::from(Colour::BACKGROUNDS));
    assert_eq!(sizes.len(), Size::ALL.len());
    assert_eq!(relations.len(), Relation::ALL.len());
    assert_eq!(counts, HashSet::from([1, 2, 3, 4]));
    assert_eq!(object_counts, HashSet::from([1, 2, 3, 4]));
    assert_eq!(kinds.len(), 3);
    // Varied wording, from a small vocabulary: most captions still differ.
    assert!(captions.len() as f64 > 0.3 * MANY as f64, "{} distinct captions", captions.len());
}

#[test]
fn scenes_round_trip_through_json() {
    let sample = Dataset::new(8).sample(3);
    let json = serde_json::to_string(&sample).unwrap();
    let back: Sample = serde_json::from_str(&json).unwrap();
    assert_eq!(back, sample);
    let scene: Scene = serde_json::from_str(&serde_json::to_string(&sample.scene).unwrap()).unwrap();
    assert_eq!(render(&scene, 32).as_raw(), sample.image(32).as_raw());
}

fn diffusiond() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffusiond"))
}

#[test]
fn preview_writes_a_grid_and_numbered_captions() {
    let dir = std::env::temp_dir().join(format!("diffusiond-dataset-{}", std::process::id()));
    let png = dir.join("grid.png");
    let run = diffusiond()
        .args(["dataset", "--preview", "--seed", "9", "-n", "5", "--size", "32", "-o"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8(run.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5);
    let data = Dataset::new(9);
    for (k, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("{:>3}. {}", k + 1, data.sample(k as u64).caption));
    }
    assert_eq!(std::fs::read_to_string(dir.join("grid.txt")).unwrap(), stdout);
    let grid = image::open(&png).unwrap().to_rgb8();
    // 5 cells: 3 columns × 2 rows of 32 px with 2 px gutters.
    assert_eq!((grid.width(), grid.height()), (3 * 32 + 4 * 2, 2 * 32 + 3 * 2));
    let first = data.sample(0).image(32);
    assert_eq!(grid.get_pixel(2 + 16, 2 + 16), first.get_pixel(16, 16));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn preview_flags_are_checked() {
    let fails = |args: &[&str], expect: &str| {
        let run = diffusiond().arg("dataset").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success() && stderr.contains(expect), "{args:?}: {stderr}");
    };
    fails(&["-n", "4"], "pass --preview");
    fails(&["--preview", "--size", "0"], "--size");
    fails(&["--preview", "-n", "0"], "--num-samples");
    fails(&["--preview", "--seed", "x"], "--seed");
    fails(&["--preview", "-o", "grid.jpg"], "expected a .png file");
}

/// Throughput of the renderer (not a test of speed: run with `--ignored --nocapture`).
#[test]
#[ignore]
fn render_throughput() {
    let data = Dataset::new(0);
    let scenes: Vec<Sample> = data.iter().take(2000).collect();
    for size in [32u32, 64, 128] {
        let start = std::time::Instant::now();
        let mut buf = vec![0.0; 3 * (size * size) as usize];
        for s in &scenes {
            render_planes(&s.scene, size as usize, &mut buf);
        }
        let render_rate = scenes.len() as f64 / start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let indices: Vec<u64> = (0..2000).collect();
        for chunk in indices.chunks(64) {
            let (_images, _captions) = data.batch(chunk, size).unwrap();
        }
        let batch_rate = indices.len() as f64 / start.elapsed().as_secs_f64();
        println!("{size}×{size}: render {render_rate:.0} images/s, sample+render+tensor {batch_rate:.0} images/s");
    }
}

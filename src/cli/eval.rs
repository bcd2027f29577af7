//! `diffusiond eval`: the GenEval-style prompt-adherence benchmark (see
//! `diffusiond::eval`), on ground-truth renders (to validate the detector) or
//! on a cascade's samples, as markdown tables of per-category accuracy.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use diffusiond::diffusion::SamplerKind;
use diffusiond::eval::batch::generate_many;
use diffusiond::eval::score::{describe, judge_image, markdown, Rules, Tally, Verdict};
use diffusiond::eval::suite::{suite, Case, Category};
use diffusiond::pipeline::request::MAX_IMAGES;
use diffusiond::pipeline::stage::StageKind;
use diffusiond::pipeline::{Cascade, GenerationRequest, RequestSpec, StageOverride, StagePlan};
use diffusiond::train::render::render;
use diffusiond::train::scene::Scene;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};

use super::generate::ModelArgs;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Score our renderer's drawings of the prompts' scenes instead of a
    /// model's samples: validates the detector (it should score ≥ 98%).
    #[arg(long)]
    pub ground_truth: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Side of the images judged: ground truth is drawn at it (default 64); a
    /// cascade runs up to the stage that outputs it (default: all its stages).
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=1024))]
    pub size: Option<u32>,
    /// Prompts per category.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub per_category: u32,
    /// Samples per prompt (GenEval draws 4). Image i of prompt p has seed `seed + 16·p + i`.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=MAX_IMAGES as i64))]
    pub images: u32,
    /// Picks the prompts and the samples' noise; every row of a table uses the same.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A sweep, one row per value: `steps` (base stage DDIM 10, 20, 50, 100 and
    /// DDPM 1000), `guidance` (1, 2, 3, 5, 7) or `modes` (classifier-free
    /// guidance off and at the default, each alone, with CLIP guidance and
    /// with classifier guidance at two scales; needs a noised CLIP). Without
    /// it, one row of defaults.
    #[arg(long, value_enum)]
    pub table: Option<Sweep>,
    /// Only these rows of `--table` (1-based, comma-separated, in the
    /// table's order): a long row such as DDPM 1000 can run on its own.
    #[arg(long, value_delimiter = ',', value_name = "ROWS", requires = "table", value_parser = clap::value_parser!(u32).range(1..))]
    pub rows: Vec<u32>,
    /// Classifier-free guidance scale of every sample's base stage (default:
    /// the stage's).
    #[arg(long, value_name = "S", conflicts_with = "table")]
    pub guidance: Option<f32>,
    /// GLIDE's CLIP guidance of every sample's base stage at this scale (the
    /// cascade's manifest must name a noised CLIP), on top of each row's
    /// classifier-free guidance: run with and without to compare the modes.
    #[arg(long, value_name = "S", conflicts_with = "table")]
    pub clip_guidance: Option<f32>,
    /// ADM's classifier guidance of every sample's base stage at this scale,
    /// the cascade's noised CLIP as the classifier, on top of each row's
    /// classifier-free guidance.
    #[arg(long, value_name = "S", conflicts_with = "table")]
    pub classifier_guidance: Option<f32>,
    /// Layout guidance of every sample's base stage at this scale (0: none;
    /// default: the cascade's), on top of each row's settings.
    #[arg(long, value_name = "S")]
    pub layout_guidance: Option<f32>,
    /// Only these categories' prompts (comma-separated names, as the
    /// tables print them); default: all six.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub only: Vec<String>,
    /// Judge colours in every category and fail images with unrequested objects.
    #[arg(long)]
    pub strict: bool,
    /// Write the images as a grid PNG (one per row of a table), with each
    /// image's prompt, verdict and what was detected in a `.txt` next to it.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Resize each sample to this side (bicubic) before judging it: with
    /// `--size` of an earlier stage, what the cascade's later stages are
    /// measured against ("the base stage alone, upsampled").
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=1024))]
    pub upscale_to: Option<u32>,
    /// Most UNet rows per call (a guided image takes two).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_rows: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sweep {
    Steps,
    Guidance,
    Modes,
}

/// CLIP guidance scales of the `modes` table.
pub const MODES_CLIP: [f32; 2] = [10.0, 30.0];
/// Classifier guidance scales of the `modes` table.
pub const MODES_CLASSIFIER: [f32; 2] = [3.0, 10.0];

/// How one row of a table samples the base stage.
#[derive(Debug, Clone, Default)]
struct Row {
    base: StageOverride,
    clip: Option<f32>,
    classifier: Option<f32>,
}

impl Sweep {
    /// The settings of each row.
    fn rows(self) -> Vec<Row> {
        let base = |base: StageOverride| Row { base, ..Default::default() };
        match self {
            Sweep::Steps => [(SamplerKind::Ddim, 10), (SamplerKind::Ddim, 20), (SamplerKind::Ddim, 50), (SamplerKind::Ddim, 100), (SamplerKind::Ddpm, 1000)]
                .into_iter()
                .map(|(sampler, steps)| base(StageOverride { sampler: Some(sampler), steps: Some(steps), ..Default::default() }))
                .collect(),
            Sweep::Guidance => [1.0, 2.0, 3.0, 5.0, 7.0].into_iter().map(|g| base(StageOverride { guidance_scale: Some(g), ..Default::default() })).collect(),
            // Each mode alone (classifier-free guidance off) and on top of
            // classifier-free guidance at the stage's default.
            Sweep::Modes => [Some(1.0), None]
                .into_iter()
                .flat_map(|g| {
                    let cfg = StageOverride { guidance_scale: g, ..Default::default() };
                    let plain = Row { base: cfg.clone(), ..Default::default() };
                    let clip = MODES_CLIP.map(|s| Row { base: cfg.clone(), clip: Some(s), ..Default::default() });
                    let classifier = MODES_CLASSIFIER.map(|s| Row { base: cfg.clone(), classifier: Some(s), ..Default::default() });
                    std::iter::once(plain).chain(clip).chain(classifier)
                })
                .collect(),
        }
    }
}

/// One judged image, kept for the grid.
struct Judged {
    image: RgbImage,
    line: String,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if let Some(grid) = &args.grid {
        if grid.extension().is_none_or(|e| !e.eq_ignore_ascii_case("png")) {
            bail!("--grid {}: expected a .png file", grid.display());
        }
    }
    let rules = if args.strict { Rules::Strict } else { Rules::GenEval };
    let mut cases = suite(args.seed, args.per_category as usize);
    if !args.only.is_empty() {
        let known: Vec<&str> = Category::ALL.iter().map(|c| c.name()).collect();
        if let Some(bad) = args.only.iter().find(|n| !known.contains(&n.as_str())) {
            bail!("--only {bad}: not a category (one of {})", known.join(", "));
        }
        cases.retain(|c| args.only.iter().any(|n| n == c.category.name()));
    }
    if args.ground_truth && args.upscale_to.is_some() {
        bail!("--upscale-to resizes a model's samples; ground truth is drawn at --size");
    }
    let rows = if args.ground_truth { ground_truth(&args, &cases, rules)? } else { model(&args, &cases, rules)? };
    print!("{}", markdown(&rows));
    Ok(())
}

/// Renders every case's scene and judges it; failures go to stderr.
fn ground_truth(args: &EvalArgs, cases: &[Case], rules: Rules) -> anyhow::Result<Vec<(String, Tally)>> {
    if args.table.is_some() || args.guidance.is_some() || args.clip_guidance.is_some() || args.classifier_guidance.is_some() || args.layout_guidance.is_some() {
        bail!("--table and the guidance options set how a model samples; ground truth has no samples");
    }
    let size = args.size.unwrap_or(64);
    let mut tally = Tally::default();
    let mut judged = Vec::with_capacity(cases.len());
    for case in cases {
        let image = render(&case.scene, size);
        let (verdict, detection) = judge_image(case, &image, rules)?;
        if !verdict.passed {
            eprintln!("{}: \"{}\": {}\n  drawn: {}\n  seen:  {}", case.category.name(), case.prompt, verdict.failures.join("; "), describe(&case.scene), describe(&detection.scene));
        }
        tally.add(case.category, verdict.passed);
        judged.push(Judged { line: line(case, &verdict, &detection.scene), image });
    }
    let label = format!("ground truth, {size} px");
    if let Some(path) = &args.grid {
        write_grid(path, &judged, size)?;
    }
    Ok(vec![(label, tally)])
}

/// Samples every case with the cascade once per row of the table and judges the images.
fn model(args: &EvalArgs, cases: &[Case], rules: Rules) -> anyhow::Result<Vec<(String, Tally)>> {
    let cascade = args.model.load()?;
    let stages = stages_for(&cascade, args.size)?;
    let sampled = cascade.stages[stages - 1].size.1 as u32;
    let size = match args.upscale_to {
        Some(side) if side < sampled => bail!("--upscale-to {side}: below the {sampled} px the stages sample"),
        Some(side) => side,
        None => sampled,
    };
    let mut settings = args
        .table
        .map_or_else(|| vec![Row { base: StageOverride { guidance_scale: args.guidance, ..Default::default() }, clip: args.clip_guidance, classifier: args.classifier_guidance }], Sweep::rows);
    if !args.rows.is_empty() {
        if let Some(bad) = args.rows.iter().find(|&&r| r as usize > settings.len()) {
            bail!("--rows {bad}: the table has {} rows", settings.len());
        }
        settings = settings.into_iter().enumerate().filter(|(i, _)| args.rows.contains(&(*i as u32 + 1))).map(|(_, s)| s).collect();
    }
    let images = args.images as usize;
    eprintln!(
        "{} prompts × {images} images at {size} px with {} on {:?}, {} row(s)",
        cases.len(),
        cascade.manifest.name,
        cascade.device(),
        settings.len()
    );
    let base_index = cascade.stages.iter().position(|s| s.kind.draws_from_noise()).unwrap_or(0);
    let mut rows = Vec::with_capacity(settings.len());
    for (r, setting) in settings.iter().enumerate() {
        let requests = cases
            .iter()
            .map(|case| {
                // The case's place in the whole suite, so that `--only` draws
                // the same noise for it as a full run does.
                let category = Category::ALL.iter().position(|&c| c == case.category).expect("a known category");
                let p = category * args.per_category as usize + case.index;
                let spec = RequestSpec {
                    prompt: case.prompt.clone(),
                    n: images,
                    seed: Some(args.seed.wrapping_add((p * MAX_IMAGES) as u64)),
                    // The rows set the stage that draws the image (an unCLIP cascade's decoder).
                    stage_overrides: vec![(base_index, setting.base.clone())],
                    clip_guidance_scale: setting.clip,
                    classifier_guidance_scale: setting.classifier,
                    layout_guidance_scale: args.layout_guidance,
                    stages: Some(stages),
                    ..Default::default()
                };
                cascade.plan(&spec).with_context(|| format!("planning \"{}\"", case.prompt))
            })
            .collect::<anyhow::Result<Vec<GenerationRequest>>>()?;
        let mut label = setting_label(&cascade, &requests[0]);
        if size != sampled {
            label.push_str(&format!(", {sampled} px bicubic to {size}"));
        }
        let (tally, judged) = sample_and_judge(&cascade, args, cases, &requests, &label, rules)?;
        if let Some(path) = &args.grid {
            let path = if settings.len() == 1 { path.clone() } else { numbered(path, r + 1) };
            write_grid(&path, &judged, size)?;
        }
        rows.push((label, tally));
    }
    Ok(rows)
}

fn sample_and_judge(cascade: &Cascade, args: &EvalArgs, cases: &[Case], requests: &[GenerationRequest], label: &str, rules: Rules) -> anyhow::Result<(Tally, Vec<Judged>)> {
    let per_call = (args.batch_rows as usize / (2 * args.images as usize)).max(1);
    let bar = ProgressBar::new((requests.len() * args.images as usize) as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} images {elapsed_precise} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    let mut tally = Tally::default();
    let mut judged = Vec::with_capacity(bar.length().unwrap_or(0) as usize);
    for (chunk, group) in cases.chunks(per_call).zip(requests.chunks(per_call)) {
        let outputs = generate_many(cascade, group, args.batch_rows as usize, &mut |p| {
            bar.set_message(format!("stage {}/{} step {}/{}", p.stage + 1, p.stages, p.step, p.total_steps));
        })?;
        for (case, images) in chunk.iter().zip(outputs) {
            for generated in images {
                let image = match args.upscale_to {
                    Some(side) if side != generated.image.width() => {
                        image::imageops::resize(&generated.image, side, side, image::imageops::FilterType::CatmullRom)
                    }
                    _ => generated.image,
                };
                let (verdict, detection) = judge_image(case, &image, rules)?;
                tally.add(case.category, verdict.passed);
                judged.push(Judged { line: line(case, &verdict, &detection.scene), image });
                bar.inc(1);
            }
        }
    }
    bar.finish();
    Ok((tally, judged))
}

/// How many stages to run so the last one outputs `size` px.
fn stages_for(cascade: &Cascade, size: Option<u32>) -> anyhow::Result<usize> {
    let sizes: Vec<(i64, i64)> = cascade.stages.iter().map(|s| s.size).collect();
    let Some(size) = size else { return Ok(sizes.len()) };
    match sizes.iter().position(|&(h, w)| h == i64::from(size) && w == i64::from(size)) {
        Some(k) => Ok(k + 1),
        None => {
            let offered: Vec<String> = sizes.iter().map(|(h, w)| format!("{w}x{h}")).collect();
            bail!("--size {size}: no stage of {} outputs {size}x{size} (its stages give {})", cascade.manifest.name, offered.join(", "))
        }
    }
}

/// "ddim 50 steps, guidance 4" for the base stage; an unCLIP cascade's
/// names its prior's setting, then its decoder's.
fn setting_label(cascade: &Cascade, request: &GenerationRequest) -> String {
    let kind = |p: &&StagePlan| cascade.stages[p.index].kind;
    let base = request.stages.iter().find(|p| kind(p).draws_from_noise()).unwrap_or(&request.stages[0]);
    let mut label = match request.stages.iter().find(|p| kind(p) == StageKind::Prior) {
        Some(prior) => format!("prior {} {} steps, guidance {}; decoder ", prior.sampler.kind.name(), prior.sampler.steps, prior.guidance_scale),
        None => String::new(),
    };
    label += &format!("{} {} steps, guidance {}", base.sampler.kind.name(), base.sampler.steps, base.guidance_scale);
    if base.clip_guidance_scale > 0.0 {
        label.push_str(&format!(", CLIP guidance {}", base.clip_guidance_scale));
    }
    if base.classifier_guidance_scale > 0.0 {
        label.push_str(&format!(", classifier guidance {}", base.classifier_guidance_scale));
    }
    if base.layout_guidance_scale > 0.0 {
        label.push_str(&format!(", layout guidance {}", base.layout_guidance_scale));
    }
    label
}

fn line(case: &Case, verdict: &Verdict, seen: &Scene) -> String {
    let outcome = if verdict.passed { "pass".to_owned() } else { format!("FAIL ({})", verdict.failures.join("; ")) };
    format!("[{}] {} — {outcome} — seen {}", case.category.name(), case.prompt, describe(seen))
}

/// `out/grid.png` → `out/grid-2.png`.
fn numbered(path: &Path, n: usize) -> PathBuf {
    let stem = path.file_stem().map_or("grid".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-{n}.png"))
}

/// Writes the images as a near-square grid and their lines, numbered in grid order, as `.txt`.
fn write_grid(path: &Path, judged: &[Judged], size: u32) -> anyhow::Result<()> {
    let images: Vec<RgbImage> = judged.iter().map(|j| j.image.clone()).collect();
    let grid = super::dataset::grid(&images, size);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    grid.save_with_format(path, image::ImageFormat::Png).with_context(|| format!("writing {}", path.display()))?;
    let text: String = judged.iter().enumerate().map(|(k, j)| format!("{:>4}. {}\n", k + 1, j.line)).collect();
    let text_path = path.with_extension("txt");
    std::fs::write(&text_path, text).with_context(|| format!("writing {}", text_path.display()))?;
    eprintln!("wrote {} and {}", path.display(), text_path.display());
    Ok(())
}

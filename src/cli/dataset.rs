//! `diffusiond dataset --preview`: look at the synthetic training data — a grid
//! of samples as one PNG, their captions numbered in grid order on stdout and
//! in a `.txt` next to the PNG.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use diffusiond::train::dataset::Dataset;
use image::{Rgb, RgbImage};

/// Pixels of separator between grid cells.
const GUTTER: u32 = 2;

#[derive(Debug, Args)]
pub struct DatasetArgs {
    /// Write a preview grid of samples (the only action so far).
    #[arg(long)]
    pub preview: bool,
    /// Dataset seed: the same seed always gives the same samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// First sample index shown.
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// Number of samples in the grid.
    #[arg(short = 'n', long = "num-samples", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub n: u32,
    /// Side of each sample in pixels.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=1024))]
    pub size: u32,
    /// The grid PNG; captions go to the same path with a `.txt` extension.
    #[arg(short = 'o', long, default_value = "out/preview.png")]
    pub output: PathBuf,
}

pub fn run(args: DatasetArgs) -> anyhow::Result<()> {
    if !args.preview {
        bail!("nothing to do: pass --preview to write a grid of samples");
    }
    if args.output.extension().is_none_or(|e| !e.eq_ignore_ascii_case("png")) {
        bail!("--output {}: expected a .png file", args.output.display());
    }
    let Some(end) = args.start.checked_add(u64::from(args.n)) else {
        bail!("--start {}: too large for {} samples", args.start, args.n);
    };
    let dataset = Dataset::new(args.seed);
    let samples: Vec<_> = (args.start..end).map(|i| dataset.sample(i)).collect();
    let images: Vec<RgbImage> = samples.iter().map(|s| s.image(args.size)).collect();
    let grid = grid(&images, args.size);

    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    grid.save_with_format(&args.output, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", args.output.display()))?;
    let captions: String =
        samples.iter().enumerate().map(|(k, s)| format!("{:>3}. {}\n", k + 1, s.caption)).collect();
    let text_file: PathBuf = Path::new(&args.output).with_extension("txt");
    std::fs::write(&text_file, &captions).with_context(|| format!("writing {}", text_file.display()))?;
    print!("{captions}");
    eprintln!("wrote {} and {} (seed {}, samples {}..{end})", args.output.display(), text_file.display(), args.seed, args.start);
    Ok(())
}

/// Tiles square images row by row in a near-square grid on a mid-grey ground.
pub(super) fn grid(images: &[RgbImage], size: u32) -> RgbImage {
    let n = images.len() as u32;
    let columns = (n as f64).sqrt().ceil().max(1.0) as u32;
    let rows = n.div_ceil(columns);
    let side = |cells: u32| cells * size + (cells + 1) * GUTTER;
    let mut out = RgbImage::from_pixel(side(columns), side(rows), Rgb([96, 96, 96]));
    for (k, img) in images.iter().enumerate() {
        let (col, row) = (k as u32 % columns, k as u32 / columns);
        let (x0, y0) = (GUTTER + col * (size + GUTTER), GUTTER + row * (size + GUTTER));
        image::imageops::replace(&mut out, img, i64::from(x0), i64::from(y0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_near_square_and_keeps_order() {
        let cells: Vec<RgbImage> = (0..5u8).map(|k| RgbImage::from_pixel(4, 4, Rgb([k * 40, 0, 0]))).collect();
        let g = grid(&cells, 4);
        // 5 cells → 3 columns, 2 rows.
        assert_eq!((g.width(), g.height()), (3 * 4 + 4 * GUTTER, 2 * 4 + 3 * GUTTER));
        assert_eq!(g.get_pixel(GUTTER + 4 + GUTTER, GUTTER).0, [40, 0, 0]);
        assert_eq!(g.get_pixel(GUTTER, GUTTER + 4 + GUTTER).0, [120, 0, 0]);
    }
}

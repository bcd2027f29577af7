//! Judging detected scenes against cases, and the accuracy tables.
//!
//! An image passes when every claim of its prompt verifies ([`Claim::verify`])
//! on the detected scene. Two rule sets:
//!
//! - [`Rules::GenEval`] (the default) follows GenEval's per-task checks: colours
//!   are judged only in the `colour` and `colour_attribution` categories; in
//!   the others each detected object of a shape the prompt names is taken to
//!   have the colour the prompt gave that shape. Objects the prompt does not
//!   mention are allowed, as in GenEval.
//! - [`Rules::Strict`] judges every claim as worded, colours included, and
//!   also fails an image with any object beyond those the prompt asks for —
//!   the standard of the training captions, which account for every object.
//!
//! Accuracy is per image; the overall figure is the mean of the category
//! accuracies (GenEval's), so a category with more cases does not weigh more.

use std::fmt::Write as _;

use image::RgbImage;

use super::detect::{detect, DetectError, Detection};
use super::suite::{Case, Category};
use crate::train::claims::{Claim, Referent};
use crate::train::scene::Scene;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rules {
    #[default]
    GenEval,
    Strict,
}

/// The outcome for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub passed: bool,
    /// Why it failed, one entry per false claim (empty when it passed).
    pub failures: Vec<String>,
}

/// Judges `detected` against `case` under `rules`.
pub fn judge(case: &Case, detected: &Scene, rules: Rules) -> Verdict {
    let seen = match rules {
        Rules::GenEval if !case.category.judges_colour() => colour_blind(detected, &case.claims),
        _ => detected.clone(),
    };
    let mut failures: Vec<String> = case.claims.iter().filter_map(|c| c.verify(&seen).err()).map(|v| v.to_string()).collect();
    let expected = case.expected_objects();
    if rules == Rules::Strict && seen.objects.len() != expected {
        failures.push(format!("expected {expected} object(s) in all, found {}", seen.objects.len()));
    }
    Verdict { passed: failures.is_empty(), failures }
}

/// Reads `image` and judges it against `case`, returning what was seen too.
pub fn judge_image(case: &Case, image: &RgbImage, rules: Rules) -> Result<(Verdict, Detection), DetectError> {
    let detection = detect(image)?;
    Ok((judge(case, &detection.scene, rules), detection))
}

/// `scene` with each object recoloured to the colour its shape has in the
/// claims, so that only shapes, counts and places are judged. (The suite names
/// each shape once per prompt in the colour-blind categories.)
fn colour_blind(scene: &Scene, claims: &[Claim]) -> Scene {
    let referents: Vec<&Referent> = claims
        .iter()
        .flat_map(|c| match c {
            Claim::Count { what, .. } => vec![what],
            Claim::Related { subject, object, .. } => vec![subject, object],
        })
        .collect();
    let mut out = scene.clone();
    for o in &mut out.objects {
        if let Some(r) = referents.iter().find(|r| r.shape == o.shape) {
            o.colour = r.colour;
        }
    }
    out
}

/// Passes and totals per category.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    counts: [(usize, usize); Category::ALL.len()],
}

impl Tally {
    pub fn add(&mut self, category: Category, passed: bool) {
        let entry = &mut self.counts[category as usize];
        entry.0 += usize::from(passed);
        entry.1 += 1;
    }

    /// (passed, judged) in `category`.
    pub fn count(&self, category: Category) -> (usize, usize) {
        self.counts[category as usize]
    }

    /// Fraction passed in `category`; `None` when nothing was judged there.
    pub fn accuracy(&self, category: Category) -> Option<f64> {
        let (passed, total) = self.count(category);
        (total > 0).then(|| passed as f64 / total as f64)
    }

    /// The mean of the category accuracies (over categories with images).
    pub fn overall(&self) -> Option<f64> {
        let known: Vec<f64> = Category::ALL.iter().filter_map(|&c| self.accuracy(c)).collect();
        (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
    }

    /// The 95% Wilson score interval of [`Tally::overall`]: how far the figure
    /// can be from the model's true accuracy by the luck of the draw. The
    /// overall figure is a mean of category proportions; it is treated as one
    /// proportion over n = K² / Σ 1/n_c images, which is all of them when the
    /// K categories have the same number (as the suite draws them).
    pub fn overall_interval(&self) -> Option<(f64, f64)> {
        let p = self.overall()?;
        let totals: Vec<f64> = self.counts.iter().filter(|c| c.1 > 0).map(|c| c.1 as f64).collect();
        let k = totals.len() as f64;
        let n = k * k / totals.iter().map(|t| 1.0 / t).sum::<f64>();
        Some(wilson(p, n))
    }

    /// Images judged in all.
    pub fn images(&self) -> usize {
        self.counts.iter().map(|c| c.1).sum()
    }
}

/// The 95% Wilson score interval of a proportion `p` observed over `n` trials
/// (Wilson 1927): unlike p ± 1.96·√(p(1−p)/n) it stays inside [0, 1] and is
/// not empty at p = 0, where small evaluations often sit.
pub fn wilson(p: f64, n: f64) -> (f64, f64) {
    const Z: f64 = 1.959_963_984_540_054;
    let z2 = Z * Z;
    let denominator = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denominator;
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// A markdown table: one row per setting, a column per category, then the
/// overall mean, its 95% interval and the number of images; accuracies in percent.
pub fn markdown(rows: &[(String, Tally)]) -> String {
    let mut out = String::from("| setting |");
    for c in Category::ALL {
        let _ = write!(out, " {} |", c.name());
    }
    out.push_str(" overall | 95% interval | images |\n|---|");
    out.push_str(&"---:|".repeat(Category::ALL.len() + 3));
    out.push('\n');
    let percent = |a: Option<f64>| a.map_or("–".to_owned(), |a| format!("{:.1}", 100.0 * a));
    for (label, tally) in rows {
        let _ = write!(out, "| {label} |");
        for c in Category::ALL {
            let _ = write!(out, " {} |", percent(tally.accuracy(c)));
        }
        let interval = tally.overall_interval().map_or("–".to_owned(), |(lo, hi)| format!("{:.1}–{:.1}", 100.0 * lo, 100.0 * hi));
        let _ = writeln!(out, " {} | {interval} | {} |", percent(tally.overall()), tally.images());
    }
    out
}

/// The scene in words, for logs: "grey: red circle (medium) at (0.31, 0.72), …".
pub fn describe(scene: &Scene) -> String {
    let objects: Vec<String> = scene
        .objects
        .iter()
        .map(|o| format!("{} {} ({}) at ({:.2}, {:.2})", o.colour.name(), o.shape.name(), o.size.name(), o.centre.x, o.centre.y))
        .collect();
    let list = if objects.is_empty() { "nothing".to_owned() } else { objects.join(", ") };
    format!("{} background: {list}", scene.background.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::suite::case;
    use crate::train::scene::{Colour, Object, Shape};

    #[test]
    fn the_true_scene_passes_and_swapped_colours_fail() {
        let truth = case(3, Category::ColourAttribution, 0);
        assert!(judge(&truth, &truth.scene, Rules::Strict).passed);
        let mut swapped = truth.scene.clone();
        let (a, b) = (swapped.objects[0].colour, swapped.objects[1].colour);
        (swapped.objects[0].colour, swapped.objects[1].colour) = (b, a);
        let verdict = judge(&truth, &swapped, Rules::GenEval);
        assert!(!verdict.passed && verdict.failures.len() == 2, "{verdict:?}");
    }

    #[test]
    fn colours_count_only_where_the_category_judges_them() {
        let two = case(3, Category::TwoObjects, 1);
        let mut recoloured = two.scene.clone();
        for o in &mut recoloured.objects {
            o.colour = if o.colour == Colour::Purple { Colour::Orange } else { Colour::Purple };
        }
        assert!(judge(&two, &recoloured, Rules::GenEval).passed);
        assert!(!judge(&two, &recoloured, Rules::Strict).passed);
        // An extra object is fine for GenEval, not for the strict rules.
        let mut extra = two.scene.clone();
        let unused = Shape::ALL.into_iter().find(|s| two.scene.objects.iter().all(|o| o.shape != *s)).unwrap();
        extra.objects.push(Object { shape: unused, ..two.scene.objects[0] });
        assert!(judge(&two, &extra, Rules::GenEval).passed);
        assert!(!judge(&two, &extra, Rules::Strict).passed);
    }

    #[test]
    fn wilson_intervals_match_the_textbook_values() {
        // 0 of 24: [0, z²/(n + z²)] = [0, 0.1380]; 12 of 24: 0.5 ± 0.1857.
        let (lo, hi) = wilson(0.0, 24.0);
        assert!(lo < 1e-12 && (hi - 0.13797).abs() < 1e-4, "{lo} {hi}");
        let (lo, hi) = wilson(0.5, 24.0);
        assert!((lo - 0.31428).abs() < 1e-4 && (hi - 0.68572).abs() < 1e-4, "{lo} {hi}");
        // All passed: the upper end is 1, the lower one below it.
        let (lo, hi) = wilson(1.0, 300.0);
        assert!(hi > 1.0 - 1e-12 && (lo - 300.0 / (300.0 + 1.96f64.powi(2))).abs() < 1e-4, "{lo} {hi}");
        // Equal categories: the interval is that of the pooled proportion.
        let mut t = Tally::default();
        for (i, &c) in Category::ALL.iter().enumerate() {
            for j in 0..4 {
                t.add(c, j < i % 3);
            }
        }
        let (passed, total) = Category::ALL.iter().map(|&c| t.count(c)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        assert_eq!(t.overall_interval(), Some(wilson(passed as f64 / total as f64, total as f64)));
        assert!(markdown(&[("x".into(), t)]).contains(" | overall | 95% interval | images |"));
    }

    #[test]
    fn tallies_average_over_categories() {
        let mut t = Tally::default();
        for passed in [true, true, true, false] {
            t.add(Category::Counting, passed);
        }
        t.add(Category::Position, false);
        assert_eq!(t.count(Category::Counting), (3, 4));
        assert_eq!(t.accuracy(Category::Colour), None);
        assert_eq!(t.overall(), Some((0.75 + 0.0) / 2.0));
        assert_eq!(t.images(), 5);
        let table = markdown(&[("default".into(), t)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        // Unequal categories (4 and 1 images) count as 4²/(1/4 + 1) = 3.2 images.
        assert!(lines[2].starts_with("| default | – | – | – | 75.0 | 0.0 | – | 37.5 | 7.9–80.7 | 5 |"), "{table}");
    }
}

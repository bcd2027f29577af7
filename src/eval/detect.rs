//! Reading a scene back from pixels: the detector the benchmark scores with.
//!
//! The domain is closed (twelve known colours, eight known outlines, no
//! rotation), so segmentation by colour and shape fitting by geometry do what
//! GenEval needs an object detector for, exactly and with no weights:
//!
//! 1. The background is the palette colour most border pixels are nearest to.
//! 2. Each pixel close to a palette colour takes it; one that is not is tried
//!    as an anti-aliased blend of the background and an object colour, and
//!    takes that colour when it is at least half object. Anything else is left
//!    unassigned.
//! 3. Connected components per colour. Edge blends can land near a *third*
//!    palette colour (white→black crosses grey, red on green gives brown),
//!    which leaves a thin band of the wrong colour around an object; a thin
//!    component that touches another and reads as a blend of the background
//!    and that one's colour (better than the other way round) is merged into
//!    it, together with any other pieces of that colour it touches (a small
//!    ring can fall apart into arcs its own rim joins).
//! 4. Components too small to be the smallest object at this resolution go.
//! 5. Each remaining component is fitted with every shape: from the coverage
//!    the pixels imply (blends count fractionally) the area gives the half
//!    extent and the centroid the centre, for that shape; the shape whose
//!    rendered coverage overlaps best (soft IoU) wins, and the size class is
//!    the nearest nominal half extent. A fit below [`MIN_FIT`], or a size far
//!    outside every class, is not an object of this domain: it is reported
//!    but left out of the scene.
//!
//! Blends are measured between the shades the background and each object
//! actually have in the image (medians), not the palette's values, and the
//! palette only names colours; so the same code reads model samples
//! (off-palette colours, noise, soft edges), and on our own renders it is
//! exact at 32 px and above (see `tests/eval.rs`).

use std::sync::LazyLock;

use image::RgbImage;

use super::segment::{blend, distance, ramp, rgb, segment, Segment, Segmentation, BLEND, PURE};
use crate::train::scene::{Object, Point, Scene, Shape, Size};
use crate::train::sdf;

/// Smallest image side the detector reads (a small object is then 3 px across).
pub const MIN_SIDE: u32 = 16;
/// Smallest soft IoU for a component to count as a shape.
pub const MIN_FIT: f32 = 0.5;
/// Half extents (fractions of the side) an object of this domain can have:
/// well beyond the small and large classes' jitter, so a sample's objects a
/// little off size still count, while specks and washes do not.
const HALF_EXTENTS: [f32; 2] = [0.06, 0.3];

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DetectError {
    #[error("the image is {width}×{height} px: the detector reads square images of at least {MIN_SIDE} px")]
    Unreadable { width: u32, height: u32 },
}

/// One component and its best shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The fitted object (centre, half extent and size class for `object.shape`).
    pub object: Object,
    /// Soft IoU of the best shape's coverage with the observed one.
    pub fit: f32,
    /// The second-best shape and its fit: how clear the decision was.
    pub runner_up: (Shape, f32),
    /// Pixels in the component.
    pub pixels: usize,
}

impl Found {
    /// Whether this fits a shape well enough, at a plausible size, to be an object.
    pub fn is_object(&self) -> bool {
        let h = self.object.half_extent;
        self.fit >= MIN_FIT && (HALF_EXTENTS[0]..=HALF_EXTENTS[1]).contains(&h)
    }
}

/// What [`detect`] saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The objects ([`Found::is_object`]), with the background.
    pub scene: Scene,
    /// Every component kept, recognised or not, largest first.
    pub found: Vec<Found>,
}

/// Reads the scene in `image`.
pub fn detect(image: &RgbImage) -> Result<Detection, DetectError> {
    let (width, height) = image.dimensions();
    if width != height || width < MIN_SIDE {
        return Err(DetectError::Unreadable { width, height });
    }
    let pixels: Vec<[f32; 3]> = image.pixels().map(|p| p.0.map(f32::from)).collect();
    let side = width as usize;
    let seg = segment(&pixels, side);
    let mut found: Vec<Found> = seg.regions.iter().map(|region| Part { pixels: &pixels, side, seg: &seg, region }.fit()).collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.pixels));
    let objects = found.iter().filter(|f| f.is_object()).map(|f| f.object).collect();
    Ok(Detection { scene: Scene { background: seg.background, objects }, found })
}

/// Each shape's geometry in its unit frame (footprint [-1, 1]²): area and
/// centroid, measured once from the same signed distances the renderer uses.
struct Geometry {
    area: f32,
    centroid: [f32; 2],
}

static GEOMETRY: LazyLock<Vec<Geometry>> = LazyLock::new(|| {
    const N: usize = 400;
    let cell = 2.0 / N as f32;
    Shape::ALL
        .iter()
        .map(|&shape| {
            let (mut count, mut sx, mut sy) = (0usize, 0.0f32, 0.0f32);
            for j in 0..N {
                let v = -1.0 + (j as f32 + 0.5) * cell;
                for i in 0..N {
                    let u = -1.0 + (i as f32 + 0.5) * cell;
                    if sdf::distance(shape, [u, v]) < 0.0 {
                        count += 1;
                        sx += u;
                        sy += v;
                    }
                }
            }
            let n = count.max(1) as f32;
            Geometry { area: count as f32 * cell * cell, centroid: [sx / n, sy / n] }
        })
        .collect()
});

/// One region being fitted, with what it is read against.
struct Part<'a> {
    pixels: &'a [[f32; 3]],
    side: usize,
    seg: &'a Segmentation,
    region: &'a Segment,
}

impl Part<'_> {
    /// How much of pixel `i` this object covers.
    fn coverage(&self, i: usize) -> f32 {
        let (seg, region) = (self.seg, self.region);
        match seg.owner[i] {
            Some(other) if other != region.id => 0.0,
            Some(_) if seg.labels[i] == Some(region.colour) && distance(self.pixels[i], rgb(region.colour)) <= PURE => 1.0,
            // Its own blends and merged rim, or an unowned edge pixel.
            _ => match blend(self.pixels[i], seg.ground, region.shade) {
                (alpha, off) if off <= BLEND => ramp(alpha),
                _ => 0.0,
            },
        }
    }

    /// Fits every shape and keeps the best.
    fn fit(&self) -> Found {
        let side = self.side;
        let (mut x0, mut y0, mut x1, mut y1) = (side, side, 0, 0);
        for &i in &self.region.members {
            let (x, y) = (i % side, i / side);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
        // Observed coverage around the region: its blended rim lies outside it.
        let (mut area, mut mx, mut my) = (0.0f32, 0.0f32, 0.0f32);
        for y in y0.saturating_sub(2)..(y1 + 3).min(side) {
            for x in x0.saturating_sub(2)..(x1 + 3).min(side) {
                let a = self.coverage(y * side + x);
                area += a;
                mx += a * (x as f32 + 0.5);
                my += a * (y as f32 + 0.5);
            }
        }
        let area = area.max(1e-3);
        let centroid = [mx / area, my / area];
        let mut scores: Vec<(Shape, f32, [f32; 2], f32)> = Shape::ALL
            .iter()
            .zip(GEOMETRY.iter())
            .map(|(&shape, g)| {
                // Area fixes the scale for this shape, the centroid its position.
                let h = (area / g.area).sqrt();
                let centre = [centroid[0] - g.centroid[0] * h, centroid[1] - g.centroid[1] * h];
                (shape, self.soft_iou(shape, centre, h), centre, h)
            })
            .collect();
        scores.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (shape, iou, centre, h) = scores[0];
        let scale = side as f32;
        let half_extent = h / scale;
        let object = Object {
            shape,
            colour: self.region.colour,
            size: size_class(half_extent),
            centre: Point { x: centre[0] / scale, y: centre[1] / scale },
            half_extent,
        };
        Found { object, fit: iou, runner_up: (scores[1].0, scores[1].1), pixels: self.region.members.len() }
    }

    /// Soft IoU of the observed coverage with `shape` drawn at `centre`, `h`
    /// (px) the way the renderer draws it, over the shape's footprint and a
    /// margin; whatever of the component lies beyond that window counts
    /// against the shape. (Comparing with softened outlines for blurred
    /// samples was tried: it favours circles and loses more than it gains.)
    fn soft_iou(&self, shape: Shape, centre: [f32; 2], h: f32) -> f32 {
        let side = self.side as isize;
        let span = |c: f32| ((c - h).floor() as isize - 3).max(0)..((c + h).ceil() as isize + 3).min(side);
        let (xs, ys) = (span(centre[0]), span(centre[1]));
        let (mut inter, mut union) = (0.0f32, 0.0f32);
        for y in ys.clone() {
            let v = (y as f32 + 0.5 - centre[1]) / h;
            for x in xs.clone() {
                let u = (x as f32 + 0.5 - centre[0]) / h;
                let model = (0.5 - sdf::distance(shape, [u, v]) * h).clamp(0.0, 1.0);
                let seen = self.coverage(y as usize * self.side + x as usize);
                inter += model.min(seen);
                union += model.max(seen);
            }
        }
        let beyond: f32 = self
            .region
            .members
            .iter()
            .filter(|&&i| {
                let (x, y) = ((i % self.side) as isize, (i / self.side) as isize);
                !(xs.contains(&x) && ys.contains(&y))
            })
            .map(|&i| self.coverage(i))
            .sum();
        if union + beyond > 0.0 {
            inter / (union + beyond)
        } else {
            0.0
        }
    }
}

/// The size class whose nominal half extent is nearest (by ratio).
fn size_class(half_extent: f32) -> Size {
    let off = |s: Size| (half_extent / s.half_extent()).ln().abs();
    Size::ALL.into_iter().min_by(|a, b| off(*a).total_cmp(&off(*b))).expect("sizes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::render::render;
    use crate::train::scene::Colour;

    fn object(shape: Shape, colour: Colour, size: Size, x: f32, y: f32) -> Object {
        Object { shape, colour, size, centre: Point { x, y }, half_extent: size.half_extent() }
    }

    #[test]
    fn finds_every_shape_in_every_colour() {
        for (k, &shape) in Shape::ALL.iter().enumerate() {
            for (j, &colour) in Colour::ALL.iter().enumerate() {
                let background = if colour == Colour::White { Colour::Black } else { Colour::White };
                let size = Size::ALL[(k + j) % 3];
                let truth = object(shape, colour, size, 0.45, 0.55);
                let scene = Scene { background, objects: vec![truth] };
                let seen = detect(&render(&scene, 64)).unwrap();
                assert_eq!(seen.scene.background, background);
                let [found] = &seen.scene.objects[..] else { panic!("{shape:?} {colour:?}: {:?}", seen.found) };
                assert_eq!((found.shape, found.colour, found.size), (shape, colour, size), "{:?}", seen.found);
                assert!((found.centre.x - 0.45).abs() < 0.02 && (found.centre.y - 0.55).abs() < 0.02, "{found:?}");
                assert!((found.half_extent / truth.half_extent - 1.0).abs() < 0.06, "{found:?}");
            }
        }
    }

    #[test]
    fn fringes_of_a_third_colour_are_not_objects() {
        // White→black blends are grey, white→red ones pinkish: neither is an object.
        let scene = Scene {
            background: Colour::White,
            objects: vec![
                object(Shape::Circle, Colour::Black, Size::Large, 0.3, 0.3),
                object(Shape::Ring, Colour::Red, Size::Large, 0.7, 0.7),
            ],
        };
        for side in [64, 128] {
            let seen = detect(&render(&scene, side)).unwrap();
            assert_eq!(seen.found.len(), 2, "{side}: {:?}", seen.found);
            assert_eq!(seen.scene.objects.len(), 2);
        }
    }

    #[test]
    fn blank_and_bad_images() {
        let blank = RgbImage::from_pixel(32, 32, image::Rgb(Colour::Grey.rgb()));
        let seen = detect(&blank).unwrap();
        assert_eq!((seen.scene.background, seen.scene.objects.len()), (Colour::Grey, 0));
        assert!(detect(&RgbImage::new(32, 16)).is_err());
        assert!(detect(&RgbImage::new(0, 0)).is_err());
        // Noise neither panics nor reads as a scene full of shapes.
        let mut state = 12345u32;
        let noise = RgbImage::from_fn(48, 48, |_, _| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            image::Rgb([(state >> 24) as u8, (state >> 16) as u8, (state >> 8) as u8])
        });
        assert!(detect(&noise).unwrap().scene.objects.len() <= 2);
    }
}

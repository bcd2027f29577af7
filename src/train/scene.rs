//! The scene description: what is drawn where, independent of any resolution.
//!
//! A scene is a background colour plus a few objects, each a shape of one
//! colour and size class placed by its centre in normalised coordinates
//! (`x` rightwards, `y` downwards, both in [0, 1]). Every shape fits in the
//! square of side `2 · half_extent` around its centre, so that square is the
//! object's footprint for overlap tests and spatial relations; the renderer
//! draws the same scene at any pixel size. Names here are the canonical words
//! the captions start from (synonyms live in `caption.rs`).

use serde::{Deserialize, Serialize};

/// The drawable shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Ring,
    Cross,
}

impl Shape {
    pub const ALL: [Shape; 6] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star, Shape::Ring, Shape::Cross];

    /// The canonical singular noun.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Ring => "ring",
            Shape::Cross => "cross",
        }
    }
}

/// The named colours: six saturated ones that objects have and three neutral
/// ones that backgrounds have, so an object never blends into its ground.
/// Values are far apart so that a colour name is never a judgement call, for
/// the model or for an evaluator reading pixels back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Orange,
    Purple,
    White,
    Black,
    Grey,
}

impl Colour {
    /// Every colour an image can show (the evaluator's palette).
    pub const ALL: [Colour; 9] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Orange,
        Colour::Purple,
        Colour::White,
        Colour::Black,
        Colour::Grey,
    ];
    /// The colours objects have: the words a caption can give an object.
    pub const OBJECTS: [Colour; 6] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow, Colour::Orange, Colour::Purple];
    /// The colours backgrounds have.
    pub const BACKGROUNDS: [Colour; 3] = [Colour::White, Colour::Black, Colour::Grey];

    /// The canonical name (British spelling; `caption.rs` also says "gray").
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Orange => "orange",
            Colour::Purple => "purple",
            Colour::White => "white",
            Colour::Black => "black",
            Colour::Grey => "grey",
        }
    }

    /// 8-bit sRGB.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 35],
            Colour::Green => [35, 165, 60],
            Colour::Blue => [35, 75, 220],
            Colour::Yellow => [250, 220, 40],
            Colour::Orange => [250, 130, 15],
            Colour::Purple => [130, 50, 180],
            Colour::White => [245, 245, 245],
            Colour::Black => [15, 15, 15],
            Colour::Grey => [128, 128, 128],
        }
    }
}

/// Size classes (the captions do not name them: they fix how large objects
/// are drawn, and let the evaluator tell an object from a speck). Each maps to a nominal half-extent (fraction of the image
/// side); objects vary by a few percent around it, never enough to reach the
/// next class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];
    /// How far a sampled half-extent may stray from the nominal one (±, relative).
    pub const JITTER: f32 = 0.06;

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }

    /// Nominal half-extent. Small is still almost 8 px across at 32 px, the base
    /// stage's resolution, so that a triangle's corners and a star's points
    /// survive there; four small objects still fit in one image.
    pub fn half_extent(self) -> f32 {
        match self {
            Size::Small => 0.12,
            Size::Medium => 0.16,
            Size::Large => 0.2,
        }
    }

    /// The classes an object may take in a scene of `objects` objects: large
    /// ones only when there are at most two, small ones only when there are
    /// three or more, so every layout fits with room between the objects.
    pub fn for_scene(objects: usize) -> &'static [Size] {
        if objects <= 2 {
            &[Size::Medium, Size::Large]
        } else {
            &[Size::Small, Size::Medium]
        }
    }

    /// Whether `half_extent` is within this class's jitter band.
    pub fn admits(self, half_extent: f32) -> bool {
        (half_extent / self.half_extent() - 1.0).abs() <= Self::JITTER + 1e-4
    }
}

/// A point in normalised image coordinates (`y` grows downwards).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub x: f32,
    pub y: f32,
}

/// An axis-aligned rectangle in normalised coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub left: f32,
    pub top: f32,
    pub right: f32,
    pub bottom: f32,
}

impl Rect {
    /// The empty space between two rectangles along the axis where they are
    /// furthest apart: positive when they are disjoint, negative when they overlap.
    pub fn gap(&self, other: &Rect) -> f32 {
        let horizontal = (other.left - self.right).max(self.left - other.right);
        let vertical = (other.top - self.bottom).max(self.top - other.bottom);
        horizontal.max(vertical)
    }
}

/// One drawn object.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub centre: Point,
    /// Half the side of the square the shape fits in, as a fraction of the image side.
    pub half_extent: f32,
}

impl Object {
    /// The square the shape is drawn inside.
    pub fn bounds(&self) -> Rect {
        let (c, h) = (self.centre, self.half_extent);
        Rect { left: c.x - h, top: c.y - h, right: c.x + h, bottom: c.y + h }
    }
}

/// A complete picture: background plus objects, drawn in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Colour,
    pub objects: Vec<Object>,
}

impl Scene {
    /// The smallest gap between any two objects' footprints (`None` with fewer
    /// than two objects); positive means no two objects touch.
    pub fn min_gap(&self) -> Option<f32> {
        let mut best: Option<f32> = None;
        for (i, a) in self.objects.iter().enumerate() {
            for b in &self.objects[i + 1..] {
                let g = a.bounds().gap(&b.bounds());
                best = Some(best.map_or(g, |m| m.min(g)));
            }
        }
        best
    }

    /// Whether every object lies fully inside the image.
    pub fn fits_canvas(&self) -> bool {
        self.objects.iter().all(|o| {
            let r = o.bounds();
            r.left >= 0.0 && r.top >= 0.0 && r.right <= 1.0 && r.bottom <= 1.0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_and_backgrounds_never_share_a_colour() {
        for c in Colour::ALL {
            assert_ne!(Colour::OBJECTS.contains(&c), Colour::BACKGROUNDS.contains(&c), "{c:?}");
        }
    }

    #[test]
    fn colours_are_far_apart_and_sizes_do_not_overlap() {
        for (i, a) in Colour::ALL.iter().enumerate() {
            for b in &Colour::ALL[i + 1..] {
                let d: i32 = a.rgb().iter().zip(b.rgb()).map(|(&x, y)| (x as i32 - y as i32).abs()).sum();
                assert!(d >= 100, "{a:?} and {b:?} are too close ({d})");
            }
        }
        for w in Size::ALL.windows(2) {
            let top = w[0].half_extent() * (1.0 + Size::JITTER);
            let bottom = w[1].half_extent() * (1.0 - Size::JITTER);
            assert!(top < bottom, "{:?} and {:?} overlap", w[0], w[1]);
        }
    }

    #[test]
    fn gaps_are_signed() {
        let a = Rect { left: 0.0, top: 0.0, right: 0.2, bottom: 0.2 };
        let b = Rect { left: 0.3, top: 0.1, right: 0.5, bottom: 0.3 };
        assert!((a.gap(&b) - 0.1).abs() < 1e-6);
        let c = Rect { left: 0.1, top: 0.1, right: 0.3, bottom: 0.3 };
        assert!(a.gap(&c) < 0.0);
    }
}

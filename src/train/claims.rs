//! What a caption asserts about its scene, as data, and the geometry that
//! decides whether each assertion is true.
//!
//! Captions are written from claims (never the other way round), so checking
//! a caption means checking its claims against the scene. There are two
//! thresholds per spatial word: the *truth* rule here (what an evaluator may
//! rely on: "above" means the footprints are vertically disjoint and the
//! offset is mostly vertical) and a stricter *clear* rule the layout samples
//! with, so no generated scene sits near the boundary of its own words.

use serde::{Deserialize, Serialize};

use super::scene::{Colour, Object, Point, Scene, Shape, Size};

/// Where in the image an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    Left,
    Right,
    Top,
    Bottom,
    Centre,
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

/// Outside this band around ½ a coordinate counts as left/right or top/bottom.
const SIDE: f32 = 0.1;
/// Within this distance of ½ on both axes counts as the centre.
const CENTRE: f32 = 0.12;

impl Place {
    pub const ALL: [Place; 9] = [
        Place::Left,
        Place::Right,
        Place::Top,
        Place::Bottom,
        Place::Centre,
        Place::TopLeft,
        Place::TopRight,
        Place::BottomLeft,
        Place::BottomRight,
    ];

    /// Whether an object centred at `p` is at this place.
    pub fn holds(self, p: Point) -> bool {
        let (left, right) = (p.x < 0.5 - SIDE, p.x > 0.5 + SIDE);
        let (top, bottom) = (p.y < 0.5 - SIDE, p.y > 0.5 + SIDE);
        match self {
            Place::Left => left,
            Place::Right => right,
            Place::Top => top,
            Place::Bottom => bottom,
            Place::Centre => (p.x - 0.5).abs() < CENTRE && (p.y - 0.5).abs() < CENTRE,
            Place::TopLeft => top && left,
            Place::TopRight => top && right,
            Place::BottomLeft => bottom && left,
            Place::BottomRight => bottom && right,
        }
    }

    /// The ranges of centre `x` and `y` the layout samples for this place: well
    /// inside the truth rule, and for a side, near the middle of the other axis
    /// so that "on the left" and "in the top left" look different.
    pub(crate) fn region(self) -> ([f32; 2], [f32; 2]) {
        const LOW: [f32; 2] = [0.0, 0.3];
        const HIGH: [f32; 2] = [0.7, 1.0];
        const MID: [f32; 2] = [0.4, 0.6];
        const CORE: [f32; 2] = [0.45, 0.55];
        match self {
            Place::Left => (LOW, MID),
            Place::Right => (HIGH, MID),
            Place::Top => (MID, LOW),
            Place::Bottom => (MID, HIGH),
            Place::Centre => (CORE, CORE),
            Place::TopLeft => (LOW, LOW),
            Place::TopRight => (HIGH, LOW),
            Place::BottomLeft => (LOW, HIGH),
            Place::BottomRight => (HIGH, HIGH),
        }
    }
}

/// How one object stands relative to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
    /// Side by side horizontally and close.
    NextTo,
}

/// "Next to" means at most this far apart (footprint edge to edge).
const NEXT_TO_MAX_GAP: f32 = 0.25;

impl Relation {
    pub const ALL: [Relation; 5] = [Relation::Above, Relation::Below, Relation::LeftOf, Relation::RightOf, Relation::NextTo];

    /// Truth rule: `a` is `self` `b` when their footprints are disjoint along
    /// the relation's axis and the offset between centres is mostly along it.
    pub fn holds(self, a: &Object, b: &Object) -> bool {
        self.holds_with(a, b, 0.0, 1.0)
    }

    /// Sampling rule: as [`Relation::holds`], with a visible gap and an offset
    /// at least twice as long along the axis as across it.
    pub(crate) fn holds_clearly(self, a: &Object, b: &Object) -> bool {
        self.holds_with(a, b, 0.05, 2.0) && (self != Relation::NextTo || horizontal_gap(a, b) <= 0.18)
    }

    fn holds_with(self, a: &Object, b: &Object, min_gap: f32, dominance: f32) -> bool {
        let (ra, rb) = (a.bounds(), b.bounds());
        let dx = b.centre.x - a.centre.x;
        let dy = b.centre.y - a.centre.y;
        let vertical = |dy: f32| dy > dominance * dx.abs();
        let horizontal = |dx: f32| dx > dominance * dy.abs();
        match self {
            Relation::Above => rb.top - ra.bottom > min_gap && vertical(dy),
            Relation::Below => ra.top - rb.bottom > min_gap && vertical(-dy),
            Relation::LeftOf => rb.left - ra.right > min_gap && horizontal(dx),
            Relation::RightOf => ra.left - rb.right > min_gap && horizontal(-dx),
            Relation::NextTo => {
                (Relation::LeftOf.holds_with(a, b, min_gap, dominance) || Relation::RightOf.holds_with(a, b, min_gap, dominance))
                    && horizontal_gap(a, b) <= NEXT_TO_MAX_GAP
            }
        }
    }
}

fn horizontal_gap(a: &Object, b: &Object) -> f32 {
    let (ra, rb) = (a.bounds(), b.bounds());
    (rb.left - ra.right).max(ra.left - rb.right)
}

/// A description that picks out objects: shape and colour, and the size
/// class when the caption mentions it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Referent {
    pub shape: Shape,
    pub colour: Colour,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
}

impl Referent {
    pub fn matches(&self, o: &Object) -> bool {
        o.shape == self.shape && o.colour == self.colour && self.size.is_none_or(|s| s == o.size)
    }

    /// The description in canonical words, for messages.
    pub fn describe(&self) -> String {
        let size = self.size.map_or(String::new(), |s| format!("{} ", s.name()));
        format!("{size}{} {}", self.colour.name(), self.shape.name())
    }
}

/// One assertion a caption makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "claim", rename_all = "snake_case")]
pub enum Claim {
    /// Exactly `count` objects fit `what`.
    Count { what: Referent, count: usize },
    /// The one object fitting `what` is at `place`.
    At { what: Referent, place: Place },
    /// The one object fitting `subject` is `relation` the one fitting `object`.
    Related { subject: Referent, relation: Relation, object: Referent },
    /// The background has this colour.
    Background { colour: Colour },
}

/// Why a claim is false of a scene.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error("expected {expected} × {what}, found {found}")]
    Count { what: String, expected: usize, found: usize },
    #[error("\"{what}\" should pick out one object, it fits {found}")]
    NotUnique { what: String, found: usize },
    #[error("the {what} at ({x:.2}, {y:.2}) is not {place:?}")]
    Place { what: String, place: Place, x: f32, y: f32 },
    #[error("the {subject} is not {relation:?} the {object}")]
    Relation { subject: String, relation: Relation, object: String },
    #[error("the background is {found:?}, not {expected:?}")]
    Background { expected: Colour, found: Colour },
}

impl Claim {
    /// Checks the claim against `scene`.
    pub fn verify(&self, scene: &Scene) -> Result<(), Violation> {
        match self {
            Claim::Count { what, count } => {
                let found = scene.objects.iter().filter(|o| what.matches(o)).count();
                if found == *count {
                    Ok(())
                } else {
                    Err(Violation::Count { what: what.describe(), expected: *count, found })
                }
            }
            Claim::At { what, place } => {
                let o = unique(scene, what)?;
                if place.holds(o.centre) {
                    Ok(())
                } else {
                    Err(Violation::Place { what: what.describe(), place: *place, x: o.centre.x, y: o.centre.y })
                }
            }
            Claim::Related { subject, relation, object } => {
                let (a, b) = (unique(scene, subject)?, unique(scene, object)?);
                if relation.holds(a, b) {
                    Ok(())
                } else {
                    Err(Violation::Relation { subject: subject.describe(), relation: *relation, object: object.describe() })
                }
            }
            Claim::Background { colour } if *colour == scene.background => Ok(()),
            Claim::Background { colour } => Err(Violation::Background { expected: *colour, found: scene.background }),
        }
    }
}

fn unique<'a>(scene: &'a Scene, what: &Referent) -> Result<&'a Object, Violation> {
    let mut fits = scene.objects.iter().filter(|o| what.matches(o));
    match (fits.next(), fits.count()) {
        (Some(o), 0) => Ok(o),
        (first, rest) => Err(Violation::NotUnique { what: what.describe(), found: first.map_or(0, |_| 1 + rest) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(shape: Shape, x: f32, y: f32) -> Object {
        Object { shape, colour: Colour::Red, size: Size::Small, centre: Point { x, y }, half_extent: 0.1 }
    }

    #[test]
    fn relations_follow_the_geometry() {
        let (a, b) = (at(Shape::Circle, 0.5, 0.2), at(Shape::Square, 0.55, 0.7));
        assert!(Relation::Above.holds(&a, &b) && Relation::Below.holds(&b, &a));
        assert!(!Relation::LeftOf.holds(&a, &b) && !Relation::NextTo.holds(&a, &b));
        // Diagonal, a little steeper than 45°: above, and not also left of.
        let c = at(Shape::Star, 0.8, 0.5);
        let d = at(Shape::Star, 0.5, 0.15);
        assert!(Relation::Above.holds(&d, &c) && !Relation::LeftOf.holds(&d, &c));
        // Footprints side by side vertically overlap: not above, however far right.
        let e = at(Shape::Star, 0.2, 0.42);
        assert!(!Relation::Above.holds(&e, &c) && Relation::LeftOf.holds(&e, &c));
        // Side by side and close: next to; far apart: only left of.
        let (f, g, h) = (at(Shape::Ring, 0.2, 0.5), at(Shape::Ring, 0.45, 0.52), at(Shape::Ring, 0.9, 0.5));
        assert!(Relation::NextTo.holds(&f, &g) && Relation::NextTo.holds(&g, &f));
        assert!(Relation::LeftOf.holds(&f, &h) && !Relation::NextTo.holds(&f, &h));
    }

    #[test]
    fn claims_report_what_is_wrong() {
        let scene = Scene { background: Colour::White, objects: vec![at(Shape::Circle, 0.2, 0.2), at(Shape::Circle, 0.8, 0.8)] };
        let circle = Referent { shape: Shape::Circle, colour: Colour::Red, size: None };
        assert_eq!(Claim::Count { what: circle, count: 2 }.verify(&scene), Ok(()));
        assert!(matches!(
            Claim::At { what: circle, place: Place::TopLeft }.verify(&scene),
            Err(Violation::NotUnique { found: 2, .. })
        ));
        let large = Referent { size: Some(Size::Large), ..circle };
        assert!(matches!(Claim::Count { what: large, count: 1 }.verify(&scene), Err(Violation::Count { found: 0, .. })));
        assert!(Claim::Background { colour: Colour::Black }.verify(&scene).is_err());
    }
}

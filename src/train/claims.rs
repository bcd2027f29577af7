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

use super::scene::{Colour, Object, Scene, Shape};

/// How one object stands relative to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    pub const ALL: [Relation; 4] = [Relation::Above, Relation::Below, Relation::LeftOf, Relation::RightOf];

    /// The relation with subject and object exchanged ("above" ↔ "below").
    pub fn opposite(self) -> Relation {
        match self {
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
        }
    }

    /// Truth rule: `a` is `self` `b` when their footprints are disjoint along
    /// the relation's axis and the offset between centres is mostly along it.
    pub fn holds(self, a: &Object, b: &Object) -> bool {
        self.holds_with(a, b, 0.0, 1.0)
    }

    /// Sampling rule: as [`Relation::holds`], with a visible gap and an offset
    /// at least twice as long along the axis as across it.
    pub(crate) fn holds_clearly(self, a: &Object, b: &Object) -> bool {
        self.holds_with(a, b, 0.05, 2.0)
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
        }
    }
}

/// A description that picks out objects: a colour and a shape, which every
/// caption gives for every object it mentions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Referent {
    pub shape: Shape,
    pub colour: Colour,
}

impl Referent {
    pub fn matches(&self, o: &Object) -> bool {
        o.shape == self.shape && o.colour == self.colour
    }

    /// The description in canonical words, for messages.
    pub fn describe(&self) -> String {
        format!("{} {}", self.colour.name(), self.shape.name())
    }
}

/// One assertion a caption makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "claim", rename_all = "snake_case")]
pub enum Claim {
    /// Exactly `count` objects fit `what`.
    Count { what: Referent, count: usize },
    /// The one object fitting `subject` is `relation` the one fitting `object`.
    Related { subject: Referent, relation: Relation, object: Referent },
}

/// Why a claim is false of a scene.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error("expected {expected} × {what}, found {found}")]
    Count { what: String, expected: usize, found: usize },
    #[error("\"{what}\" should pick out one object, it fits {found}")]
    NotUnique { what: String, found: usize },
    #[error("the {subject} is not {relation:?} the {object}")]
    Relation { subject: String, relation: Relation, object: String },
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
            Claim::Related { subject, relation, object } => {
                let (a, b) = (unique(scene, subject)?, unique(scene, object)?);
                if relation.holds(a, b) {
                    Ok(())
                } else {
                    Err(Violation::Relation { subject: subject.describe(), relation: *relation, object: object.describe() })
                }
            }
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
    use crate::train::scene::{Point, Size};

    fn at(shape: Shape, x: f32, y: f32) -> Object {
        Object { shape, colour: Colour::Red, size: Size::Small, centre: Point { x, y }, half_extent: 0.1 }
    }

    #[test]
    fn relations_follow_the_geometry() {
        let (a, b) = (at(Shape::Circle, 0.5, 0.2), at(Shape::Square, 0.55, 0.7));
        assert!(Relation::Above.holds(&a, &b) && Relation::Below.holds(&b, &a));
        assert!(!Relation::LeftOf.holds(&a, &b));
        // Diagonal, a little steeper than 45°: above, and not also left of.
        let c = at(Shape::Star, 0.8, 0.5);
        let d = at(Shape::Star, 0.5, 0.15);
        assert!(Relation::Above.holds(&d, &c) && !Relation::LeftOf.holds(&d, &c));
        // Footprints side by side vertically overlap: not above, however far right.
        let e = at(Shape::Star, 0.2, 0.42);
        assert!(!Relation::Above.holds(&e, &c) && Relation::LeftOf.holds(&e, &c));
        // The clear rule wants a visible gap where the truth rule is satisfied by any.
        let (f, g) = (at(Shape::Ring, 0.2, 0.5), at(Shape::Ring, 0.42, 0.52));
        assert!(Relation::LeftOf.holds(&f, &g) && !Relation::LeftOf.holds_clearly(&f, &g));
        assert!(Relation::RightOf.holds_clearly(&at(Shape::Ring, 0.8, 0.5), &f));
    }

    #[test]
    fn claims_report_what_is_wrong() {
        let scene = Scene { background: Colour::White, objects: vec![at(Shape::Circle, 0.2, 0.2), at(Shape::Circle, 0.8, 0.8)] };
        let circle = Referent { shape: Shape::Circle, colour: Colour::Red };
        assert_eq!(Claim::Count { what: circle, count: 2 }.verify(&scene), Ok(()));
        let square = Referent { shape: Shape::Square, colour: Colour::Red };
        assert!(matches!(
            Claim::Related { subject: circle, relation: Relation::Above, object: square }.verify(&scene),
            Err(Violation::NotUnique { found: 2, .. })
        ));
        let blue = Referent { colour: Colour::Blue, ..circle };
        assert!(matches!(Claim::Count { what: blue, count: 1 }.verify(&scene), Err(Violation::Count { found: 0, .. })));
    }
}

//! The benchmark's prompts: six categories after GenEval's, each case a
//! description worded by the dataset's own captioner (so the model is asked in
//! words it was trained on), the claims that wording makes, and a scene that
//! satisfies them for validating the detector.
//!
//! | Category | Prompt | Judged (see `score`) |
//! |---|---|---|
//! | `single_object` | "a red circle", every shape in turn | one object of that shape |
//! | `colour` | "a purple star", every colour in turn | one object of that shape *and* colour |
//! | `two_objects` | "a red circle and a blue square" | both shapes, once each |
//! | `counting` | "three green stars", two to four | exactly that many of that shape |
//! | `position` | "a red circle above a blue square" | both shapes, and the relation |
//! | `colour_attribution` | "a red circle and a blue triangle" | both, each in its own colour |
//!
//! Colour attribution always uses two shapes *and* two colours, so an image
//! with the colours swapped fails it. Case `i` of a category depends only on
//! the seed, the category and `i`, so a longer suite extends a shorter one.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::train::caption::caption;
use crate::train::claims::{Claim, Referent, Relation};
use crate::train::layout::{self, Content, Description, MAX_COUNT, MIN_GAP};
use crate::train::scene::{Colour, Object, Point, Scene, Shape, Size};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    SingleObject,
    Colour,
    TwoObjects,
    Counting,
    Position,
    ColourAttribution,
}

impl Category {
    pub const ALL: [Category; 6] = [
        Category::SingleObject,
        Category::Colour,
        Category::TwoObjects,
        Category::Counting,
        Category::Position,
        Category::ColourAttribution,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::SingleObject => "single_object",
            Category::Colour => "colour",
            Category::TwoObjects => "two_objects",
            Category::Counting => "counting",
            Category::Position => "position",
            Category::ColourAttribution => "colour_attribution",
        }
    }

    /// Whether colours are judged. As in GenEval, only the two colour
    /// categories do; the others ask about shapes, counts and places, so a
    /// wrong colour is not counted twice.
    pub fn judges_colour(self) -> bool {
        matches!(self, Category::Colour | Category::ColourAttribution)
    }
}

/// One prompt of the benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub category: Category,
    /// Position within its category.
    pub index: usize,
    pub prompt: String,
    pub description: Description,
    /// What the prompt asserts (`description.claims()`).
    pub claims: Vec<Claim>,
    /// A scene the prompt is true of, laid out as the dataset lays out scenes.
    pub scene: Scene,
}

impl Case {
    /// How many objects the prompt asks for in all.
    pub fn expected_objects(&self) -> usize {
        self.claims.iter().map(|c| if let Claim::Count { count, .. } = c { *count } else { 0 }).sum()
    }
}

/// `per_category` cases of every category, category by category.
pub fn suite(seed: u64, per_category: usize) -> Vec<Case> {
    Category::ALL.iter().flat_map(|&category| (0..per_category).map(move |i| case(seed, category, i))).collect()
}

/// Case `index` of `category`.
pub fn case(seed: u64, category: Category, index: usize) -> Case {
    let mut rng = stream(seed, category, index, 0);
    let content = content(category, index, &mut rng);
    let description = Description { content };
    let claims = description.claims();
    let scene = layout(&description, &claims, &mut rng);
    let prompt = caption(&description, &mut stream(seed, category, index, 1));
    Case { category, index, prompt, description, claims, scene }
}

/// A generator for one case's stream (0: content and layout, 1: wording), so
/// rewording never moves an object. SplitMix64 of the four numbers.
fn stream(seed: u64, category: Category, index: usize, which: u64) -> Xoshiro256PlusPlus {
    let mut z = seed;
    for part in [category as u64, index as u64, which] {
        z = (z ^ part).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    Xoshiro256PlusPlus::seed_from_u64(z)
}

fn content(category: Category, index: usize, rng: &mut impl Rng) -> Content {
    let colour = |rng: &mut _| *Colour::OBJECTS.choose(rng).expect("colours");
    let one = |shape, colour| Referent { shape, colour };
    match category {
        Category::SingleObject => {
            let shape = Shape::ALL[index % Shape::ALL.len()];
            Content::Single { what: one(shape, colour(rng)) }
        }
        Category::Colour => {
            let shape = *Shape::ALL.choose(rng).expect("shapes");
            Content::Single { what: one(shape, Colour::OBJECTS[index % Colour::OBJECTS.len()]) }
        }
        Category::TwoObjects => {
            let [a, b] = two_shapes(rng);
            Content::Groups { groups: vec![(one(a, colour(rng)), 1), (one(b, colour(rng)), 1)] }
        }
        Category::Counting => {
            let what = one(*Shape::ALL.choose(rng).expect("shapes"), colour(rng));
            Content::Groups { groups: vec![(what, 2 + index % (MAX_COUNT - 1))] }
        }
        Category::Position => {
            let [a, b] = two_shapes(rng);
            let relation = Relation::ALL[index % Relation::ALL.len()];
            Content::Pair { subject: one(a, colour(rng)), relation, object: one(b, colour(rng)) }
        }
        Category::ColourAttribution => {
            let [a, b] = two_shapes(rng);
            let first = colour(rng);
            let second = loop {
                let c = colour(rng);
                if c != first {
                    break c;
                }
            };
            Content::Groups { groups: vec![(one(a, first), 1), (one(b, second), 1)] }
        }
    }
}

fn two_shapes(rng: &mut impl Rng) -> [Shape; 2] {
    let mut picked = Shape::ALL.choose_multiple(rng, 2);
    [*picked.next().expect("two shapes"), *picked.next().expect("two shapes")]
}

/// A scene the description is true of, laid out by the dataset's rules: a
/// neutral background, one size class per group (as `layout::random_size`
/// picks them), centres by rejection until every object keeps [`MIN_GAP`]
/// from the others, every claim verifies and a relation holds by the
/// layout's stricter "clear" rule.
fn layout(description: &Description, claims: &[Claim], rng: &mut impl Rng) -> Scene {
    let wanted = description.wanted();
    let total: usize = wanted.iter().map(|(_, n)| n).sum();
    let background = *Colour::BACKGROUNDS.choose(rng).expect("backgrounds");
    for _ in 0..10_000 {
        let mut objects: Vec<Object> = Vec::with_capacity(total);
        for (what, count) in &wanted {
            let size: Size = layout::random_size(rng, total);
            for _ in 0..*count {
                let half = layout::random_half_extent(rng, size);
                let mut at = || layout::within(rng, half).expect("every size fits the canvas");
                let centre = Point { x: at(), y: at() };
                objects.push(Object { shape: what.shape, colour: what.colour, size, centre, half_extent: half });
            }
        }
        let scene = Scene { background, objects };
        let clear = match &description.content {
            Content::Pair { relation, .. } => relation.holds_clearly(&scene.objects[0], &scene.objects[1]),
            _ => true,
        };
        if clear && scene.min_gap().is_none_or(|g| g >= MIN_GAP) && claims.iter().all(|c| c.verify(&scene).is_ok()) {
            return scene;
        }
    }
    unreachable!("at most four small or medium objects always fit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_are_deterministic_and_extend() {
        let short = suite(7, 3);
        let long = suite(7, 5);
        assert_eq!(short.len(), 18);
        for case in &short {
            assert!(long.contains(case));
        }
        assert_ne!(suite(8, 3), short);
    }

    #[test]
    fn every_case_is_true_of_its_scene_and_worded_from_its_description() {
        for case in suite(0, 24) {
            for claim in &case.claims {
                assert!(claim.verify(&case.scene).is_ok(), "{}: {claim:?}", case.prompt);
            }
            assert_eq!(case.scene.objects.len(), case.expected_objects(), "{}", case.prompt);
            assert!(case.scene.objects.iter().all(|o| o.colour != case.scene.background));
            if case.category == Category::ColourAttribution {
                let [a, b] = &case.scene.objects[..] else { panic!("{}", case.prompt) };
                assert!(a.shape != b.shape && a.colour != b.colour, "{}", case.prompt);
            }
        }
    }

    #[test]
    fn categories_cycle_through_what_they_test() {
        let shapes: Vec<Shape> = (0..6).map(|i| case(0, Category::SingleObject, i).scene.objects[0].shape).collect();
        assert_eq!(shapes, Shape::ALL);
        let colours: Vec<Colour> = (0..6).map(|i| case(0, Category::Colour, i).scene.objects[0].colour).collect();
        assert_eq!(colours, Colour::OBJECTS);
        let counts: Vec<usize> = (0..3).map(|i| case(0, Category::Counting, i).expected_objects()).collect();
        assert_eq!(counts, [2, 3, 4]);
    }
}

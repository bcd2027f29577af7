//! Sampling a scene together with what its caption will say about it.
//!
//! The layout first decides the *description* (one object somewhere, two
//! objects in a relation, counted groups, objects at named places), then
//! places objects by rejection sampling until the description holds by the
//! strict "clear" rules of `claims.rs` and no two footprints come closer than
//! [`MIN_GAP`]. Every object in the scene is part of the description, so the
//! caption is a complete account of the picture, not just a true one.

use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::claims::{Claim, Place, Referent, Relation};
use super::scene::{Colour, Object, Point, Scene, Shape, Size};

/// Smallest empty space between two footprints (≈ 1.6 px at 32 px).
pub const MIN_GAP: f32 = 0.05;
/// Objects keep this far from the image border.
const BORDER: f32 = 0.03;
/// Placement tries per description before giving up on its sizes.
const TRIES: usize = 400;

/// What the caption conveys, before any wording is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Content {
    /// One object, perhaps at a named place.
    Single { what: Referent, place: Option<Place> },
    /// Two objects and how the first stands relative to the second.
    Pair { subject: Referent, relation: Relation, object: Referent },
    /// Groups of alike objects with their counts.
    Groups { groups: Vec<(Referent, usize)> },
    /// Single objects, each at a named place.
    Placed { objects: Vec<(Referent, Place)> },
}

/// The content plus whether the background is mentioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Description {
    pub content: Content,
    pub background: Option<Colour>,
}

impl Description {
    /// The claims a caption of this description makes.
    pub fn claims(&self) -> Vec<Claim> {
        let one = |what: &Referent| Claim::Count { what: *what, count: 1 };
        let mut claims = match &self.content {
            Content::Single { what, place } => {
                let mut c = vec![one(what)];
                c.extend(place.map(|place| Claim::At { what: *what, place }));
                c
            }
            Content::Pair { subject, relation, object } => {
                vec![one(subject), one(object), Claim::Related { subject: *subject, relation: *relation, object: *object }]
            }
            Content::Groups { groups } => groups.iter().map(|(what, count)| Claim::Count { what: *what, count: *count }).collect(),
            Content::Placed { objects } => {
                objects.iter().flat_map(|(what, place)| [one(what), Claim::At { what: *what, place: *place }]).collect()
            }
        };
        claims.extend(self.background.map(|colour| Claim::Background { colour }));
        claims
    }
}

/// One object to place: what it is and where its centre may go.
struct Spec {
    shape: Shape,
    colour: Colour,
    size: Size,
    region: ([f32; 2], [f32; 2]),
}

const ANYWHERE: ([f32; 2], [f32; 2]) = ([0.0, 1.0], [0.0, 1.0]);

/// Pairs of places two objects can hold at once without crowding.
const PLACE_PAIRS: [(Place, Place); 8] = [
    (Place::Left, Place::Right),
    (Place::Top, Place::Bottom),
    (Place::TopLeft, Place::BottomRight),
    (Place::TopRight, Place::BottomLeft),
    (Place::TopLeft, Place::TopRight),
    (Place::BottomLeft, Place::BottomRight),
    (Place::TopLeft, Place::BottomLeft),
    (Place::TopRight, Place::BottomRight),
];

/// Samples a scene and its description. Deterministic in `rng`.
pub fn sample(rng: &mut impl Rng) -> (Scene, Description) {
    let background = pick_background(rng);
    // Each failed attempt advances `rng`, so the next one differs; the layouts
    // are loose enough that a second attempt is already rare.
    for _ in 0..1000 {
        if let Some(found) = attempt(rng, background) {
            return found;
        }
    }
    unreachable!("the layout constants leave room for every description")
}

fn pick_background(rng: &mut impl Rng) -> Colour {
    match rng.random_range(0..100) {
        0..35 => Colour::White,
        35..60 => Colour::Black,
        60..75 => Colour::Grey,
        _ => *Colour::ALL.choose(rng).expect("colours"),
    }
}

fn attempt(rng: &mut impl Rng, background: Colour) -> Option<(Scene, Description)> {
    let mention_background = rng.random_bool(0.4);
    let kind = rng.random_range(0..100);
    let (content, objects) = match kind {
        0..20 => single(rng, background)?,
        20..55 => pair(rng, background)?,
        55..85 => groups(rng, background)?,
        _ => placed(rng, background)?,
    };
    let description = Description { content, background: mention_background.then_some(background) };
    Some((Scene { background, objects }, description))
}

fn single(rng: &mut impl Rng, background: Colour) -> Option<(Content, Vec<Object>)> {
    let (shape, colour) = kinds(rng, background, 1)[0];
    let size = *Size::ALL.choose(rng)?;
    let place = rng.random_bool(0.75).then(|| *Place::ALL.choose(rng).expect("places"));
    let region = place.map_or(ANYWHERE, Place::region);
    let objects = arrange(rng, &[Spec { shape, colour, size, region }], |_| true)?;
    let what = referent(rng, shape, colour, size);
    Some((Content::Single { what, place }, objects))
}

fn pair(rng: &mut impl Rng, background: Colour) -> Option<(Content, Vec<Object>)> {
    let chosen = kinds(rng, background, 2);
    let relation = *Relation::ALL.choose(rng)?;
    let specs: Vec<Spec> =
        chosen.iter().map(|&(shape, colour)| Spec { shape, colour, size: random_size(rng, 2), region: ANYWHERE }).collect();
    let objects = arrange(rng, &specs, |o| relation.holds_clearly(&o[0], &o[1]))?;
    let subject = referent(rng, specs[0].shape, specs[0].colour, specs[0].size);
    let object = referent(rng, specs[1].shape, specs[1].colour, specs[1].size);
    Some((Content::Pair { subject, relation, object }, objects))
}

fn groups(rng: &mut impl Rng, background: Colour) -> Option<(Content, Vec<Object>)> {
    // Half the time one counted group ("three blue stars"), else a list of
    // two or three groups with at most four objects in all.
    let counts: Vec<usize> = if rng.random_bool(0.5) {
        vec![rng.random_range(2..=4)]
    } else {
        let n = rng.random_range(2..=3);
        let mut counts = vec![1; n];
        for _ in 0..rng.random_range(0..=(4 - n)) {
            counts[rng.random_range(0..n)] += 1;
        }
        counts
    };
    let total: usize = counts.iter().sum();
    let chosen = kinds(rng, background, counts.len());
    let mut specs = Vec::new();
    let mut groups = Vec::new();
    for (&(shape, colour), &count) in chosen.iter().zip(&counts) {
        let size = random_size(rng, total);
        specs.extend((0..count).map(|_| Spec { shape, colour, size, region: ANYWHERE }));
        groups.push((referent(rng, shape, colour, size), count));
    }
    let objects = arrange(rng, &specs, |_| true)?;
    Some((Content::Groups { groups }, objects))
}

fn placed(rng: &mut impl Rng, background: Colour) -> Option<(Content, Vec<Object>)> {
    let (a, b) = *PLACE_PAIRS.choose(rng)?;
    let places = if rng.random_bool(0.5) { [a, b] } else { [b, a] };
    let chosen = kinds(rng, background, 2);
    let specs: Vec<Spec> = chosen
        .iter()
        .zip(places)
        .map(|(&(shape, colour), place)| Spec { shape, colour, size: random_size(rng, 2), region: place.region() })
        .collect();
    let objects = arrange(rng, &specs, |_| true)?;
    let described = specs.iter().zip(places).map(|(s, place)| (referent(rng, s.shape, s.colour, s.size), place)).collect();
    Some((Content::Placed { objects: described }, objects))
}

/// `n` distinct (shape, colour) kinds, none in the background colour, so each
/// description picks out exactly its own objects.
fn kinds(rng: &mut impl Rng, background: Colour, n: usize) -> Vec<(Shape, Colour)> {
    let mut chosen: Vec<(Shape, Colour)> = Vec::with_capacity(n);
    while chosen.len() < n {
        let shape = *Shape::ALL.choose(rng).expect("shapes");
        let colour = *Colour::ALL.choose(rng).expect("colours");
        if colour != background && !chosen.contains(&(shape, colour)) {
            chosen.push((shape, colour));
        }
    }
    chosen
}

/// Large objects only when there are at most two, so crowded scenes still fit.
fn random_size(rng: &mut impl Rng, objects: usize) -> Size {
    let sizes: &[Size] = if objects <= 2 { &Size::ALL } else { &Size::ALL[..2] };
    *sizes.choose(rng).expect("sizes")
}

/// The referent for an object, naming its size a third of the time.
fn referent(rng: &mut impl Rng, shape: Shape, colour: Colour, size: Size) -> Referent {
    Referent { shape, colour, size: rng.random_bool(0.35).then_some(size) }
}

/// Places `specs` in their regions, apart from each other, satisfying `accept`.
fn arrange(rng: &mut impl Rng, specs: &[Spec], accept: impl Fn(&[Object]) -> bool) -> Option<Vec<Object>> {
    'scene: for _ in 0..TRIES {
        let mut objects: Vec<Object> = Vec::with_capacity(specs.len());
        for spec in specs {
            let half = spec.size.half_extent() * (1.0 + rng.random_range(-Size::JITTER..=Size::JITTER));
            let x = within(rng, spec.region.0, half)?;
            let y = within(rng, spec.region.1, half)?;
            let object =
                Object { shape: spec.shape, colour: spec.colour, size: spec.size, centre: Point { x, y }, half_extent: half };
            if objects.iter().any(|o| o.bounds().gap(&object.bounds()) < MIN_GAP) {
                continue 'scene;
            }
            objects.push(object);
        }
        if accept(&objects) {
            return Some(objects);
        }
    }
    None
}

/// A centre coordinate in `range` that keeps the footprint inside the border.
fn within(rng: &mut impl Rng, range: [f32; 2], half: f32) -> Option<f32> {
    let lo = range[0].max(BORDER + half);
    let hi = range[1].min(1.0 - BORDER - half);
    (lo <= hi).then(|| rng.random_range(lo..=hi))
}

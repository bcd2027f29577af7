//! Sampling a scene together with what its caption will say about it.
//!
//! The layout first decides the *description* (one object, two objects in a
//! relation, two different objects, a counted group of alike ones), then
//! places objects by rejection sampling until the description holds by the
//! strict "clear" rules of `claims.rs` and no two footprints come closer than
//! [`MIN_GAP`]. Every object in the scene is part of the description and every
//! caption names each object's colour and shape, so the caption is a complete
//! account of the picture, not just a true one: attributes a caption leaves
//! out are ones the model has to guess, and learns more slowly (Park et al.
//! 2024). The mix of descriptions follows what the benchmark asks
//! (`eval/suite.rs`), and the backgrounds are neutral colours that no object
//! has.

use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::claims::{Claim, Referent, Relation};
use super::scene::{Colour, Object, Point, Scene, Shape, Size};

/// Smallest empty space between two footprints (≈ 1.6 px at 32 px).
pub const MIN_GAP: f32 = 0.05;
/// Objects keep this far from the image border.
pub const BORDER: f32 = 0.03;
/// Placement tries per description before giving up on its sizes.
const TRIES: usize = 400;

/// What the caption conveys, before any wording is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Content {
    /// One object.
    Single { what: Referent },
    /// Two objects and how the first stands relative to the second.
    Pair { subject: Referent, relation: Relation, object: Referent },
    /// Groups of alike objects with their counts.
    Groups { groups: Vec<(Referent, usize)> },
}

/// Everything a caption says about its scene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Description {
    pub content: Content,
}

impl Description {
    /// The claims a caption of this description makes.
    pub fn claims(&self) -> Vec<Claim> {
        let one = |what: &Referent| Claim::Count { what: *what, count: 1 };
        match &self.content {
            Content::Single { what } => vec![one(what)],
            Content::Pair { subject, relation, object } => {
                vec![one(subject), one(object), Claim::Related { subject: *subject, relation: *relation, object: *object }]
            }
            Content::Groups { groups } => groups.iter().map(|(what, count)| Claim::Count { what: *what, count: *count }).collect(),
        }
    }

    /// The objects the description asks for: (what, how many).
    pub fn wanted(&self) -> Vec<(Referent, usize)> {
        match &self.content {
            Content::Single { what } => vec![(*what, 1)],
            Content::Pair { subject, object, .. } => vec![(*subject, 1), (*object, 1)],
            Content::Groups { groups } => groups.clone(),
        }
    }
}

/// Counted groups hold this many alike objects at most.
pub const MAX_COUNT: usize = 4;

/// How often each kind of description is drawn, as integer weights.
///
/// The default follows the benchmark's categories (`eval/suite.rs`); a run
/// may shift the weight towards the kinds its model has not mastered yet
/// (relations, say, once single objects are drawn without fault). The
/// default draws exactly the samples the dataset always drew, so a seed's
/// stream does not change for runs that do not set a mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    /// One object.
    pub single: u32,
    /// Two objects in a spatial relation.
    pub pair: u32,
    /// Two different objects anywhere.
    pub two_kinds: u32,
    /// A counted group of alike objects.
    pub counted: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self { single: 25, pair: 30, two_kinds: 20, counted: 25 }
    }
}

/// Why a [`Mix`] cannot be sampled from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the description mix needs a positive total weight of at most 1000000 (got {0})")]
pub struct MixError(u64);

impl Mix {
    /// Checks that the weights can be drawn from.
    pub fn validate(&self) -> Result<(), MixError> {
        let total = self.total();
        if total == 0 || total > 1_000_000 {
            return Err(MixError(total));
        }
        Ok(())
    }

    fn total(&self) -> u64 {
        [self.single, self.pair, self.two_kinds, self.counted].iter().map(|&w| u64::from(w)).sum()
    }
}

/// Samples a scene and its description with the default [`Mix`].
/// Deterministic in `rng`.
pub fn sample(rng: &mut impl Rng) -> (Scene, Description) {
    sample_mixed(rng, &Mix::default())
}

/// Samples a scene and its description, the kind of description drawn by
/// `mix` (which must [validate](Mix::validate)). Deterministic in `rng`.
pub fn sample_mixed<R: Rng>(rng: &mut R, mix: &Mix) -> (Scene, Description) {
    let background = *Colour::BACKGROUNDS.choose(rng).expect("backgrounds");
    // Each failed attempt advances `rng`, so the next one differs; the layouts
    // are loose enough that a second attempt is already rare.
    for _ in 0..1000 {
        if let Some((content, objects)) = attempt(rng, mix) {
            return (Scene { background, objects }, Description { content });
        }
    }
    unreachable!("the layout constants leave room for every description")
}

fn attempt<R: Rng>(rng: &mut R, mix: &Mix) -> Option<(Content, Vec<Object>)> {
    // One draw over the summed weights: with the default mix this is the
    // draw from 0..100 the dataset has always made.
    let mut r = rng.random_range(0..mix.total());
    let kinds: [(u32, fn(&mut R) -> Option<(Content, Vec<Object>)>); 4] =
        [(mix.single, single), (mix.pair, pair), (mix.two_kinds, two_kinds), (mix.counted, counted)];
    for (weight, kind) in kinds {
        if r < u64::from(weight) {
            return kind(rng);
        }
        r -= u64::from(weight);
    }
    unreachable!("r is below the total weight")
}

fn single(rng: &mut impl Rng) -> Option<(Content, Vec<Object>)> {
    let what = kinds(rng, 1)[0];
    let size = random_size(rng, 1);
    let objects = arrange(rng, &[(what, size)], |_| true)?;
    Some((Content::Single { what }, objects))
}

fn pair(rng: &mut impl Rng) -> Option<(Content, Vec<Object>)> {
    let [subject, object] = kinds(rng, 2)[..] else { unreachable!("two kinds") };
    let relation = *Relation::ALL.choose(rng)?;
    let specs = [(subject, random_size(rng, 2)), (object, random_size(rng, 2))];
    let objects = arrange(rng, &specs, |o| relation.holds_clearly(&o[0], &o[1]))?;
    Some((Content::Pair { subject, relation, object }, objects))
}

/// "a red circle and a blue square": two different objects anywhere.
fn two_kinds(rng: &mut impl Rng) -> Option<(Content, Vec<Object>)> {
    let chosen = kinds(rng, 2);
    let specs: Vec<(Referent, Size)> = chosen.iter().map(|&what| (what, random_size(rng, 2))).collect();
    let objects = arrange(rng, &specs, |_| true)?;
    Some((Content::Groups { groups: chosen.into_iter().map(|what| (what, 1)).collect() }, objects))
}

/// "three green stars": two to [`MAX_COUNT`] alike objects of one size.
fn counted(rng: &mut impl Rng) -> Option<(Content, Vec<Object>)> {
    let what = kinds(rng, 1)[0];
    let count = rng.random_range(2..=MAX_COUNT);
    let size = random_size(rng, count);
    let objects = arrange(rng, &vec![(what, size); count], |_| true)?;
    Some((Content::Groups { groups: vec![(what, count)] }, objects))
}

/// `n` distinct (shape, colour) kinds, so each referent picks out exactly its
/// own objects.
fn kinds(rng: &mut impl Rng, n: usize) -> Vec<Referent> {
    let mut chosen: Vec<Referent> = Vec::with_capacity(n);
    while chosen.len() < n {
        let shape = *Shape::ALL.choose(rng).expect("shapes");
        let colour = *Colour::OBJECTS.choose(rng).expect("colours");
        let what = Referent { shape, colour };
        if !chosen.contains(&what) {
            chosen.push(what);
        }
    }
    chosen
}

/// A size class for one of `objects` objects (see [`Size::for_scene`]).
pub fn random_size(rng: &mut impl Rng, objects: usize) -> Size {
    *Size::for_scene(objects).choose(rng).expect("sizes")
}

/// A footprint half-extent for an object of class `size`, jittered.
pub fn random_half_extent(rng: &mut impl Rng, size: Size) -> f32 {
    size.half_extent() * (1.0 + rng.random_range(-Size::JITTER..=Size::JITTER))
}

/// Places `specs` anywhere, apart from each other, satisfying `accept`.
fn arrange(rng: &mut impl Rng, specs: &[(Referent, Size)], accept: impl Fn(&[Object]) -> bool) -> Option<Vec<Object>> {
    'scene: for _ in 0..TRIES {
        let mut objects: Vec<Object> = Vec::with_capacity(specs.len());
        for &(what, size) in specs {
            let half = random_half_extent(rng, size);
            let centre = Point { x: within(rng, half)?, y: within(rng, half)? };
            let object = Object { shape: what.shape, colour: what.colour, size, centre, half_extent: half };
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

/// A centre coordinate that keeps the footprint inside the border.
pub fn within(rng: &mut impl Rng, half: f32) -> Option<f32> {
    let (lo, hi) = (BORDER + half, 1.0 - BORDER - half);
    (lo <= hi).then(|| rng.random_range(lo..=hi))
}

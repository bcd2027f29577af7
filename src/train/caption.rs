//! Wording a description: templates, synonyms and optional words.
//!
//! The text encoder is frozen, so the cascade only learns what it sees in
//! captions; varied phrasings of the same content ("a red circle above a blue
//! square", "red disc over a blue box", "an image of …") teach it the meaning
//! rather than one template. Every phrase here is a synonym of exactly one
//! canonical word (shape, colour, size, place, relation), and [`vocabulary`]
//! exposes the lists so tests can read captions back.

use rand::seq::IndexedRandom;
use rand::Rng;

use super::claims::{Place, Referent, Relation};
use super::layout::{Content, Description};
use super::scene::{Colour, Shape, Size};

/// The words for each canonical thing, first entry preferred.
pub mod vocabulary {
    use super::*;

    /// (singular, plural) nouns for a shape.
    pub fn shape(shape: Shape) -> &'static [(&'static str, &'static str)] {
        match shape {
            Shape::Circle => &[("circle", "circles"), ("disc", "discs"), ("dot", "dots")],
            Shape::Square => &[("square", "squares"), ("box", "boxes")],
            Shape::Triangle => &[("triangle", "triangles")],
            Shape::Star => &[("star", "stars")],
            Shape::Ring => &[("ring", "rings"), ("donut", "donuts"), ("hoop", "hoops")],
            Shape::Diamond => &[("diamond", "diamonds"), ("rhombus", "rhombuses")],
            Shape::Cross => &[("cross", "crosses"), ("plus sign", "plus signs")],
            Shape::Heart => &[("heart", "hearts")],
        }
    }

    pub fn colour(colour: Colour) -> &'static [&'static str] {
        match colour {
            Colour::Red => &["red"],
            Colour::Green => &["green"],
            Colour::Blue => &["blue"],
            Colour::Yellow => &["yellow"],
            Colour::Orange => &["orange"],
            Colour::Purple => &["purple", "violet"],
            Colour::White => &["white"],
            Colour::Black => &["black"],
            Colour::Pink => &["pink"],
            Colour::Cyan => &["cyan"],
            Colour::Brown => &["brown"],
            Colour::Grey => &["grey", "gray"],
        }
    }

    pub fn size(size: Size) -> &'static [&'static str] {
        match size {
            Size::Small => &["small", "little", "tiny"],
            Size::Medium => &["medium", "medium-sized", "mid-sized"],
            Size::Large => &["large", "big"],
        }
    }

    /// Phrases that follow a noun phrase ("… in the top left").
    pub fn place(place: Place) -> &'static [&'static str] {
        match place {
            Place::Left => &["on the left", "on the left side", "at the left"],
            Place::Right => &["on the right", "on the right side", "at the right"],
            Place::Top => &["at the top", "near the top", "at the top of the image"],
            Place::Bottom => &["at the bottom", "near the bottom", "at the bottom of the image"],
            Place::Centre => &["in the centre", "in the center", "in the middle"],
            Place::TopLeft => &["in the top left", "in the top left corner", "in the upper left"],
            Place::TopRight => &["in the top right", "in the top right corner", "in the upper right"],
            Place::BottomLeft => &["in the bottom left", "in the bottom left corner", "in the lower left"],
            Place::BottomRight => &["in the bottom right", "in the bottom right corner", "in the lower right"],
        }
    }

    pub fn relation(relation: Relation) -> &'static [&'static str] {
        match relation {
            Relation::Above => &["above", "over", "on top of"],
            Relation::Below => &["below", "under", "beneath", "underneath"],
            Relation::LeftOf => &["to the left of", "left of", "on the left of"],
            Relation::RightOf => &["to the right of", "right of", "on the right of"],
            Relation::NextTo => &["next to", "beside", "alongside"],
        }
    }

    /// Counts from two to four; "a pair of" only for two.
    pub fn count(n: usize) -> &'static [&'static str] {
        match n {
            2 => &["two", "2", "a pair of"],
            3 => &["three", "3"],
            4 => &["four", "4"],
            _ => &[],
        }
    }
}

const PREFIXES: [&str; 4] = ["a picture of ", "an image of ", "a drawing of ", "an illustration of "];
/// `{a}` is the article the colour word takes ("an orange background").
const BACKGROUNDS: [&str; 3] = [" on {a} {} background", " against {a} {} background", ", {} background"];

/// Writes a caption for `description`. Deterministic in `rng`.
pub fn caption(description: &Description, rng: &mut impl Rng) -> String {
    let mut words = Words { rng, articles: true };
    // Headline style ("red circle on top of blue box") drops articles throughout.
    words.articles = !words.rng.random_bool(0.15);
    let prefix = (words.articles && words.rng.random_bool(0.2)).then(|| words.pick(&PREFIXES));
    let body = match &description.content {
        Content::Single { what, place } => {
            let np = words.noun_phrase(what, 1);
            match place {
                // Place first ("in the top left, a red star") only without a prefix.
                Some(p) if prefix.is_none() && words.rng.random_bool(0.25) => format!("{}, {np}", words.pick(vocabulary::place(*p))),
                Some(p) => format!("{np} {}", words.pick(vocabulary::place(*p))),
                None => np,
            }
        }
        Content::Pair { subject, relation, object } => {
            let a = words.noun_phrase(subject, 1);
            let rel = words.pick(vocabulary::relation(*relation));
            let b = words.noun_phrase(object, 1);
            format!("{a} {rel} {b}")
        }
        Content::Groups { groups } => {
            let parts: Vec<String> = groups.iter().map(|(what, n)| words.noun_phrase(what, *n)).collect();
            words.list(parts)
        }
        Content::Placed { objects } => {
            let parts: Vec<String> = objects
                .iter()
                .map(|(what, place)| {
                    let np = words.noun_phrase(what, 1);
                    format!("{np} {}", words.pick(vocabulary::place(*place)))
                })
                .collect();
            words.list(parts)
        }
    };
    let mut text = format!("{}{body}", prefix.unwrap_or(""));
    if let Some(colour) = description.background {
        let template = words.pick(&BACKGROUNDS);
        let word = words.pick(vocabulary::colour(colour));
        text.push_str(&template.replace("{a}", article(word)).replace("{}", word));
    }
    text
}

/// Word choice with one RNG and one article style per caption.
struct Words<'a, R: Rng> {
    rng: &'a mut R,
    articles: bool,
}

impl<R: Rng> Words<'_, R> {
    /// Prefers the first synonym half of the time, so the usual word stays usual.
    fn pick(&mut self, options: &[&'static str]) -> &'static str {
        if options.len() == 1 || self.rng.random_bool(0.5) {
            options[0]
        } else {
            options.choose(self.rng).copied().unwrap_or(options[0])
        }
    }

    /// "a small red circle", "three blue stars", "red box".
    fn noun_phrase(&mut self, what: &Referent, count: usize) -> String {
        let nouns = vocabulary::shape(what.shape);
        let &(singular, plural) =
            if self.rng.random_bool(0.5) { &nouns[0] } else { nouns.choose(self.rng).unwrap_or(&nouns[0]) };
        let mut adjectives = Vec::new();
        if let Some(size) = what.size {
            adjectives.push(self.pick(vocabulary::size(size)));
        }
        adjectives.push(self.pick(vocabulary::colour(what.colour)));
        let head = format!("{} {}", adjectives.join(" "), if count == 1 { singular } else { plural });
        if count == 1 {
            if self.articles {
                format!("{} {head}", article(&head))
            } else {
                head
            }
        } else {
            format!("{} {head}", self.pick(vocabulary::count(count)))
        }
    }

    /// "a, b and c", with or without the Oxford comma; "a with b" for two.
    fn list(&mut self, mut parts: Vec<String>) -> String {
        let Some(last) = parts.pop() else { return String::new() };
        if parts.is_empty() {
            return last;
        }
        let joiner = if parts.len() == 1 && self.rng.random_bool(0.2) { " with " } else { " and " };
        let comma = if parts.len() > 1 && self.rng.random_bool(0.3) { "," } else { "" };
        format!("{}{comma}{joiner}{last}", parts.join(", "))
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    #[test]
    fn pairs_read_naturally() {
        let red_circle = Referent { shape: Shape::Circle, colour: Colour::Red, size: None };
        let orange_box = Referent { shape: Shape::Square, colour: Colour::Orange, size: Some(Size::Small) };
        let description = Description {
            content: Content::Pair { subject: red_circle, relation: Relation::Above, object: orange_box },
            background: Some(Colour::White),
        };
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        for _ in 0..50 {
            let text = caption(&description, &mut rng);
            let above = vocabulary::relation(Relation::Above).iter().any(|w| text.contains(&format!(" {w} ")));
            assert!(above && text.contains("white"), "{text}");
            assert!(!text.contains("an red") && !text.contains("a orange"), "{text}");
        }
    }

    #[test]
    fn articles_follow_the_next_word() {
        assert_eq!(article("orange circle"), "an");
        assert_eq!(article("small orange circle"), "a");
    }
}

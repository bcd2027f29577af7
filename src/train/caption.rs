//! Wording a description: templates, synonyms and optional words.
//!
//! The text encoder is frozen, so the cascade only learns what it sees in
//! captions; varied phrasings of the same content ("a red circle above a blue
//! square", "red disc over a blue box", "an image of …") teach it the meaning
//! rather than one template. Every phrase here is a synonym of exactly one
//! canonical word (shape, colour, relation, count), and [`vocabulary`]
//! exposes the lists so tests can read captions back. The lists are short on
//! purpose: a small model masters a few words for each thing better than it
//! blurs many, and every word here is one the benchmark asks with.

use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::claims::{Referent, Relation};
use super::layout::{Content, Description};
use super::scene::{Colour, Shape};

/// The words for each canonical thing, first entry preferred.
pub mod vocabulary {
    use super::*;

    /// (singular, plural) nouns for a shape.
    pub fn shape(shape: Shape) -> &'static [(&'static str, &'static str)] {
        match shape {
            Shape::Circle => &[("circle", "circles"), ("disc", "discs")],
            Shape::Square => &[("square", "squares"), ("box", "boxes")],
            Shape::Triangle => &[("triangle", "triangles")],
            Shape::Star => &[("star", "stars")],
            Shape::Ring => &[("ring", "rings"), ("donut", "donuts")],
            Shape::Cross => &[("cross", "crosses"), ("plus sign", "plus signs")],
        }
    }

    /// The words for an object colour (backgrounds are never named).
    pub fn colour(colour: Colour) -> &'static [&'static str] {
        match colour {
            Colour::Red => &["red"],
            Colour::Green => &["green"],
            Colour::Blue => &["blue"],
            Colour::Yellow => &["yellow"],
            Colour::Orange => &["orange"],
            Colour::Purple => &["purple"],
            Colour::White | Colour::Black | Colour::Grey => &[],
        }
    }

    pub fn relation(relation: Relation) -> &'static [&'static str] {
        match relation {
            Relation::Above => &["above", "over"],
            Relation::Below => &["below", "under"],
            Relation::LeftOf => &["to the left of", "left of"],
            Relation::RightOf => &["to the right of", "right of"],
        }
    }

    /// Counts from two to four.
    pub fn count(n: usize) -> &'static [&'static str] {
        match n {
            2 => &["two", "2"],
            3 => &["three", "3"],
            4 => &["four", "4"],
            _ => &[],
        }
    }
}

const PREFIXES: [&str; 4] = ["a picture of ", "an image of ", "a drawing of ", "an illustration of "];

/// Which attribute of a referent a mention names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Word {
    Count,
    Colour,
    Shape,
}

/// Where a caption names one attribute of one referent: what a grounding
/// loss ties to that referent's objects (see `train::grounding`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mention {
    /// The referent, in the order of `Description::wanted`.
    pub referent: usize,
    pub word: Word,
    /// Byte offsets of the words in the caption (`start..end`).
    pub start: usize,
    pub end: usize,
}

/// A caption and the mentions in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caption {
    pub text: String,
    pub mentions: Vec<Mention>,
}

impl Caption {
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }

    fn tag(&mut self, s: &str, referent: usize, word: Word) {
        let start = self.text.len();
        self.text.push_str(s);
        self.mentions.push(Mention { referent, word, start, end: self.text.len() });
    }

    fn append(&mut self, other: Caption) {
        let shift = self.text.len();
        self.text.push_str(&other.text);
        self.mentions.extend(other.mentions.into_iter().map(|m| Mention { start: m.start + shift, end: m.end + shift, ..m }));
    }
}

/// Writes a caption for `description`. Deterministic in `rng`.
pub fn caption(description: &Description, rng: &mut impl Rng) -> String {
    worded(description, rng).text
}

/// [`caption`] with the place of every colour, shape and count word in it
/// (the same text for the same `rng`).
pub fn worded(description: &Description, rng: &mut impl Rng) -> Caption {
    let mut words = Words { rng, articles: true };
    // Headline style ("red circle on top of blue box") drops articles throughout.
    words.articles = !words.rng.random_bool(0.15);
    let prefix = (words.articles && words.rng.random_bool(0.2)).then(|| words.pick(&PREFIXES));
    let body = match &description.content {
        Content::Single { what } => words.noun_phrase(what, 1, 0),
        Content::Pair { subject, relation, object } => {
            let mut a = words.noun_phrase(subject, 1, 0);
            let rel = words.pick(vocabulary::relation(*relation));
            let b = words.noun_phrase(object, 1, 1);
            a.push(&format!(" {rel} "));
            a.append(b);
            a
        }
        Content::Groups { groups } => {
            let parts: Vec<Caption> = groups.iter().enumerate().map(|(k, (what, n))| words.noun_phrase(what, *n, k)).collect();
            words.list(parts)
        }
    };
    let mut text = Caption::default();
    text.push(prefix.unwrap_or(""));
    text.append(body);
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
        if options.len() <= 1 || self.rng.random_bool(0.5) {
            options.first().copied().unwrap_or("")
        } else {
            options.choose(self.rng).copied().unwrap_or(options[0])
        }
    }

    /// "a red circle", "three blue stars", "red box", for referent `k`.
    fn noun_phrase(&mut self, what: &Referent, count: usize, k: usize) -> Caption {
        let nouns = vocabulary::shape(what.shape);
        let &(singular, plural) =
            if self.rng.random_bool(0.5) { &nouns[0] } else { nouns.choose(self.rng).unwrap_or(&nouns[0]) };
        let colour = self.pick(vocabulary::colour(what.colour));
        let mut phrase = Caption::default();
        if count == 1 {
            if self.articles {
                phrase.push(article(colour));
                phrase.push(" ");
            }
        } else {
            phrase.tag(self.pick(vocabulary::count(count)), k, Word::Count);
            phrase.push(" ");
        }
        phrase.tag(colour, k, Word::Colour);
        phrase.push(" ");
        phrase.tag(if count == 1 { singular } else { plural }, k, Word::Shape);
        phrase
    }

    /// "a and b", or "a with b"; "a, b and c" for longer lists.
    fn list(&mut self, mut parts: Vec<Caption>) -> Caption {
        let Some(last) = parts.pop() else { return Caption::default() };
        if parts.is_empty() {
            return last;
        }
        let joiner = if parts.len() == 1 && self.rng.random_bool(0.2) { " with " } else { " and " };
        let mut out = Caption::default();
        for (i, part) in parts.into_iter().enumerate() {
            if i > 0 {
                out.push(", ");
            }
            out.append(part);
        }
        out.push(joiner);
        out.append(last);
        out
    }
}

/// `text`, a caption of `description`, with its relation word replaced by
/// the opposite relation's ("a red circle above a blue square" → "… below …"):
/// the same picture described falsely in one word only, which is how
/// validation measures whether a model reads relations. `None` unless the
/// description is a pair and its relation word is found.
pub fn with_opposite_relation(description: &Description, text: &str) -> Option<String> {
    let Content::Pair { relation, .. } = &description.content else { return None };
    let words = vocabulary::relation(*relation);
    let swapped = vocabulary::relation(relation.opposite());
    // The longest phrasing first: "to the left of" also contains "left of".
    let mut order: Vec<usize> = (0..words.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(words[i].len()));
    order.into_iter().find_map(|i| {
        let (from, to) = (format!(" {} ", words[i]), format!(" {} ", swapped[i]));
        text.contains(&from).then(|| text.replacen(&from, &to, 1))
    })
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
        let red_circle = Referent { shape: Shape::Circle, colour: Colour::Red };
        let orange_box = Referent { shape: Shape::Square, colour: Colour::Orange };
        let description = Description { content: Content::Pair { subject: red_circle, relation: Relation::Above, object: orange_box } };
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
        for _ in 0..50 {
            let text = caption(&description, &mut rng);
            let above = vocabulary::relation(Relation::Above).iter().any(|w| text.contains(&format!(" {w} ")));
            assert!(above && text.contains("red") && text.contains("orange"), "{text}");
            assert!(!text.contains("an red") && !text.contains("a orange"), "{text}");
        }
    }

    #[test]
    fn mentions_point_at_their_words() {
        let circle = Referent { shape: Shape::Circle, colour: Colour::Red };
        let star = Referent { shape: Shape::Star, colour: Colour::Red };
        let description = Description { content: Content::Groups { groups: vec![(circle, 1), (star, 3)] } };
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        for _ in 0..50 {
            let before = rng.clone();
            let c = worded(&description, &mut rng);
            assert_eq!(c.text, caption(&description, &mut before.clone()), "the same words either way");
            let said: Vec<(usize, Word, &str)> = c.mentions.iter().map(|m| (m.referent, m.word, &c.text[m.start..m.end])).collect();
            let (circle_noun, stars) = (said[1].2, said[4].2);
            assert!(["circle", "disc"].contains(&circle_noun), "{}", c.text);
            assert_eq!(&said[..], &[(0, Word::Colour, "red"), (0, Word::Shape, circle_noun), (1, Word::Count, said[2].2), (1, Word::Colour, "red"), (1, Word::Shape, stars)]);
            assert!(["three", "3"].contains(&said[2].2) && stars == "stars", "{}", c.text);
        }
    }

    #[test]
    fn the_opposite_relation_changes_one_phrase() {
        let red_circle = Referent { shape: Shape::Circle, colour: Colour::Red };
        let blue_square = Referent { shape: Shape::Square, colour: Colour::Blue };
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        for relation in Relation::ALL {
            let description = Description { content: Content::Pair { subject: red_circle, relation, object: blue_square } };
            for _ in 0..20 {
                let text = caption(&description, &mut rng);
                let swapped = with_opposite_relation(&description, &text).expect("a pair's caption names its relation");
                let opposite = Description { content: Content::Pair { subject: red_circle, relation: relation.opposite(), object: blue_square } };
                assert_eq!(with_opposite_relation(&opposite, &swapped).as_deref(), Some(text.as_str()), "{text} / {swapped}");
                assert!(vocabulary::relation(relation.opposite()).iter().any(|w| swapped.contains(&format!(" {w} "))), "{swapped}");
                assert_ne!(swapped, text);
            }
        }
        let single = Description { content: Content::Single { what: red_circle } };
        assert_eq!(with_opposite_relation(&single, "a red circle"), None);
    }

    #[test]
    fn articles_follow_the_next_word() {
        assert_eq!(article("orange circle"), "an");
        assert_eq!(article("red circle"), "a");
    }
}

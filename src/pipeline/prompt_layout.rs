//! Reading the layout a prompt asks for: the things it names, whether each
//! is one object or several, and at most one spatial relation between two of
//! them. "a red circle above a blue square" names two single things, the
//! first above the second; "a red circle and three blue squares" names one
//! single thing and a group. Layout guidance (`pipeline::layout_guidance`)
//! needs no more: which words name what, and where it should go.
//!
//! The reading is plain English, not the shapes dataset's grammar, so any
//! model's prompts read the same way: a relation phrase ("above", "to the
//! left of", …), "and", "with" and commas split the prompt into noun phrases,
//! and each phrase's content words (articles and other function words
//! dropped) are what names it. A phrase with a number word or a plural last
//! word is a group, of the number's size when it states one. A prompt with
//! two relation phrases, or a relation without exactly one phrase on either
//! side, has no reading, and is not guided.

use crate::train::claims::Relation;

/// Phrases for each relation, as whole words; where two match at the same
/// word ("to the left of", "left of"), the longer one is read.
const PHRASES: [(&str, Relation); 16] = [
    ("to the left of", Relation::LeftOf),
    ("on the left of", Relation::LeftOf),
    ("on the left side of", Relation::LeftOf),
    ("left of", Relation::LeftOf),
    ("to the right of", Relation::RightOf),
    ("on the right of", Relation::RightOf),
    ("on the right side of", Relation::RightOf),
    ("right of", Relation::RightOf),
    ("on top of", Relation::Above),
    ("above", Relation::Above),
    ("over", Relation::Above),
    ("atop", Relation::Above),
    ("underneath", Relation::Below),
    ("beneath", Relation::Below),
    ("below", Relation::Below),
    ("under", Relation::Below),
];

/// Words that join noun phrases.
const JOINERS: [&str; 3] = ["and", "with", "next"];

/// Words that name nothing on their own.
const FUNCTION_WORDS: [&str; 18] = [
    "a", "an", "the", "of", "to", "is", "are", "there", "that", "which", "one", "picture", "image", "photo", "drawing", "illustration",
    "showing", "shows",
];

/// Number words that make a phrase a group, from two.
const NUMBERS: [&str; 9] = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];

/// Words that make a phrase a group of no stated size.
const QUANTIFIERS: [&str; 5] = ["several", "many", "some", "few", "multiple"];

/// The number `word` states, when it is one of two or more ("three", "3").
fn number(word: &str) -> Option<u32> {
    NUMBERS.iter().position(|&n| n == word).map(|i| i as u32 + 2).or_else(|| word.parse::<u32>().ok().filter(|&n| n >= 2))
}

/// One thing a prompt names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// Byte ranges of the words naming it.
    pub words: Vec<(usize, usize)>,
    /// How many objects it is: 1 for one object, the number for a counted
    /// group ("three stars", "2 squares"), `None` for a group of no stated
    /// size ("stars", "several stars").
    pub count: Option<u32>,
}

impl Named {
    /// One object (not a group).
    pub fn single(&self) -> bool {
        self.count == Some(1)
    }
}

/// What a prompt asks to be drawn where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptLayout {
    pub named: Vec<Named>,
    /// `named[0]` stands in this relation to `named[1]`.
    pub relation: Option<Relation>,
}

impl PromptLayout {
    /// Whether layout guidance has anything to do: a relation, a single
    /// object to keep compact, a counted group to keep in as many places as
    /// it counts, or things to keep apart.
    pub fn guided(&self) -> bool {
        self.relation.is_some() || self.named.len() > 1 || self.named.iter().any(|n| n.count.is_some())
    }
}

/// The words of `text` as byte ranges: maximal runs of letters and digits.
fn words(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        match (start, c.is_alphanumeric()) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// One noun phrase's naming words and how many objects it is.
fn named(lower: &str, phrase: &[(usize, usize)]) -> Option<Named> {
    let text = |&(a, b): &(usize, usize)| &lower[a..b];
    let words: Vec<(usize, usize)> = phrase.iter().copied().filter(|w| !FUNCTION_WORDS.contains(&text(w))).collect();
    let last = words.last()?;
    let noun = text(last);
    let plural = noun.len() > 2 && noun.ends_with('s') && !noun.ends_with("ss");
    // The first number stated; a phrase with two ("two or three stars") is
    // read by its first, which is as good a guess as any.
    let stated = words.iter().find_map(|w| number(text(w)));
    let vague = words.iter().any(|w| QUANTIFIERS.contains(&text(w)));
    let count = match (stated, vague || plural) {
        (Some(n), _) => Some(n),
        (None, false) => Some(1),
        (None, true) => None,
    };
    Some(Named { words, count })
}

/// Reads `prompt`'s layout; `None` when it names nothing, or its relations
/// cannot be read unambiguously.
pub fn read(prompt: &str) -> Option<PromptLayout> {
    let lower = prompt.to_ascii_lowercase();
    let all = words(&lower);
    let text = |&(a, b): &(usize, usize)| &lower[a..b];
    // Phrases end at joiners, commas and the relation phrase.
    let mut phrases: Vec<Vec<(usize, usize)>> = vec![Vec::new()];
    let mut relation: Option<(Relation, usize)> = None;
    let mut i = 0;
    while i < all.len() {
        let hit = PHRASES
            .iter()
            .filter_map(|&(phrase, relation)| {
                let parts: Vec<&str> = phrase.split(' ').collect();
                let fits = i + parts.len() <= all.len() && parts.iter().enumerate().all(|(k, p)| text(&all[i + k]) == *p);
                fits.then_some((parts.len(), relation))
            })
            .max_by_key(|&(n, _)| n);
        let comma = i > 0 && lower[all[i - 1].1..all[i].0].contains(',');
        if comma && !phrases.last().is_some_and(Vec::is_empty) {
            phrases.push(Vec::new());
        }
        match hit {
            Some((n, r)) => {
                if relation.is_some() {
                    return None;
                }
                relation = Some((r, phrases.len()));
                phrases.push(Vec::new());
                i += n;
            }
            None if JOINERS.contains(&text(&all[i])) => {
                phrases.push(Vec::new());
                i += 1;
            }
            None => {
                phrases.last_mut().expect("at least one phrase").push(all[i]);
                i += 1;
            }
        }
    }
    // Empty phrases ("and" at the start, doubled joiners) name nothing.
    let kept: Vec<(usize, Named)> = phrases.iter().enumerate().filter_map(|(k, p)| named(&lower, p).map(|n| (k, n))).collect();
    let relation = match relation {
        None => None,
        Some((r, after)) => {
            // Exactly one phrase before the relation and one after it.
            let before = kept.iter().filter(|(k, _)| *k < after).count();
            if before != 1 || kept.len() != 2 {
                return None;
            }
            Some(r)
        }
    };
    if kept.is_empty() {
        return None;
    }
    Some(PromptLayout { named: kept.into_iter().map(|(_, n)| n).collect(), relation })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(prompt: &str, n: &Named) -> Vec<String> {
        n.words.iter().map(|&(a, b)| prompt[a..b].to_string()).collect()
    }

    #[test]
    fn reads_pairs() {
        let p = "a red circle above a blue square";
        let r = read(p).expect("a layout");
        assert_eq!(r.relation, Some(Relation::Above));
        assert_eq!(said(p, &r.named[0]), ["red", "circle"]);
        assert_eq!(said(p, &r.named[1]), ["blue", "square"]);
        assert!(r.named.iter().all(Named::single));

        let p = "Green star to the left of an orange triangle.";
        let r = read(p).expect("a layout");
        assert_eq!(r.relation, Some(Relation::LeftOf));
        assert_eq!(said(p, &r.named[0]), ["Green", "star"]);
        assert_eq!(said(p, &r.named[1]), ["orange", "triangle"]);

        for (p, relation) in [("a disc under a box", Relation::Below), ("a star right of a circle", Relation::RightOf), ("a cat on top of a mat", Relation::Above)] {
            assert_eq!(read(p).and_then(|r| r.relation), Some(relation), "{p}");
        }
    }

    #[test]
    fn reads_lists_and_groups() {
        let p = "a picture of a red circle, a green ring and three blue crosses";
        let r = read(p).expect("a layout");
        assert_eq!(r.relation, None);
        let names: Vec<Vec<String>> = r.named.iter().map(|n| said(p, n)).collect();
        assert_eq!(names, [vec!["red", "circle"], vec!["green", "ring"], vec!["three", "blue", "crosses"]]);
        assert_eq!(r.named.iter().map(|n| n.count).collect::<Vec<_>>(), [Some(1), Some(1), Some(3)]);

        let r = read("red square with 2 yellow plus signs").expect("a layout");
        assert_eq!(r.named.iter().map(|n| n.count).collect::<Vec<_>>(), [Some(1), Some(2)]);
        let r = read("a purple cross").expect("a layout");
        assert_eq!((r.named.len(), r.named[0].single()), (1, true));
        assert_eq!(read("four stars").map(|r| r.named[0].count), Some(Some(4)));
        assert_eq!(read("ten stars").map(|r| r.named[0].count), Some(Some(10)));
        // Groups of no stated size: no count to keep.
        for p in ["stars", "several red stars", "some squares", "1 squares"] {
            assert_eq!(read(p).map(|r| r.named[0].count), Some(None), "{p}");
        }
    }

    #[test]
    fn the_caption_vocabulary_is_read_in_every_phrasing() {
        use crate::train::caption::vocabulary;
        for relation in Relation::ALL {
            for phrase in vocabulary::relation(relation) {
                let p = format!("a purple ring {phrase} a yellow star");
                assert_eq!(read(&p).and_then(|r| r.relation), Some(relation), "{p}");
            }
        }
        use crate::train::scene::Shape;
        for shape in Shape::ALL {
            for (one, many) in vocabulary::shape(shape) {
                assert_eq!(read(&format!("a red {one}")).map(|r| r.named[0].count), Some(Some(1)), "{one}");
                assert_eq!(read(&format!("two red {many}")).map(|r| r.named[0].count), Some(Some(2)), "{many}");
                assert_eq!(read(&format!("red {many}")).map(|r| r.named[0].count), Some(None), "{many}");
            }
        }
    }

    #[test]
    fn unreadable_relations_and_empty_prompts_have_no_reading() {
        assert_eq!(read("above a blue square"), None);
        assert_eq!(read("a red circle above"), None);
        assert_eq!(read("a circle above a square left of a star"), None);
        assert_eq!(read("a circle and a star above a square"), None);
        assert_eq!(read(""), None);
        assert_eq!(read("the, and of"), None);
        // "over" inside another word is not the relation.
        assert_eq!(read("a clover and a rover").map(|r| (r.relation, r.named.len())), Some((None, 2)));
    }
}

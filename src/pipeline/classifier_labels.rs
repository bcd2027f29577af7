//! The classes a request's classifier guidance tells its prompt apart from
//! (`pipeline::classifier_guidance`).
//!
//! ADM's classifier guidance (Dhariwal & Nichol 2021, §4) follows
//! ∇ log p(y | x_t) for a label y among a fixed set of classes. Our noisy
//! classifier is the noised CLIP's softmax over captions, so a request's
//! classes are captions: its prompt (the label y) and
//!
//! - the prompt with one attribute changed: each colour word to every other
//!   colour, each shape noun to every other shape (in the same number), each
//!   count to every other count, the relation to every other relation;
//! - the prompt with its two colours, or its two shapes, swapped between the
//!   things it names (what attribute binding gets wrong);
//! - the shapes dataset's single things, "a {colour} {shape}", so a prompt
//!   with none of those words still has classes to be told apart from.
//!
//! A contrast that differs from the prompt in one word is the class whose
//! confusion the gradient pushes away from most: the shift is
//! τ·(g_y − Σ_k p_k g_k)·∇f, away from the classes the image is taken for.
//! Classes equal to the prompt (or to another prompt of the request, for an
//! interpolation) are left out, since an image cannot be told apart from its
//! own label.

use std::collections::HashSet;

use crate::train::caption::vocabulary;
use crate::train::claims::Relation;
use crate::train::scene::{Colour, Shape};

/// Counts a contrast may state, as words and as digits.
const COUNTS: [(&str, &str); 3] = [("two", "2"), ("three", "3"), ("four", "4")];

/// What a span of the prompt's words names.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Colour(Colour),
    Shape { shape: Shape, plural: bool },
    /// Index into [`COUNTS`], and whether written as a digit.
    Count { index: usize, digit: bool },
    Relation(Relation),
}

/// A recognised span: words `start..start + len`.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
    slot: Slot,
}

/// Every phrase that names a slot, as its words.
fn phrases() -> Vec<(Vec<&'static str>, Slot)> {
    let mut out = Vec::new();
    for &colour in &Colour::OBJECTS {
        for w in vocabulary::colour(colour) {
            out.push((vec![*w], Slot::Colour(colour)));
        }
    }
    for shape in Shape::ALL {
        for (one, many) in vocabulary::shape(shape) {
            out.push((one.split(' ').collect(), Slot::Shape { shape, plural: false }));
            out.push((many.split(' ').collect(), Slot::Shape { shape, plural: true }));
        }
    }
    for (index, (word, digit)) in COUNTS.iter().enumerate() {
        out.push((vec![*word], Slot::Count { index, digit: false }));
        out.push((vec![*digit], Slot::Count { index, digit: true }));
    }
    for relation in Relation::ALL {
        for phrase in vocabulary::relation(relation) {
            out.push((phrase.split(' ').collect(), Slot::Relation(relation)));
        }
    }
    // The longest phrase first, so "to the left of" wins over "left of".
    out.sort_by_key(|(words, _)| std::cmp::Reverse(words.len()));
    out
}

/// The preferred words for a slot.
fn words(slot: Slot) -> Vec<String> {
    let w: &str = match slot {
        Slot::Colour(c) => vocabulary::colour(c)[0],
        Slot::Shape { shape, plural } => {
            let (one, many) = vocabulary::shape(shape)[0];
            if plural {
                many
            } else {
                one
            }
        }
        Slot::Count { index, digit } => {
            if digit {
                COUNTS[index].1
            } else {
                COUNTS[index].0
            }
        }
        Slot::Relation(r) => vocabulary::relation(r)[0],
    };
    w.split(' ').map(str::to_owned).collect()
}

/// The alternatives to a slot: the same kind of word naming something else.
fn alternatives(slot: Slot) -> Vec<Slot> {
    match slot {
        Slot::Colour(c) => Colour::OBJECTS.iter().filter(|&&o| o != c).map(|&o| Slot::Colour(o)).collect(),
        Slot::Shape { shape, plural } => Shape::ALL.iter().filter(|&&s| s != shape).map(|&s| Slot::Shape { shape: s, plural }).collect(),
        Slot::Count { index, digit } => (0..COUNTS.len()).filter(|&i| i != index).map(|i| Slot::Count { index: i, digit }).collect(),
        Slot::Relation(r) => Relation::ALL.iter().filter(|&&o| o != r).map(|&o| Slot::Relation(o)).collect(),
    }
}

/// A prompt as lower-case words, each with the punctuation that followed it.
fn split(prompt: &str) -> Vec<(String, String)> {
    prompt
        .split_whitespace()
        .map(|w| {
            let w = w.to_lowercase();
            let core = w.trim_end_matches(|c: char| c.is_ascii_punctuation());
            (core.to_owned(), w[core.len()..].to_owned())
        })
        .collect()
}

/// The recognised spans of `words`, left to right, none overlapping.
fn spans(words: &[(String, String)]) -> Vec<Span> {
    let table = phrases();
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let found = table.iter().find(|(phrase, _)| {
            // A phrase's inner words carry no punctuation ("left, of" is not "left of").
            i + phrase.len() <= words.len()
                && phrase.iter().enumerate().all(|(k, p)| words[i + k].0 == *p && (k + 1 == phrase.len() || words[i + k].1.is_empty()))
        });
        match found {
            Some((phrase, slot)) => {
                out.push(Span { start: i, len: phrase.len(), slot: *slot });
                i += phrase.len();
            }
            None => i += 1,
        }
    }
    out
}

/// `words` with each span in `changes` replaced by its new slot's words
/// (keeping the punctuation after it), an article before a change agreeing
/// with the word that now follows it.
fn rewrite(words: &[(String, String)], changes: &[(Span, Slot)]) -> String {
    let mut out: Vec<(String, String)> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        match changes.iter().find(|(span, _)| span.start == i) {
            Some((span, slot)) => {
                let mut new: Vec<(String, String)> = self::words(*slot).into_iter().map(|w| (w, String::new())).collect();
                if let Some(last) = new.last_mut() {
                    last.1 = words[i + span.len - 1].1.clone();
                }
                if let Some(prev) = out.last_mut().filter(|p| (p.0 == "a" || p.0 == "an") && p.1.is_empty()) {
                    prev.0 = article(&new[0].0).to_owned();
                }
                out.extend(new);
                i += span.len;
            }
            None => {
                out.push(words[i].clone());
                i += 1;
            }
        }
    }
    out.iter().map(|(w, p)| format!("{w}{p}")).collect::<Vec<_>>().join(" ")
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// A prompt read once: its words and the spans among them that name something.
struct Reading {
    words: Vec<(String, String)>,
    spans: Vec<Span>,
}

fn read(prompt: &str) -> Reading {
    let words = split(prompt);
    let spans = spans(&words);
    Reading { words, spans }
}

/// One prompt's contrasts: one attribute changed, then attributes swapped.
fn contrasts(reading: &Reading) -> Vec<String> {
    let Reading { words, spans } = reading;
    let mut out = Vec::new();
    for span in spans {
        for alt in alternatives(span.slot) {
            out.push(rewrite(words, &[(*span, alt)]));
        }
    }
    let colours: Vec<&Span> = spans.iter().filter(|s| matches!(s.slot, Slot::Colour(_))).collect();
    if let [a, b] = colours[..] {
        out.push(rewrite(words, &[(*a, b.slot), (*b, a.slot)]));
    }
    let shapes: Vec<&Span> = spans.iter().filter(|s| matches!(s.slot, Slot::Shape { .. })).collect();
    if let [a, b] = shapes[..] {
        if let (Slot::Shape { shape: sa, plural: pa }, Slot::Shape { shape: sb, plural: pb }) = (a.slot, b.slot) {
            out.push(rewrite(words, &[(*a, Slot::Shape { shape: sb, plural: pa }), (*b, Slot::Shape { shape: sa, plural: pb })]));
        }
    }
    out
}

/// The (colour, shape) of each thing a prompt names: a shape noun with the
/// colour word right before it (after any count), or with none.
fn things(reading: &Reading) -> Vec<(Option<Colour>, Shape)> {
    let spans = &reading.spans;
    spans
        .iter()
        .enumerate()
        .filter_map(|(i, span)| match span.slot {
            Slot::Shape { shape, .. } => {
                let colour = match i.checked_sub(1).map(|j| (spans[j].slot, spans[j].start + spans[j].len == span.start)) {
                    Some((Slot::Colour(c), true)) => Some(c),
                    _ => None,
                };
                Some((colour, shape))
            }
            _ => None,
        })
        .collect()
}

/// Lower-case words joined by single spaces: how two captions are compared.
fn normal(text: &str) -> String {
    text.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

/// The classes besides `prompts` (the request's prompt, and an
/// interpolation's second one): each prompt's contrasts, then the dataset's
/// single things, without repeats and without any of `prompts`. A single
/// thing a prompt names part of ("a red circle" in "a red circle and a blue
/// square", "a green star" in "a star") is no class: a right image fits it
/// too, and guidance away from it would erase what the prompt asks for.
pub fn labels(prompts: &[&str]) -> Vec<String> {
    let readings: Vec<Reading> = prompts.iter().map(|p| read(p)).collect();
    let named: Vec<(Option<Colour>, Shape)> = readings.iter().flat_map(things).collect();
    let single = Colour::OBJECTS
        .iter()
        .flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)))
        .filter(|&(c, s)| !named.iter().any(|&(nc, ns)| ns == s && nc.is_none_or(|nc| nc == c)))
        .map(|(c, s)| {
            let colour = vocabulary::colour(c)[0];
            format!("{} {colour} {}", article(colour), vocabulary::shape(s)[0].0)
        });
    // Each caption compared by its normal form, taken once; the prompts' own are taken already.
    let mut seen: HashSet<String> = prompts.iter().map(|p| normal(p)).collect();
    readings.iter().flat_map(contrasts).chain(single).filter(|label| seen.insert(normal(label))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SINGLES: usize = Colour::OBJECTS.len() * Shape::ALL.len();

    #[test]
    fn a_pair_is_contrasted_in_each_attribute_and_in_its_binding() {
        let got = labels(&["a red circle above a blue square"]);
        for want in [
            "an orange circle above a blue square",
            "a red star above a blue square",
            "a red circle below a blue square",
            "a red circle to the left of a blue square",
            "a red circle above a green square",
            "a blue circle above a red square",
            "a red square above a blue circle",
        ] {
            assert!(got.iter().any(|g| g == want), "{want} missing from {got:?}");
        }
        // 5 colours and 5 shapes for each thing, 3 relations, 2 swaps, then
        // the singles but the two the prompt names.
        assert_eq!(got.len(), 5 * 4 + 3 + 2 + SINGLES - 2);
        assert!(!got.iter().any(|g| g == "a red circle" || g == "a blue square"), "{got:?}");
        assert!(!got.iter().any(|g| g == "a red circle above a blue square"));
    }

    #[test]
    fn counts_keep_their_form_and_shapes_their_number() {
        let got = labels(&["Three green stars."]);
        assert!(got.contains(&"two green stars.".to_owned()), "{got:?}");
        assert!(got.contains(&"four green stars.".to_owned()));
        assert!(got.contains(&"three green crosses.".to_owned()));
        assert!(got.contains(&"three purple stars.".to_owned()));
        let digits = labels(&["3 blue rings"]);
        assert!(digits.contains(&"2 blue rings".to_owned()) && digits.contains(&"4 blue rings".to_owned()), "{digits:?}");
        assert!(!digits.iter().any(|g| g.starts_with("two ")));
    }

    #[test]
    fn synonyms_and_multi_word_phrases_are_read_whole() {
        let got = labels(&["a red plus sign to the right of a blue box"]);
        assert!(got.contains(&"a red circle to the right of a blue box".to_owned()), "{got:?}");
        assert!(got.contains(&"a red plus sign above a blue box".to_owned()));
        assert!(got.contains(&"a red plus sign to the right of a blue triangle".to_owned()));
        // "right" is not read alone, so no "to the above of".
        assert!(!got.iter().any(|g| g.contains("the above")), "{got:?}");
    }

    #[test]
    fn a_prompt_without_known_words_has_the_single_things_and_its_own_label_is_never_a_class() {
        let got = labels(&["a photograph of a cat"]);
        assert_eq!(got.len(), SINGLES);
        assert_eq!(got[0], "a red circle");
        let got = labels(&["A  red circle"]);
        // Its contrasts are single things too: nothing beyond the other 35.
        assert_eq!(got.len(), SINGLES - 1, "{got:?}");
        assert!(!got.iter().any(|g| normal(g) == "a red circle"));
        assert!(got.contains(&"a red star".to_owned()));
    }

    #[test]
    fn single_things_a_prompt_names_part_of_are_no_classes() {
        // Every colour of a star fits "a star"; a green star fits "three green stars".
        let star = labels(&["a star"]);
        assert!(!star.iter().any(|g| g.ends_with(" star")), "{star:?}");
        assert!(star.contains(&"a red circle".to_owned()) && star.contains(&"a circle".to_owned()));
        let three = labels(&["three green stars"]);
        assert!(!three.contains(&"a green star".to_owned()) && three.contains(&"a red star".to_owned()), "{three:?}");
        // A colour two words before a shape is not its colour.
        assert_eq!(things(&read("a red and shiny circle")), vec![(None, Shape::Circle)]);
        assert_eq!(things(&read("4 purple plus signs")), vec![(Some(Colour::Purple), Shape::Cross)]);
    }

    #[test]
    fn an_interpolation_contrasts_both_prompts_and_neither_is_a_class() {
        let got = labels(&["a red circle", "a blue circle"]);
        assert!(!got.iter().any(|g| g == "a red circle" || g == "a blue circle"));
        assert!(got.contains(&"a blue star".to_owned()));
        let mut unique = got.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "no repeats");
    }
}

//! Segmentation by colour: which pixels belong to which object region, with
//! the background and the shades colours actually have in the image.
//!
//! Steps 1–4 of the detector (see `detect`): the background by a border vote;
//! pixels labelled by palette colour or as an anti-aliased blend; connected
//! components per colour; rims of a third colour merged into the object they
//! fringe; specks dropped. Everything downstream reads coverage from here.

use crate::train::scene::Colour;

/// Within this RGB distance of a palette colour a pixel takes that colour.
/// Half the closest pair's distance (yellow–orange, 93) would be unambiguous;
/// more tolerance reads model samples, and the nearest colour still wins.
pub(super) const PURE: f32 = 60.0;
/// How far off the background→colour line a blend may lie.
pub(super) const BLEND: f32 = 30.0;
/// A fringe component: at most this share of its pixels have all four
/// neighbours in it (an anti-aliased band is about one pixel thick).
const FRINGE_INTERIOR: f32 = 0.4;
/// Smallest component kept, as a fraction of the image area (and at least 4
/// px): a third of the smallest object (a small star, 1.19·h² with h = 0.094).
const MIN_AREA: f32 = 0.0035;

/// What segmentation found.
pub(super) struct Segmentation {
    pub background: Colour,
    /// The background's shade in this image.
    pub ground: [f32; 3],
    /// Per pixel: the object colour it shows, if any.
    pub labels: Vec<Option<Colour>>,
    /// Per pixel: the kept region it belongs to.
    pub owner: Vec<Option<usize>>,
    pub regions: Vec<Segment>,
}

/// One object-sized region: merged components of one colour.
pub(super) struct Segment {
    /// Its value in [`Segmentation::owner`].
    pub id: usize,
    pub colour: Colour,
    /// Its colour as it appears in this image.
    pub shade: [f32; 3],
    pub members: Vec<usize>,
}

/// Segments a square image of `side` px given as RGB values.
pub(super) fn segment(pixels: &[[f32; 3]], side: usize) -> Segmentation {
    let (background, ground) = background(pixels, side);
    let labels: Vec<Option<Colour>> = pixels.iter().map(|&p| label(p, background, ground)).collect();
    let mut parts = Components::find(&labels, pixels, side);
    parts.merge_fringes(pixels, ground);
    let min_pixels = ((MIN_AREA * (side * side) as f32).ceil() as usize).max(4);
    let owner = parts.owners(min_pixels);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); parts.colour.len()];
    for (i, o) in owner.iter().enumerate() {
        if let Some(root) = o {
            members[*root].push(i);
        }
    }
    let regions = parts
        .roots(min_pixels)
        .into_iter()
        .map(|id| Segment { id, colour: parts.colour[id], shade: parts.shade[id], members: std::mem::take(&mut members[id]) })
        .collect();
    Segmentation { background, ground, labels, owner, regions }
}

pub(super) fn distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

pub(super) fn rgb(c: Colour) -> [f32; 3] {
    c.rgb().map(f32::from)
}

fn nearest(p: [f32; 3]) -> (Colour, f32) {
    Colour::ALL.iter().map(|&c| (c, distance(p, rgb(c)))).min_by(|a, b| a.1.total_cmp(&b.1)).expect("a palette")
}

/// `p` as `b + α·(c − b)`, a blend of background `b` and object colour `c`:
/// the object's coverage α (clamped to [0, 1]) and how far `p` is from that blend.
pub(super) fn blend(p: [f32; 3], b: [f32; 3], c: [f32; 3]) -> (f32, f32) {
    let d = [c[0] - b[0], c[1] - b[1], c[2] - b[2]];
    let along = (0..3).map(|i| (p[i] - b[i]) * d[i]).sum::<f32>() / (0..3).map(|i| d[i] * d[i]).sum::<f32>().max(1.0);
    let alpha = along.clamp(0.0, 1.0);
    (alpha, distance(p, [b[0] + alpha * d[0], b[1] + alpha * d[1], b[2] + alpha * d[2]]))
}

/// The majority nearest colour along the border, and its shade there.
fn background(pixels: &[[f32; 3]], side: usize) -> (Colour, [f32; 3]) {
    let border: Vec<[f32; 3]> =
        (0..side).flat_map(|i| [(i, 0), (i, side - 1), (0, i), (side - 1, i)]).map(|(x, y)| pixels[y * side + x]).collect();
    let mut votes = [0usize; Colour::ALL.len()];
    for &p in &border {
        votes[Colour::ALL.iter().position(|&k| k == nearest(p).0).expect("in the palette")] += 1;
    }
    let best = Colour::ALL[(0..votes.len()).max_by_key(|&i| (votes[i], std::cmp::Reverse(i))).expect("a palette")];
    let shade = median(border.into_iter().filter(|&p| nearest(p).0 == best)).unwrap_or(rgb(best));
    (best, shade)
}

/// The per-channel median: a colour's shade in an image, robust to its rim.
fn median(pixels: impl Iterator<Item = [f32; 3]>) -> Option<[f32; 3]> {
    let mut channels: [Vec<f32>; 3] = Default::default();
    for p in pixels {
        for (c, v) in channels.iter_mut().zip(p) {
            c.push(v);
        }
    }
    let mid = channels[0].len() / 2;
    (!channels[0].is_empty()).then(|| channels.map(|mut c| *c.select_nth_unstable_by(mid, f32::total_cmp).1))
}

/// Coverage with a dead band at both ends, so that faint noise on the
/// background and shading inside an object do not count (and 0.5 stays 0.5).
pub(super) fn ramp(alpha: f32) -> f32 {
    ((alpha - 0.1) / 0.8).clamp(0.0, 1.0)
}

/// The object colour a pixel shows, if any (`None` for background and noise).
fn label(p: [f32; 3], background: Colour, ground: [f32; 3]) -> Option<Colour> {
    let (c, d) = nearest(p);
    if d <= PURE {
        return (c != background).then_some(c);
    }
    Colour::ALL
        .iter()
        .filter(|&&c| c != background)
        .map(|&c| (c, blend(p, ground, rgb(c))))
        .filter(|&(_, (alpha, off))| alpha >= 0.5 && off <= BLEND)
        .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
        .map(|(c, _)| c)
}

/// Connected same-colour components (8-connected), with a union-find over
/// them for fringe merging.
struct Components {
    side: usize,
    /// Per pixel: its component, if labelled.
    id: Vec<Option<usize>>,
    colour: Vec<Colour>,
    /// Per component: its colour as it appears in this image.
    shade: Vec<[f32; 3]>,
    members: Vec<Vec<usize>>,
    parent: Vec<usize>,
    /// Per root: pixels in it and everything merged into it.
    total: Vec<usize>,
    /// Per component: the components it touches.
    touching: Vec<Vec<usize>>,
}

const NEIGHBOURS: [(isize, isize); 8] = [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)];

impl Components {
    fn find(labels: &[Option<Colour>], pixels: &[[f32; 3]], side: usize) -> Self {
        let mut id = vec![None; labels.len()];
        let (mut colour, mut members) = (Vec::new(), Vec::new());
        for start in 0..labels.len() {
            let Some(c) = labels[start] else { continue };
            if id[start].is_some() {
                continue;
            }
            let k = colour.len();
            let mut stack = vec![start];
            let mut list = Vec::new();
            id[start] = Some(k);
            while let Some(i) = stack.pop() {
                list.push(i);
                for j in neighbours(i, side, &NEIGHBOURS) {
                    if labels[j] == Some(c) && id[j].is_none() {
                        id[j] = Some(k);
                        stack.push(j);
                    }
                }
            }
            colour.push(c);
            members.push(list);
        }
        let mut touching: Vec<Vec<usize>> = vec![Vec::new(); colour.len()];
        for (i, &a) in id.iter().enumerate() {
            let Some(a) = a else { continue };
            for j in neighbours(i, side, &NEIGHBOURS) {
                if let Some(b) = id[j].filter(|&b| b != a) {
                    touching[a].push(b);
                }
            }
        }
        for list in &mut touching {
            list.sort_unstable();
            list.dedup();
        }
        let parent = (0..colour.len()).collect();
        let total = members.iter().map(Vec::len).collect();
        let shade = colour
            .iter()
            .zip(&members)
            .map(|(&c, list)| median(list.iter().map(|&i| pixels[i]).filter(|&p| distance(p, rgb(c)) <= PURE)).unwrap_or(rgb(c)))
            .collect();
        Self { side, id, colour, shade, members, parent, total, touching }
    }

    fn root(&self, mut k: usize) -> usize {
        while self.parent[k] != k {
            k = self.parent[k];
        }
        k
    }

    /// Merges each thin band into a touching component when the band reads as
    /// a blend of the background and that component's colour, better than the
    /// other way round (an orange ring on black has a brown rim as large as
    /// itself: brown is orange over black, orange is not brown over black).
    fn merge_fringes(&mut self, pixels: &[[f32; 3]], ground: [f32; 3]) {
        let mut order: Vec<usize> = (0..self.colour.len()).collect();
        order.sort_by_key(|&k| self.members[k].len());
        for k in order {
            if !self.is_thin(k) {
                continue;
            }
            let host = self.touching[k]
                .iter()
                .map(|&n| self.root(n))
                .filter(|&r| r != k && self.colour[r] != self.colour[k])
                .map(|r| (r, self.mean_blend_error(k, pixels, ground, self.shade[r])))
                .filter(|&(r, e)| e <= BLEND && e < self.mean_blend_error(r, pixels, ground, self.shade[k]))
                .min_by(|a, b| a.1.total_cmp(&b.1));
            let Some((r, _)) = host else { continue };
            self.parent[k] = r;
            self.total[r] += self.total[k];
            // A thin object (a small ring) can fall apart into pieces its own
            // rim joins: pieces of the host's colour touching the band join it.
            let pieces: Vec<usize> = self.touching[k]
                .iter()
                .map(|&n| self.root(n))
                .filter(|&q| q != r && self.colour[q] == self.colour[r])
                .collect();
            for q in pieces {
                if self.root(q) != r {
                    self.parent[q] = r;
                    self.total[r] += self.total[q];
                }
            }
        }
    }

    /// Whether few of the component's pixels are surrounded by it.
    fn is_thin(&self, k: usize) -> bool {
        const FOUR: [(isize, isize); 4] = [(0, -1), (-1, 0), (1, 0), (0, 1)];
        let list = &self.members[k];
        let interior = list.iter().filter(|&&i| neighbours(i, self.side, &FOUR).filter(|&j| self.id[j] == Some(k)).count() == 4).count();
        (interior as f32) <= FRINGE_INTERIOR * list.len() as f32
    }

    fn mean_blend_error(&self, k: usize, pixels: &[[f32; 3]], ground: [f32; 3], shade: [f32; 3]) -> f32 {
        let list = &self.members[k];
        list.iter().map(|&i| blend(pixels[i], ground, shade).1).sum::<f32>() / list.len() as f32
    }

    /// Merged components with at least `min_pixels` pixels.
    fn roots(&self, min_pixels: usize) -> Vec<usize> {
        (0..self.colour.len()).filter(|&k| self.root(k) == k && self.total[k] >= min_pixels).collect()
    }

    /// Per pixel: the merged component it belongs to, if that one is kept.
    fn owners(&self, min_pixels: usize) -> Vec<Option<usize>> {
        self.id.iter().map(|k| k.map(|k| self.root(k)).filter(|&r| self.total[r] >= min_pixels)).collect()
    }
}

fn neighbours(i: usize, side: usize, offsets: &'static [(isize, isize)]) -> impl Iterator<Item = usize> {
    let (x, y) = ((i % side) as isize, (i / side) as isize);
    offsets.iter().filter_map(move |&(dx, dy)| {
        let (u, v) = (x + dx, y + dy);
        (u >= 0 && v >= 0 && (u as usize) < side && (v as usize) < side).then(|| v as usize * side + u as usize)
    })
}

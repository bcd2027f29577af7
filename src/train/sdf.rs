//! Signed distance functions of the shapes, in a shape's own unit frame.
//!
//! The frame is the object's footprint scaled to [-1, 1]² (`y` downwards);
//! each function returns the signed distance to the outline in that frame
//! (negative inside). Distances are exact (polygons after Inigo Quilez's
//! `sdPolygon`), which is what lets the
//! renderer turn distance into an anti-aliased coverage with one evaluation
//! per pixel instead of supersampling.

use std::sync::LazyLock;

use super::scene::Shape;

type V2 = [f32; 2];

/// Circle, ring and the outer radius most shapes share: a hair inside the
/// footprint so the anti-aliased edge never reaches its border.
const RADIUS: f32 = 0.95;
/// The ring's band: centre radius and half-width (outer edge at `RADIUS`).
const RING_MID: f32 = 0.74;
const RING_HALF_WIDTH: f32 = 0.21;
/// The square is smaller than the footprint so its area reads like the circle's.
const SQUARE_HALF: f32 = 0.8;
/// Half the width of the cross's arms.
const CROSS_ARM: f32 = 0.3;
/// Inner radius of the star relative to its outer one (a regular star is 0.38;
/// fatter points survive small sizes better).
const STAR_INNER: f32 = 0.45;

static SQUARE: [V2; 4] =
    [[-SQUARE_HALF, -SQUARE_HALF], [SQUARE_HALF, -SQUARE_HALF], [SQUARE_HALF, SQUARE_HALF], [-SQUARE_HALF, SQUARE_HALF]];
static CROSS: [V2; 12] = [
    [-CROSS_ARM, -RADIUS],
    [CROSS_ARM, -RADIUS],
    [CROSS_ARM, -CROSS_ARM],
    [RADIUS, -CROSS_ARM],
    [RADIUS, CROSS_ARM],
    [CROSS_ARM, CROSS_ARM],
    [CROSS_ARM, RADIUS],
    [-CROSS_ARM, RADIUS],
    [-CROSS_ARM, CROSS_ARM],
    [-RADIUS, CROSS_ARM],
    [-RADIUS, -CROSS_ARM],
    [-CROSS_ARM, -CROSS_ARM],
];

/// Equilateral, point up, as wide as the footprint allows and centred vertically.
static TRIANGLE: LazyLock<[V2; 3]> = LazyLock::new(|| {
    let half_height = RADIUS * 3f32.sqrt() / 2.0;
    [[0.0, -half_height], [RADIUS, half_height], [-RADIUS, half_height]]
});

/// Five points, one up; shifted down so its bounding box is centred.
static STAR: LazyLock<[V2; 10]> = LazyLock::new(|| {
    let shift = RADIUS * (1.0 - (36f32).to_radians().cos()) / 2.0;
    std::array::from_fn(|i| {
        let r = if i % 2 == 0 { RADIUS } else { RADIUS * STAR_INNER };
        let angle = (i as f32 * 36.0).to_radians();
        [r * angle.sin(), -r * angle.cos() + shift]
    })
});

/// Signed distance from `p` (shape frame) to `shape`'s outline.
pub fn distance(shape: Shape, p: V2) -> f32 {
    let length = (p[0] * p[0] + p[1] * p[1]).sqrt();
    match shape {
        Shape::Circle => length - RADIUS,
        Shape::Ring => (length - RING_MID).abs() - RING_HALF_WIDTH,
        Shape::Square => polygon(&SQUARE, p),
        Shape::Cross => polygon(&CROSS, p),
        Shape::Triangle => polygon(&*TRIANGLE, p),
        Shape::Star => polygon(&*STAR, p),
    }
}

/// Exact signed distance to a simple polygon: the nearest edge gives the
/// magnitude, a crossing count gives the sign.
fn polygon(v: &[V2], p: V2) -> f32 {
    let mut d = dot(sub(p, v[0]), sub(p, v[0]));
    let mut s = 1.0f32;
    let mut j = v.len() - 1;
    for i in 0..v.len() {
        let e = sub(v[j], v[i]);
        let w = sub(p, v[i]);
        let t = (dot(w, e) / dot(e, e)).clamp(0.0, 1.0);
        let b = [w[0] - e[0] * t, w[1] - e[1] * t];
        d = d.min(dot(b, b));
        let c = [p[1] >= v[i][1], p[1] < v[j][1], e[0] * w[1] > e[1] * w[0]];
        if c.iter().all(|&x| x) || c.iter().all(|&x| !x) {
            s = -s;
        }
        j = i;
    }
    s * d.sqrt()
}

fn sub(a: V2, b: V2) -> V2 {
    [a[0] - b[0], a[1] - b[1]]
}

fn dot(a: V2, b: V2) -> f32 {
    a[0] * b[0] + a[1] * b[1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centres_are_inside_and_corners_outside() {
        for shape in Shape::ALL {
            let at_centre = distance(shape, [0.0, 0.0]);
            // The ring is hollow: its band is inside, its middle is not.
            if shape == Shape::Ring {
                assert!(at_centre > 0.0 && distance(shape, [RING_MID, 0.0]) < 0.0);
            } else {
                assert!(at_centre < 0.0, "{shape:?}: {at_centre}");
            }
            for corner in [[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]] {
                assert!(distance(shape, corner) > 0.0, "{shape:?} reaches {corner:?}");
            }
        }
    }

    #[test]
    fn every_shape_stays_inside_its_footprint() {
        // Sample the border of [-1, 1]²: everything there must be outside.
        for shape in Shape::ALL {
            for k in 0..=200 {
                let t = -1.0 + k as f32 / 100.0;
                for p in [[t, -1.0], [t, 1.0], [-1.0, t], [1.0, t]] {
                    assert!(distance(shape, p) > 0.0, "{shape:?} touches the border at {p:?}");
                }
            }
        }
    }

    #[test]
    fn distances_are_exact_for_simple_cases() {
        assert!((distance(Shape::Square, [1.0, 0.0]) - 0.2).abs() < 1e-6);
        assert!((distance(Shape::Square, [0.0, 0.0]) + 0.8).abs() < 1e-6);
        assert!((distance(Shape::Circle, [0.0, 0.5]) + 0.45).abs() < 1e-6);
        // Outside a convex corner the distance is to the vertex, not the edge lines.
        let d = distance(Shape::Square, [1.0, 1.0]);
        assert!((d - (0.08f32).sqrt()).abs() < 1e-6);
    }
}

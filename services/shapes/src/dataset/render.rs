//! Rasterising a [`Scene`]: a solid background and one solid, anti-aliased shape.
//!
//! The classifier renders its shape templates with the same [`coverage`] function, so the
//! two can never disagree about what a "triangle" or "cross" looks like.

use image::{Rgb, RgbImage};

use super::vocab::{Scene, Shape};
use crate::rng::SplitMix64;

/// Samples per pixel along each axis (4 × 4 = 16 samples): enough for smooth edges.
const SUPERSAMPLE: usize = 4;

/// Most the shape's centre moves, per axis, as a fraction of the side (≈1.6 px at 64).
pub const MAX_CENTRE_JITTER: f64 = 0.025;
/// Most the extent grows or shrinks, as a fraction of itself.
pub const MAX_SCALE_JITTER: f64 = 0.04;
/// The gap kept between the shape and the image edge, as a fraction of the side, so the
/// classifier's 2-pixel border frame sees (almost) only background.
pub const MARGIN: f64 = 0.04;

/// Small per-sample perturbations so that images of one scene are not all identical.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter {
    /// Centre offset, fractions of the side (`y` down).
    pub dx: f64,
    pub dy: f64,
    /// Multiplier on the extent.
    pub scale: f64,
}

impl Jitter {
    /// No perturbation: the canonical rendering of a scene.
    pub const NONE: Jitter = Jitter {
        dx: 0.0,
        dy: 0.0,
        scale: 1.0,
    };

    /// Draw a jitter uniformly within the documented bounds.
    pub fn sample(rng: &mut SplitMix64) -> Jitter {
        Jitter {
            dx: rng.uniform(-MAX_CENTRE_JITTER, MAX_CENTRE_JITTER),
            dy: rng.uniform(-MAX_CENTRE_JITTER, MAX_CENTRE_JITTER),
            scale: 1.0 + rng.uniform(-MAX_SCALE_JITTER, MAX_SCALE_JITTER),
        }
    }
}

/// An axis-aligned box in pixel coordinates (pixel `(x, y)` spans `[x, x+1) × [y, y+1)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rect {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl Rect {
    /// Width in pixels.
    pub fn width(&self) -> f64 {
        self.x1 - self.x0
    }

    /// Height in pixels.
    pub fn height(&self) -> f64 {
        self.y1 - self.y0
    }
}

/// Where the scene's shape box lies in a `resolution`-pixel square image.
///
/// The centre is the position's nominal offset plus jitter, then clamped so the whole box
/// stays [`MARGIN`] inside the image (large off-centre shapes are pulled inwards).
pub fn placement(scene: &Scene, resolution: u32, jitter: Jitter) -> Rect {
    let side = f64::from(resolution);
    let half = scene.size.extent() * jitter.scale / 2.0;
    let (ox, oy) = scene.position.offset();
    let (lo, hi) = (half + MARGIN, 1.0 - half - MARGIN);
    let cx = (0.5 + ox + jitter.dx).clamp(lo, hi);
    let cy = (0.5 + oy + jitter.dy).clamp(lo, hi);
    Rect {
        x0: (cx - half) * side,
        y0: (cy - half) * side,
        x1: (cx + half) * side,
        y1: (cy + half) * side,
    }
}

/// The fraction (0..=1) of pixel `(px, py)` covered by `shape` drawn in `rect`, by
/// supersampling on a regular grid.
pub fn coverage(shape: Shape, rect: &Rect, px: u32, py: u32) -> f32 {
    let (x, y) = (f64::from(px), f64::from(py));
    if x + 1.0 <= rect.x0 || x >= rect.x1 || y + 1.0 <= rect.y0 || y >= rect.y1 {
        return 0.0;
    }
    let (w, h) = (rect.width().max(1e-9), rect.height().max(1e-9));
    let step = 1.0 / SUPERSAMPLE as f64;
    let mut hits = 0usize;
    for j in 0..SUPERSAMPLE {
        let v = (y + (j as f64 + 0.5) * step - rect.y0) / h;
        for i in 0..SUPERSAMPLE {
            let u = (x + (i as f64 + 0.5) * step - rect.x0) / w;
            hits += usize::from(shape.contains_unit(u, v));
        }
    }
    hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32
}

/// Render `scene` as a `resolution` × `resolution` RGB image.
///
/// # Panics
/// If `resolution < 32` (the shapes would be a handful of pixels and unreadable).
pub fn render(scene: &Scene, resolution: u32, jitter: Jitter) -> RgbImage {
    assert!(
        resolution >= 32,
        "resolution {resolution} is below the minimum of 32"
    );
    let rect = placement(scene, resolution, jitter);
    let (fg, bg) = (scene.fg.rgb(), scene.bg.rgb());
    RgbImage::from_fn(resolution, resolution, |x, y| {
        let c = coverage(scene.shape, &rect, x, y);
        Rgb(std::array::from_fn(|i| {
            let (f, b) = (f32::from(fg[i]), f32::from(bg[i]));
            (b + (f - b) * c).round() as u8
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::vocab::{Colour, Position, Size};

    #[test]
    fn shapes_stay_inside_the_image() {
        for size in Size::ALL {
            for position in Position::ALL {
                let scene = Scene {
                    size,
                    position,
                    ..Scene::plain(Colour::Red, Shape::Square, Colour::Blue)
                };
                for (dx, dy, s) in [(-1.0, -1.0, 1.0), (1.0, 1.0, 1.0), (1.0, -1.0, -1.0)] {
                    let jitter = Jitter {
                        dx: dx * MAX_CENTRE_JITTER,
                        dy: dy * MAX_CENTRE_JITTER,
                        scale: 1.0 + s * MAX_SCALE_JITTER,
                    };
                    let r = placement(&scene, 64, jitter);
                    let m = MARGIN * 64.0 - 1e-9;
                    assert!(
                        r.x0 >= m && r.y0 >= m && r.x1 <= 64.0 - m && r.y1 <= 64.0 - m,
                        "{r:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn edges_are_anti_aliased_and_interior_is_solid() {
        let scene = Scene::plain(Colour::White, Shape::Circle, Colour::Black);
        let img = render(&scene, 64, Jitter::NONE);
        assert_eq!(img.get_pixel(32, 32).0, Colour::White.rgb());
        assert_eq!(img.get_pixel(0, 0).0, Colour::Black.rgb());
        let intermediate = img
            .pixels()
            .filter(|p| p.0 != Colour::White.rgb() && p.0 != Colour::Black.rgb())
            .count();
        assert!(intermediate > 20, "{intermediate} blended edge pixels");
    }
}

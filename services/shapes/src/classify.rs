//! A deterministic pixel classifier that reads a scene back out of an image.
//!
//! It is deliberately hand-written (no learning) so that a score means the same thing on
//! every run and machine: it recovers the background from the border, segments the shape by
//! colour distance, and names the shape by matching its mask against the dataset's own
//! renderer. On clean dataset images it is exact; on generated images it is a fair judge of
//! whether the requested colours, shape, position and size appeared.

mod scores;

use image::RgbImage;

pub use scores::{Scores, Tally};

use crate::dataset::{Colour, Position, Rect, Shape, Size, coverage};

/// What [`classify`] read from an image. Everything but `bg` is `None` when no foreground
/// object was found; `shape` is also `None` when no shape template fits well.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub bg: Colour,
    pub fg: Option<Colour>,
    pub shape: Option<Shape>,
    pub position: Option<Position>,
    pub size: Option<Size>,
    /// IoU of the mask with the best shape template (0 when there is no mask): a confidence.
    pub shape_iou: f32,
}

/// Width of the border frame the background is read from, in pixels.
const FRAME: u32 = 2;
/// First-pass foreground threshold: RGB distance from the measured background. About half
/// the palette's smallest pairwise distance (orange–yellow, ~81), and 5σ above noise of
/// σ = 8 levels per channel.
const COARSE_THRESHOLD: f32 = 40.0;
/// Masks smaller than this fraction of the image are specks, not an object.
const MIN_AREA_FRACTION: f64 = 0.003;
/// Below this IoU with every template the blob is not one of the shapes.
const MIN_SHAPE_IOU: f32 = 0.5;
/// Bounding-box centre offsets (fraction of the side) within this are "center". Dataset
/// centred shapes are within 0.025 (jitter); named positions are at least ~0.15 off. The box
/// centre is used rather than the mask centroid because a triangle's centroid sits a sixth
/// of its height below its box's centre (0.1 of the side for a large one).
const CENTER_DEAD_ZONE: f64 = 0.085;
/// Extent thresholds halfway between the small/medium and medium/large extents.
const SMALL_MAX: f64 = (0.30 + 0.45) / 2.0;
const MEDIUM_MAX: f64 = (0.45 + 0.60) / 2.0;

/// Classify `image` (any size; meant for dataset-like square images of side ≥ 32).
pub fn classify(image: &RgbImage) -> Prediction {
    let (w, h) = image.dimensions();
    let px: Vec<[f32; 3]> = image.pixels().map(|p| p.0.map(f32::from)).collect();
    let bg_rgb = median_rgb(image.enumerate_pixels().filter_map(|(x, y, p)| {
        let border = x < FRAME || y < FRAME || x + FRAME >= w || y + FRAME >= h;
        border.then_some(p.0)
    }));
    let bg = Colour::nearest(bg_rgb);
    let none = Prediction {
        bg,
        fg: None,
        shape: None,
        position: None,
        size: None,
        shape_iou: 0.0,
    };
    let min_area = ((f64::from(w) * f64::from(h) * MIN_AREA_FRACTION).ceil() as usize).max(4);

    // Pass 1: anything clearly unlike the background, to estimate the foreground colour.
    let coarse: Vec<bool> = px
        .iter()
        .map(|p| dist(p, &bg_rgb) > COARSE_THRESHOLD)
        .collect();
    let coarse = largest_component(&coarse, w, h);
    if count(&coarse) < min_area {
        return none;
    }
    let fg_guess = interior_median(image, &coarse, w, h);

    // Pass 2: pixels more than half-way from the background to the foreground colour, i.e.
    // (for anti-aliased edges) at least half covered, whatever the contrast. This makes the
    // mask's bounding box match the rendered shape's box to within half a pixel.
    let axis: [f32; 3] = std::array::from_fn(|i| fg_guess[i] - bg_rgb[i]);
    let norm2: f32 = axis.iter().map(|a| a * a).sum::<f32>().max(1e-6);
    let along: Vec<f32> = px
        .iter()
        .map(|p| (0..3).map(|i| (p[i] - bg_rgb[i]) * axis[i]).sum::<f32>() / norm2)
        .collect();
    let fine: Vec<bool> = along.iter().map(|&t| t > 0.5).collect();
    let mask = largest_component(&fine, w, h);
    if count(&mask) < min_area {
        return none;
    }
    let fg = Colour::nearest(interior_median(image, &mask, w, h));

    let Some(bbox) = bounding_box(&mask, w, h) else {
        return none;
    };
    let (shape, shape_iou) = best_shape(&along, w, h, &bbox);
    let (sw, sh) = (f64::from(w), f64::from(h));
    let dx = ((bbox.x0 + bbox.x1) / 2.0 - sw / 2.0) / sw;
    let dy = ((bbox.y0 + bbox.y1) / 2.0 - sh / 2.0) / sh;
    let position = if dx.abs().max(dy.abs()) < CENTER_DEAD_ZONE {
        Position::Center
    } else if dx.abs() >= dy.abs() {
        if dx < 0.0 {
            Position::Left
        } else {
            Position::Right
        }
    } else if dy < 0.0 {
        Position::Top
    } else {
        Position::Bottom
    };
    let extent = (bbox.width() / sw).max(bbox.height() / sh);
    let size = if extent < SMALL_MAX {
        Size::Small
    } else if extent < MEDIUM_MAX {
        Size::Medium
    } else {
        Size::Large
    };
    Prediction {
        bg,
        fg: Some(fg),
        shape: (shape_iou >= MIN_SHAPE_IOU).then_some(shape),
        position: Some(position),
        size: Some(size),
        shape_iou,
    }
}

fn dist(a: &[f32; 3], b: &[f32; 3]) -> f32 {
    (0..3).map(|i| (a[i] - b[i]).powi(2)).sum::<f32>().sqrt()
}

fn count(mask: &[bool]) -> usize {
    mask.iter().filter(|&&m| m).count()
}

/// Per-channel median: robust to the odd shape pixel in the frame and to noise.
fn median_rgb(pixels: impl Iterator<Item = [u8; 3]>) -> [f32; 3] {
    let mut hist = [[0usize; 256]; 3];
    let mut n = 0usize;
    for p in pixels {
        for c in 0..3 {
            hist[c][usize::from(p[c])] += 1;
        }
        n += 1;
    }
    hist.map(|hc| {
        let mut seen = 0;
        for (v, k) in hc.iter().enumerate() {
            seen += k;
            if 2 * seen > n {
                return v as f32;
            }
        }
        0.0
    })
}

/// Median colour of the mask eroded by one pixel, skipping the anti-aliased rim (or of the
/// whole mask when it is too thin to erode).
fn interior_median(image: &RgbImage, mask: &[bool], w: u32, h: u32) -> [f32; 3] {
    let at = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && x < i64::from(w)
            && y < i64::from(h)
            && mask[(y * i64::from(w) + x) as usize]
    };
    let interior: Vec<bool> = (0..mask.len())
        .map(|i| {
            let (x, y) = ((i as u32 % w) as i64, (i as u32 / w) as i64);
            at(x, y) && at(x - 1, y) && at(x + 1, y) && at(x, y - 1) && at(x, y + 1)
        })
        .collect();
    let use_mask = if count(&interior) > 0 {
        &interior
    } else {
        mask
    };
    median_rgb(
        image
            .pixels()
            .zip(use_mask)
            .filter(|&(_, &m)| m)
            .map(|(p, _)| p.0),
    )
}

/// The largest 4-connected component of `mask` (ties: the first found in raster order), so
/// stray specks of noise or artefacts do not distort the bounding box.
fn largest_component(mask: &[bool], w: u32, h: u32) -> Vec<bool> {
    let (w, h) = (w as usize, h as usize);
    let mut label = vec![0u32; mask.len()];
    let (mut best, mut best_size, mut next) = (0u32, 0usize, 0u32);
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        next += 1;
        label[start] = next;
        stack.push(start);
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y) = (i % w, i / w);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            for j in neighbours.into_iter().flatten() {
                if mask[j] && label[j] == 0 {
                    label[j] = next;
                    stack.push(j);
                }
            }
        }
        if size > best_size {
            (best, best_size) = (next, size);
        }
    }
    label.iter().map(|&l| l != 0 && l == best).collect()
}

/// The mask's bounding box in pixel coordinates (edges at pixel boundaries).
fn bounding_box(mask: &[bool], w: u32, h: u32) -> Option<Rect> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if mask[(y * w + x) as usize] {
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
            }
        }
    }
    (x0 < x1).then(|| Rect {
        x0: f64::from(x0),
        y0: f64::from(y0),
        x1: f64::from(x1),
        y1: f64::from(y1),
    })
}

/// The shape whose template, rendered by the dataset's renderer into the mask's bounding box,
/// overlaps the image best.
///
/// The overlap is a soft IoU (`Σ min / Σ max`) between the template's per-pixel coverage and
/// the image's estimated coverage `along` (0 at the background colour, 1 at the foreground),
/// over the box grown by a pixel. Comparing coverages rather than thresholded masks keeps
/// half-covered edge pixels from deciding the match at low resolution (a 32-pixel cross has
/// bars under 5 pixels thick).
fn best_shape(along: &[f32], w: u32, h: u32, bbox: &Rect) -> (Shape, f32) {
    // Coverage estimates within noise of 0 or 1 are snapped, so background noise does not
    // pile up in the union.
    let soft = |t: f32| {
        if t < 0.15 {
            0.0
        } else if t > 0.85 {
            1.0
        } else {
            t
        }
    };
    let (x0, y0) = (
        (bbox.x0 as u32).saturating_sub(1),
        (bbox.y0 as u32).saturating_sub(1),
    );
    let (x1, y1) = ((bbox.x1 as u32 + 1).min(w), (bbox.y1 as u32 + 1).min(h));
    let mut best = (Shape::Square, 0.0f32);
    for shape in Shape::ALL {
        let (mut inter, mut union) = (0.0f32, 0.0f32);
        for y in y0..y1 {
            for x in x0..x1 {
                let t = coverage(shape, bbox, x, y);
                let m = soft(along[(y * w + x) as usize]);
                inter += t.min(m);
                union += t.max(m);
            }
        }
        let iou = if union > 0.0 { inter / union } else { 0.0 };
        if iou > best.1 {
            best = (shape, iou);
        }
    }
    best
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use image::{Rgb, RgbImage};

    use super::*;
    use crate::dataset::{Jitter, Scene, render};
    use crate::rng::SplitMix64;

    /// Every (fg, shape, bg) triple at every size and position, with a jitter per image.
    fn every_scene() -> impl Iterator<Item = (Scene, Jitter)> {
        let mut rng = SplitMix64::new(99);
        let mut out = Vec::new();
        for fg in Colour::ALL {
            for bg in Colour::ALL.into_iter().filter(|&b| b != fg) {
                for shape in Shape::ALL {
                    for size in Size::ALL {
                        for position in Position::ALL {
                            let scene = Scene {
                                size,
                                position,
                                size_named: size != Size::Medium,
                                position_named: position != Position::Center,
                                ..Scene::plain(fg, shape, bg)
                            };
                            out.push((scene, Jitter::sample(&mut rng)));
                        }
                    }
                }
            }
        }
        out.into_iter()
    }

    fn exact(pred: &Prediction, s: &Scene) -> bool {
        pred.bg == s.bg
            && pred.fg == Some(s.fg)
            && pred.shape == Some(s.shape)
            && pred.position == Some(s.position)
            && pred.size == Some(s.size)
    }

    /// Slight blur ([1 2 1]/4 separable) then noise of σ = 8 levels per channel.
    fn degrade(img: &RgbImage, rng: &mut SplitMix64) -> RgbImage {
        let (w, h) = img.dimensions();
        let get = |x: i64, y: i64, c: usize| {
            let (x, y) = (x.clamp(0, i64::from(w) - 1), y.clamp(0, i64::from(h) - 1));
            f64::from(img.get_pixel(x as u32, y as u32).0[c])
        };
        RgbImage::from_fn(w, h, |x, y| {
            let (x, y) = (i64::from(x), i64::from(y));
            Rgb(std::array::from_fn(|c| {
                let k = [(-1, 1.0), (0, 2.0), (1, 1.0)];
                let mut v = 0.0;
                for (dy, wy) in k {
                    for (dx, wx) in k {
                        v += wx * wy * get(x + dx, y + dy, c);
                    }
                }
                (v / 16.0 + 8.0 * rng.gaussian()).round().clamp(0.0, 255.0) as u8
            }))
        })
    }

    #[test]
    fn exact_on_clean_renders() {
        let mut wrong = Vec::new();
        let mut n = 0;
        for (scene, jitter) in every_scene() {
            let pred = classify(&render(&scene, 64, jitter));
            n += 1;
            if !exact(&pred, &scene) {
                wrong.push((scene, pred));
            }
        }
        assert_eq!(n, 8 * 7 * 4 * 3 * 5);
        assert!(
            wrong.is_empty(),
            "{} wrong, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(3)]
        );
    }

    #[test]
    fn exact_on_canonical_renders_at_other_resolutions() {
        for res in [32, 48, 128] {
            for (scene, _) in every_scene().step_by(7) {
                let pred = classify(&render(&scene, res, Jitter::NONE));
                assert!(exact(&pred, &scene), "{res}px: {scene:?} read as {pred:?}");
            }
        }
    }

    #[test]
    fn robust_to_blur_and_noise() {
        let mut rng = SplitMix64::new(5);
        let mut scores = Scores::default();
        for (scene, jitter) in every_scene() {
            let img = degrade(&render(&scene, 64, jitter), &mut rng);
            scores.add(&classify(&img), &scene);
        }
        println!("{scores}");
        let all = scores.all.accuracy().unwrap();
        assert!(all >= 0.98, "accuracy {all:.4} under noise\n{scores}");
    }

    #[test]
    fn empty_image_has_no_foreground() {
        let img = RgbImage::from_pixel(64, 64, Rgb(Colour::Green.rgb()));
        let pred = classify(&img);
        assert_eq!(pred.bg, Colour::Green);
        assert_eq!(
            (pred.fg, pred.shape, pred.position, pred.size),
            (None, None, None, None)
        );
        // A speck is not an object either.
        let mut img = img;
        img.put_pixel(30, 30, Rgb(Colour::Red.rgb()));
        assert_eq!(classify(&img).fg, None);
    }

    #[test]
    fn blobs_that_are_no_shape_get_none() {
        // A thin diagonal band: a large blob that matches no template.
        let img = RgbImage::from_fn(64, 64, |x, y| {
            let d = i64::from(x) - i64::from(y);
            let on = d.abs() <= 2 && (8..56).contains(&x);
            Rgb(if on {
                Colour::Red.rgb()
            } else {
                Colour::Blue.rgb()
            })
        });
        let pred = classify(&img);
        assert_eq!(pred.fg, Some(Colour::Red));
        assert_eq!(pred.shape, None, "iou {}", pred.shape_iou);
    }
}

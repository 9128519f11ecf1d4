//! The synthetic dataset: scenes, captions and images, each a pure function of
//! `(seed, index)`, with about 10% of the (fg colour, shape, bg colour) triples held out of
//! training so evaluation can test compositional generalisation.

mod caption;
mod render;
mod vocab;

use image::RgbImage;

pub use caption::{canonical_caption, caption, phrase, phrasing_count};
pub use render::{
    Jitter, MARGIN, MAX_CENTRE_JITTER, MAX_SCALE_JITTER, Rect, coverage, placement, render,
};
pub use vocab::{COLOURS, Colour, NamedColour, Position, Scene, Shape, Size};

use crate::rng::SplitMix64;

/// Probability that a training caption names the size (small or large).
pub const P_SIZE_NAMED: f64 = 0.25;
/// Probability that a training caption names the position (independent of the size).
pub const P_POSITION_NAMED: f64 = 0.25;

/// Whether the triple is held out of training.
///
/// The rule is `(fg + 2·shape + 7·bg) mod 9 == 0` on the palette and shape indices (with
/// `fg != bg`). It was chosen because it holds out 24 of the 224 triples (≈10.7%) while
/// every colour is held out as foreground exactly 3 times, every colour appears as a
/// held-out background 2–4 times, and every shape exactly 6 times; so each word is still
/// seen in training, and every word is also tested in an unseen combination.
pub fn is_held_out(fg: Colour, shape: Shape, bg: Colour) -> bool {
    fg != bg && (fg.index() + 2 * shape.index() + 7 * bg.index()).is_multiple_of(9)
}

/// Every held-out triple, ordered by (fg, shape, bg) index.
pub fn held_out_triples() -> Vec<(Colour, Shape, Colour)> {
    let mut out = Vec::new();
    for fg in Colour::ALL {
        for shape in Shape::ALL {
            for bg in Colour::ALL {
                if is_held_out(fg, shape, bg) {
                    out.push((fg, shape, bg));
                }
            }
        }
    }
    out
}

/// One evaluation prompt and the scene an ideal model would draw for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalPrompt {
    pub prompt: String,
    pub expected: Scene,
}

/// The evaluation prompts, deterministic and ordered:
///
/// 1. every held-out triple once, as `"a {fg} {shape} on a {bg} background"` (24; "an"
///    before "orange");
/// 2. every other held-out triple (0, 2, 4, …) with a position named, cycling left, right,
///    top, bottom: `"a red circle on the left, blue background"` (12);
/// 3. eight held-out triples (1, 4, 7, …) with a size named, alternating small and large:
///    `"a small red circle on a blue background"` (8).
pub fn held_out_prompts() -> Vec<EvalPrompt> {
    prompts_for(&held_out_triples())
}

/// Prompts of the same make as [`held_out_prompts`] for 25 triples that *are* in the
/// training data (every 8th of the 200, in (fg, shape, bg) order, so every shape and colour
/// appears): 45 prompts. The gap between the two scores measures how well the model generalises to
/// unseen combinations, apart from how well it draws at all.
pub fn seen_prompts() -> Vec<EvalPrompt> {
    let mut seen = Vec::new();
    for fg in Colour::ALL {
        for shape in Shape::ALL {
            for bg in Colour::ALL {
                if fg != bg && !is_held_out(fg, shape, bg) {
                    seen.push((fg, shape, bg));
                }
            }
        }
    }
    let triples: Vec<_> = seen.into_iter().step_by(8).collect();
    prompts_for(&triples)
}

fn prompts_for(triples: &[(Colour, Shape, Colour)]) -> Vec<EvalPrompt> {
    let plain = |i: usize| {
        let (fg, shape, bg) = triples[i % triples.len()];
        Scene::plain(fg, shape, bg)
    };
    let mut scenes: Vec<Scene> = (0..triples.len()).map(plain).collect();
    scenes.extend((0..12).map(|i| Scene {
        position: Position::NAMED[i % 4],
        position_named: true,
        ..plain(2 * i)
    }));
    scenes.extend((0..8).map(|i| Scene {
        size: if i % 2 == 0 { Size::Small } else { Size::Large },
        size_named: true,
        ..plain(3 * i + 1)
    }));
    scenes
        .into_iter()
        .map(|expected| EvalPrompt {
            prompt: canonical_caption(&expected),
            expected,
        })
        .collect()
}

/// One training example.
#[derive(Clone, Debug)]
pub struct Sample {
    pub scene: Scene,
    /// The perturbation the image was rendered with.
    pub jitter: Jitter,
    pub caption: String,
    pub image: RgbImage,
}

/// The dataset: an unbounded, random-access sequence of samples.
#[derive(Clone, Debug)]
pub struct ShapesDataset {
    seed: u64,
    resolution: u32,
}

impl ShapesDataset {
    /// The dataset with this seed, rendering `resolution` × `resolution` images.
    ///
    /// # Panics
    /// If `resolution < 32`.
    pub fn new(seed: u64, resolution: u32) -> Self {
        assert!(
            resolution >= 32,
            "resolution {resolution} is below the minimum of 32"
        );
        Self { seed, resolution }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The image side in pixels.
    pub fn resolution(&self) -> u32 {
        self.resolution
    }

    /// The scene of sample `index` (cheap: nothing is rendered).
    pub fn scene(&self, index: u64) -> Scene {
        self.scene_with_rng(index).0
    }

    /// Sample `index`: a pure function of `(seed, index)`.
    pub fn sample(&self, index: u64) -> Sample {
        let (scene, mut rng) = self.scene_with_rng(index);
        let jitter = Jitter::sample(&mut rng);
        let caption = caption(&scene, &mut rng);
        let image = render(&scene, self.resolution, jitter);
        Sample {
            scene,
            jitter,
            caption,
            image,
        }
    }

    /// Draw the scene from the sample's stream, returning the stream for the later draws
    /// (jitter, then phrasing) so `scene` and `sample` always agree.
    fn scene_with_rng(&self, index: u64) -> (Scene, SplitMix64) {
        let mut rng = SplitMix64::for_sample(self.seed, index);
        let (fg, shape, bg) = loop {
            let fg = Colour::ALL[rng.below(8)];
            let mut bg_idx = rng.below(7);
            if bg_idx >= fg.index() {
                bg_idx += 1; // skip fg: a uniform draw over the other 7 colours
            }
            let bg = Colour::ALL[bg_idx];
            let shape = Shape::ALL[rng.below(4)];
            if !is_held_out(fg, shape, bg) {
                break (fg, shape, bg);
            }
        };
        let size_named = rng.next_f64() < P_SIZE_NAMED;
        let size = if size_named {
            [Size::Small, Size::Large][rng.below(2)]
        } else {
            Size::Medium
        };
        let position_named = rng.next_f64() < P_POSITION_NAMED;
        let position = if position_named {
            Position::NAMED[rng.below(4)]
        } else {
            Position::Center
        };
        let scene = Scene {
            shape,
            fg,
            bg,
            size,
            position,
            size_named,
            position_named,
        };
        (scene, rng)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn samples_are_deterministic_and_seed_dependent() {
        let a = ShapesDataset::new(1, 64);
        let b = ShapesDataset::new(1, 64);
        let c = ShapesDataset::new(2, 64);
        for i in [0, 1, 17, 123_456_789] {
            let (x, y) = (a.sample(i), b.sample(i));
            assert_eq!(x.caption, y.caption);
            assert_eq!(x.image, y.image);
            assert_eq!(x.scene, a.scene(i));
        }
        let differ = (0..20)
            .filter(|&i| a.sample(i).image != c.sample(i).image)
            .count();
        assert!(
            differ >= 18,
            "only {differ} of 20 samples differ between seeds"
        );
        assert_ne!(a.sample(0).image, a.sample(1).image);
    }

    #[test]
    fn held_out_rule_covers_every_word() {
        let held = held_out_triples();
        assert_eq!(held.len(), 24);
        for c in Colour::ALL {
            assert!(held.iter().any(|t| t.0 == c), "{c} never a held-out fg");
            assert!(held.iter().any(|t| t.2 == c), "{c} never a held-out bg");
        }
        for s in Shape::ALL {
            assert!(held.iter().any(|t| t.1 == s), "{s} never held out");
        }
    }

    #[test]
    fn training_scenes_follow_the_distribution() {
        let ds = ShapesDataset::new(7, 64);
        let n = 5_000;
        let (mut sizes, mut positions) = (0, 0);
        let (mut fgs, mut bgs, mut shapes) = (HashSet::new(), HashSet::new(), HashSet::new());
        for i in 0..n {
            let s = ds.scene(i);
            assert!(
                !is_held_out(s.fg, s.shape, s.bg),
                "sample {i} is held out: {s:?}"
            );
            assert_ne!(s.fg, s.bg);
            assert_eq!(s.size_named, s.size != Size::Medium);
            assert_eq!(s.position_named, s.position != Position::Center);
            sizes += usize::from(s.size_named);
            positions += usize::from(s.position_named);
            fgs.insert(s.fg);
            bgs.insert(s.bg);
            shapes.insert(s.shape);
        }
        for (what, k) in [("size", sizes), ("position", positions)] {
            let p = k as f64 / n as f64;
            assert!(
                (0.22..0.28).contains(&p),
                "{what} named in {p:.3} of captions"
            );
        }
        assert_eq!((fgs.len(), bgs.len(), shapes.len()), (8, 8, 4));
    }

    #[test]
    fn captions_name_the_attributes() {
        let ds = ShapesDataset::new(3, 32);
        let mut phrasings = HashSet::new();
        for i in 0..400 {
            let Sample {
                scene: s, caption, ..
            } = ds.sample(i);
            let words: Vec<&str> = caption
                .split([' ', ','])
                .filter(|w| !w.is_empty())
                .collect();
            for w in [s.fg.name(), s.shape.name(), s.bg.name()] {
                assert!(words.contains(&w), "{caption:?} lacks {w}");
            }
            assert_eq!(
                words.contains(&"small") || words.contains(&"large"),
                s.size_named,
                "{caption:?}"
            );
            if s.size_named {
                assert!(words.contains(&s.size.name()), "{caption:?}");
            }
            assert_eq!(
                Position::NAMED.iter().any(|p| caption.contains(p.phrase())),
                s.position_named,
                "{caption:?}"
            );
            if s.position_named {
                assert!(caption.contains(s.position.phrase()), "{caption:?}");
            }
            phrasings.insert(caption.replace(s.fg.name(), "F").replace(s.bg.name(), "B"));
        }
        assert!(phrasings.len() > 20);
    }

    #[test]
    fn seen_prompts_are_trained_on_and_cover_every_word() {
        let prompts = seen_prompts();
        assert_eq!(prompts.len(), 25 + 12 + 8);
        for p in &prompts {
            let s = &p.expected;
            assert!(!is_held_out(s.fg, s.shape, s.bg), "{}", p.prompt);
        }
        for shape in Shape::ALL {
            assert!(
                prompts.iter().any(|p| p.expected.shape == shape),
                "{shape:?}"
            );
        }
        for c in Colour::ALL {
            assert!(prompts.iter().any(|p| p.expected.fg == c), "{c:?}");
            assert!(prompts.iter().any(|p| p.expected.bg == c), "{c:?}");
        }
    }

    #[test]
    fn eval_prompts_are_held_out_and_stable() {
        let prompts = held_out_prompts();
        assert_eq!(prompts.len(), 24 + 12 + 8);
        assert_eq!(prompts, held_out_prompts());
        for p in &prompts {
            let e = p.expected;
            assert!(is_held_out(e.fg, e.shape, e.bg));
            assert!(p.prompt.contains(e.fg.name()) && p.prompt.contains(e.shape.name()));
        }
        assert_eq!(
            prompts.iter().filter(|p| p.expected.position_named).count(),
            12
        );
        assert_eq!(prompts.iter().filter(|p| p.expected.size_named).count(), 8);
        let first = &prompts[0];
        assert_eq!(first.prompt, "a red square on an orange background");
    }
}

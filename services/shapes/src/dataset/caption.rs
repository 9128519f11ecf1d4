//! Captions: several phrasings of the same scene, so the text encoder learns the attribute
//! words rather than one fixed template.

use super::vocab::{Position, Scene};
use crate::rng::SplitMix64;

/// The canonical phrasing used by the evaluation prompts: `"a red circle on a blue
/// background"`, `"a small red circle on a blue background"` (size only) or
/// `"a small red circle on the left, blue background"` (a position named).
pub fn canonical_caption(scene: &Scene) -> String {
    let k = if scene.size_named && !scene.position_named {
        1
    } else {
        0
    };
    phrase(scene, k)
}

/// A caption for `scene` in a phrasing drawn from `rng` (one draw).
///
/// Every phrasing names the foreground colour, the shape and the background colour, and the
/// size and position words exactly when `size_named` / `position_named` are set.
pub fn caption(scene: &Scene, rng: &mut SplitMix64) -> String {
    phrase(scene, rng.below(phrasing_count(scene)))
}

/// How many phrasings exist for `scene`: five when nothing extra is named, five when a size
/// and/or position is named, plus one ("… on the right of a white background") that only
/// reads well with a position.
pub fn phrasing_count(scene: &Scene) -> usize {
    if scene.position_named { 6 } else { 5 }
}

/// Phrasing number `k` (`k < phrasing_count(scene)`; larger values wrap).
pub fn phrase(scene: &Scene, k: usize) -> String {
    let (fg, shape, bg) = (scene.fg.name(), scene.shape.name(), scene.bg.name());
    let k = k % phrasing_count(scene);
    if !scene.size_named && !scene.position_named {
        let (a_fg, a_bg) = (article(fg), article(bg));
        return match k {
            0 => format!("{a_fg} {fg} {shape} on {a_bg} {bg} background"),
            1 => format!("{fg} {shape}, {bg} background"),
            2 => format!("{a_fg} {fg} {shape} against {a_bg} {bg} background"),
            3 => format!("{a_bg} {bg} background with {a_fg} {fg} {shape}"),
            _ => format!("{fg} {shape} on {bg}"),
        };
    }
    let object = if scene.size_named {
        format!("{} {fg} {shape}", scene.size.name())
    } else {
        format!("{fg} {shape}")
    };
    // " on the left" (with its leading space) or nothing.
    let pos = if scene.position_named && scene.position != Position::Center {
        format!(" {}", scene.position.phrase())
    } else {
        String::new()
    };
    let (a_obj, a_bg) = (article(&object), article(bg));
    match k {
        0 => format!("{a_obj} {object}{pos}, {bg} background"),
        1 => format!("{a_obj} {object}{pos} on {a_bg} {bg} background"),
        2 => format!("{a_bg} {bg} background with {a_obj} {object}{pos}"),
        3 => format!("{object}{pos}, {bg} background"),
        4 => format!(
            "{a_obj} {object} against {a_bg} {bg} background{}",
            pos.replacen(' ', ", ", 1)
        ),
        _ => format!("{a_obj} {object}{pos} of {a_bg} {bg} background"),
    }
}

/// The indefinite article for the word that starts `phrase` ("an orange", "a red").
fn article(phrase: &str) -> &'static str {
    if phrase.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::vocab::{Colour, Shape, Size};

    #[test]
    fn phrasings_read_as_intended() {
        let plain = Scene::plain(Colour::Red, Shape::Circle, Colour::Blue);
        assert_eq!(
            canonical_caption(&plain),
            "a red circle on a blue background"
        );
        assert_eq!(phrase(&plain, 4), "red circle on blue");
        let named = Scene {
            size: Size::Small,
            size_named: true,
            position: Position::Left,
            position_named: true,
            ..plain
        };
        assert_eq!(
            canonical_caption(&named),
            "a small red circle on the left, blue background"
        );
        assert_eq!(
            phrase(&named, 4),
            "a small red circle against a blue background, on the left"
        );
        assert_eq!(
            phrase(&named, 5),
            "a small red circle on the left of a blue background"
        );
        let sized = Scene {
            size: Size::Large,
            size_named: true,
            ..plain
        };
        assert_eq!(
            phrase(&sized, 4),
            "a large red circle against a blue background"
        );
        assert_eq!(
            canonical_caption(&sized),
            "a large red circle on a blue background"
        );
        let orange = Scene::plain(Colour::Orange, Shape::Cross, Colour::Orange);
        assert_eq!(
            canonical_caption(&orange),
            "an orange cross on an orange background"
        );
    }
}

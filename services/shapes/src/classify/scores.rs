//! Per-attribute accuracy over a set of (prediction, expected scene) pairs, for `sd eval`
//! and regression tests.

use std::fmt;

use super::Prediction;
use crate::dataset::Scene;

/// Correct / total for one attribute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub correct: u64,
    pub total: u64,
}

impl Tally {
    /// Count one outcome.
    pub fn record(&mut self, correct: bool) {
        self.correct += u64::from(correct);
        self.total += 1;
    }

    /// `correct / total`, or `None` when nothing was counted.
    pub fn accuracy(&self) -> Option<f64> {
        (self.total > 0).then(|| self.correct as f64 / self.total as f64)
    }
}

/// Accuracy per attribute. Position and size are only scored for prompts that name them
/// (an unnamed attribute is the model's free choice); `all` counts prompts where every
/// scored attribute was right.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scores {
    pub bg: Tally,
    pub fg: Tally,
    pub shape: Tally,
    pub position: Tally,
    pub size: Tally,
    pub all: Tally,
}

impl Scores {
    /// Empty scores.
    pub fn new() -> Self {
        Self::default()
    }

    /// Score one image; returns whether every scored attribute was right.
    pub fn add(&mut self, pred: &Prediction, expected: &Scene) -> bool {
        let mut ok = true;
        let mut check = |tally: &mut Tally, right: bool| {
            tally.record(right);
            ok &= right;
        };
        check(&mut self.bg, pred.bg == expected.bg);
        check(&mut self.fg, pred.fg == Some(expected.fg));
        check(&mut self.shape, pred.shape == Some(expected.shape));
        if expected.position_named {
            check(&mut self.position, pred.position == Some(expected.position));
        }
        if expected.size_named {
            check(&mut self.size, pred.size == Some(expected.size));
        }
        self.all.record(ok);
        ok
    }

    /// Add another set of scores into this one.
    pub fn merge(&mut self, other: &Scores) {
        for (a, b) in [
            (&mut self.bg, &other.bg),
            (&mut self.fg, &other.fg),
            (&mut self.shape, &other.shape),
            (&mut self.position, &other.position),
            (&mut self.size, &other.size),
            (&mut self.all, &other.all),
        ] {
            a.correct += b.correct;
            a.total += b.total;
        }
    }
}

impl fmt::Display for Scores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:>8} {:>7} {:>9}",
            "attribute", "correct", "total", "accuracy"
        )?;
        for (name, t) in [
            ("background", &self.bg),
            ("colour", &self.fg),
            ("shape", &self.shape),
            ("position", &self.position),
            ("size", &self.size),
            ("all", &self.all),
        ] {
            let acc = t
                .accuracy()
                .map_or_else(|| "-".to_owned(), |a| format!("{:.1}%", 100.0 * a));
            writeln!(f, "{name:<10} {:>8} {:>7} {acc:>9}", t.correct, t.total)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dataset::{Colour, Position, Shape, Size};

    #[test]
    fn only_named_attributes_are_scored() {
        let scene = Scene::plain(Colour::Red, Shape::Circle, Colour::Blue);
        let pred = Prediction {
            bg: Colour::Blue,
            fg: Some(Colour::Red),
            shape: Some(Shape::Circle),
            position: Some(Position::Left),
            size: Some(Size::Large),
            shape_iou: 0.9,
        };
        let mut s = Scores::new();
        assert!(s.add(&pred, &scene));
        let named = Scene {
            position: Position::Right,
            position_named: true,
            ..scene
        };
        assert!(!s.add(&pred, &named));
        assert_eq!(
            s.position,
            Tally {
                correct: 0,
                total: 1
            }
        );
        assert_eq!(s.size.accuracy(), None);
        assert_eq!(s.all.accuracy(), Some(0.5));
        let mut t = Scores::new();
        t.merge(&s);
        assert_eq!(t, s);
        let table = s.to_string();
        assert!(
            table.contains("position") && table.contains("50.0%"),
            "{table}"
        );
    }
}

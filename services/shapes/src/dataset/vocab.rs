//! The closed vocabulary the captions and the classifier share: colours, shapes, sizes and
//! positions, each with the word(s) used for it in captions.

use std::fmt;

/// One of the eight named colours. The palette is small and well separated so that a colour
/// can be read back from a (noisy, generated) image by nearest-neighbour lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
    White,
    Black,
}

/// A colour's caption word and the exact RGB it is rendered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamedColour {
    pub colour: Colour,
    pub name: &'static str,
    pub rgb: [u8; 3],
}

/// The palette, in [`Colour`] order (so `COLOURS[c.index()].colour == c`).
pub const COLOURS: [NamedColour; 8] = [
    NamedColour {
        colour: Colour::Red,
        name: "red",
        rgb: [220, 40, 40],
    },
    NamedColour {
        colour: Colour::Orange,
        name: "orange",
        rgb: [245, 140, 30],
    },
    NamedColour {
        colour: Colour::Yellow,
        name: "yellow",
        rgb: [240, 220, 40],
    },
    NamedColour {
        colour: Colour::Green,
        name: "green",
        rgb: [40, 170, 60],
    },
    NamedColour {
        colour: Colour::Blue,
        name: "blue",
        rgb: [40, 80, 220],
    },
    NamedColour {
        colour: Colour::Purple,
        name: "purple",
        rgb: [140, 60, 190],
    },
    NamedColour {
        colour: Colour::White,
        name: "white",
        rgb: [245, 245, 245],
    },
    NamedColour {
        colour: Colour::Black,
        name: "black",
        rgb: [20, 20, 20],
    },
];

impl Colour {
    /// Every colour, in palette order.
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
        Colour::White,
        Colour::Black,
    ];

    /// Position in [`Colour::ALL`] and [`COLOURS`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The caption word, e.g. `"red"`.
    pub fn name(self) -> &'static str {
        COLOURS[self.index()].name
    }

    /// The exact rendering colour.
    pub fn rgb(self) -> [u8; 3] {
        COLOURS[self.index()].rgb
    }

    /// The colour named by `word` (case-insensitive), if any.
    pub fn parse(word: &str) -> Option<Colour> {
        Colour::ALL
            .into_iter()
            .find(|c| word.eq_ignore_ascii_case(c.name()))
    }

    /// The named colour nearest to `rgb` (Euclidean in RGB: the palette's closest pair,
    /// orange/yellow, is still ~80 levels apart, so nothing subtler is needed).
    pub fn nearest(rgb: [f32; 3]) -> Colour {
        let dist = |c: &Colour| {
            let p = c.rgb();
            (0..3)
                .map(|i| (rgb[i] - f32::from(p[i])).powi(2))
                .sum::<f32>()
        };
        Colour::ALL
            .into_iter()
            .min_by(|a, b| dist(a).total_cmp(&dist(b)))
            .unwrap_or(Colour::Black)
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The four shapes. Each fills a square box of side "extent" (see [`Size::extent`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// A disc inscribed in the box.
    Circle,
    /// The box itself.
    Square,
    /// Apex at the top middle of the box, base along its bottom edge.
    Triangle,
    /// A plus sign whose bars are a third of the extent thick.
    Cross,
}

impl Shape {
    /// Every shape, in index order.
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];

    /// Position in [`Shape::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The caption word, e.g. `"circle"`.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
        }
    }

    /// The shape named by `word` (case-insensitive), if any.
    pub fn parse(word: &str) -> Option<Shape> {
        Shape::ALL
            .into_iter()
            .find(|s| word.eq_ignore_ascii_case(s.name()))
    }

    /// Whether the point `(u, v)` of the unit box (`v` pointing down) is inside the shape.
    pub fn contains_unit(self, u: f64, v: f64) -> bool {
        if !(0.0..=1.0).contains(&u) || !(0.0..=1.0).contains(&v) {
            return false;
        }
        let (du, dv) = (u - 0.5, v - 0.5);
        match self {
            Shape::Circle => du * du + dv * dv <= 0.25,
            Shape::Square => true,
            Shape::Triangle => du.abs() <= v / 2.0,
            Shape::Cross => du.abs() <= 1.0 / 6.0 || dv.abs() <= 1.0 / 6.0,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How large the shape is. Medium is the default and is never named in a caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Size {
    Small,
    Medium,
    Large,
}

impl Size {
    /// Every size, smallest first.
    pub const ALL: [Size; 3] = [Size::Small, Size::Medium, Size::Large];

    /// The shape's box side as a fraction of the image side (before jitter). Large is a
    /// little under the nominal 0.62 so that, with jitter and an off-centre position, the
    /// shape stays clear of the image's border frame the classifier reads the background from.
    pub fn extent(self) -> f64 {
        match self {
            Size::Small => 0.30,
            Size::Medium => 0.45,
            Size::Large => 0.60,
        }
    }

    /// The caption word (`"medium"` is only used in tables, never in captions).
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
        }
    }

    /// The size named by `word` (case-insensitive), if any.
    pub fn parse(word: &str) -> Option<Size> {
        Size::ALL
            .into_iter()
            .find(|s| word.eq_ignore_ascii_case(s.name()))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the shape sits. Center is the default and is never named in a caption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Position {
    Center,
    Left,
    Right,
    Top,
    Bottom,
}

impl Position {
    /// Every position, center first.
    pub const ALL: [Position; 5] = [
        Position::Center,
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
    ];

    /// The positions a caption can name.
    pub const NAMED: [Position; 4] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
    ];

    /// The nominal offset of the shape's centre from the image centre, as a fraction of the
    /// side (`y` pointing down). Large shapes are pulled back in so they stay inside.
    pub fn offset(self) -> (f64, f64) {
        const D: f64 = 0.22;
        match self {
            Position::Center => (0.0, 0.0),
            Position::Left => (-D, 0.0),
            Position::Right => (D, 0.0),
            Position::Top => (0.0, -D),
            Position::Bottom => (0.0, D),
        }
    }

    /// A single word, e.g. `"left"` (for tables and parsing).
    pub fn name(self) -> &'static str {
        match self {
            Position::Center => "center",
            Position::Left => "left",
            Position::Right => "right",
            Position::Top => "top",
            Position::Bottom => "bottom",
        }
    }

    /// The caption phrase, e.g. `"on the left"` or `"at the top"`.
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Center => "in the center",
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
        }
    }

    /// The position named by `word` (case-insensitive; `"centre"` accepted), if any.
    pub fn parse(word: &str) -> Option<Position> {
        if word.eq_ignore_ascii_case("centre") {
            return Some(Position::Center);
        }
        Position::ALL
            .into_iter()
            .find(|p| word.eq_ignore_ascii_case(p.name()))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one image shows, and which of its attributes its caption names.
///
/// Invariants: `fg != bg`; `size == Medium` unless `size_named` (then small or large);
/// `position == Center` unless `position_named`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scene {
    pub shape: Shape,
    pub fg: Colour,
    pub bg: Colour,
    pub size: Size,
    pub position: Position,
    pub size_named: bool,
    pub position_named: bool,
}

impl Scene {
    /// A medium, centred scene whose caption names neither size nor position.
    pub fn plain(fg: Colour, shape: Shape, bg: Colour) -> Scene {
        Scene {
            shape,
            fg,
            bg,
            size: Size::Medium,
            position: Position::Center,
            size_named: false,
            position_named: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_consistent() {
        for (i, c) in Colour::ALL.into_iter().enumerate() {
            assert_eq!(COLOURS[i].colour, c);
            assert_eq!(c.index(), i);
            assert_eq!(Colour::parse(c.name()), Some(c));
            let rgb = c.rgb().map(f32::from);
            assert_eq!(Colour::nearest(rgb), c);
        }
        for s in Shape::ALL {
            assert_eq!(Shape::parse(&s.name().to_uppercase()), Some(s));
        }
        for s in Size::ALL {
            assert_eq!(Size::parse(s.name()), Some(s));
        }
        for p in Position::ALL {
            assert_eq!(Position::parse(p.name()), Some(p));
        }
        assert_eq!(Position::parse("centre"), Some(Position::Center));
        assert_eq!(Colour::parse("mauve"), None);
    }

    #[test]
    fn palette_is_well_separated() {
        for a in Colour::ALL {
            for b in Colour::ALL {
                if a != b {
                    let d: f32 = (0..3)
                        .map(|i| (f32::from(a.rgb()[i]) - f32::from(b.rgb()[i])).powi(2))
                        .sum();
                    assert!(d.sqrt() > 75.0, "{a} vs {b}");
                }
            }
        }
    }
}

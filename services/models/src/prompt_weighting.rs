//! Prompt emphasis, as the widely used web UIs write it (AUTOMATIC1111's
//! `modules/prompt_parser.py::parse_prompt_attention` and `sd_hijack_clip.py::process_tokens`).
//!
//! Syntax: `(text:1.3)` gives `text` weight 1.3, `(text)` multiplies by 1.1, `[text]` divides by
//! 1.1, nesting multiplies; `\(`, `\)`, `\[`, `\]`, `\:` and `\\` are literal characters. Unlike
//! the reference, which silently closes unbalanced brackets, malformed input here is an error
//! naming the byte where it goes wrong: a client learns its prompt was misread instead of
//! getting an image of something else.
//!
//! Applying the weights ([`apply_weights`]) multiplies each token's hidden state by its weight,
//! then rescales the row so its mean is what it was (the reference's
//! `z *= w; z *= old_mean / new_mean`).

use crate::ModelError;
use tch::{Kind, Tensor};

/// `(text)` multiplies by this, `[text]` divides by it (the reference's constants).
pub const ROUND_BRACKET_MULTIPLIER: f32 = 1.1;
/// `[text]` divides by this.
pub const SQUARE_BRACKET_MULTIPLIER: f32 = 1.0 / 1.1;

/// A piece of prompt text and the weight of its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Fragment {
    /// The text with escapes resolved.
    pub text: String,
    pub weight: f32,
}

/// Malformed emphasis syntax: what is wrong and the 0-based byte offset in the prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at byte {position}")]
pub struct ParseError {
    pub message: String,
    pub position: usize,
}

/// Splits `prompt` into fragments of equal weight, in order. Adjacent fragments of the same
/// weight are merged (as the reference does), empty ones dropped; a prompt with no text gives
/// one empty fragment of weight 1.
pub fn parse(prompt: &str) -> Result<Vec<Fragment>, ParseError> {
    let mut parser = Parser {
        src: prompt,
        pos: 0,
        out: Vec::new(),
        floor: 0,
    };
    parser.group(1.0, None)?;
    let mut merged: Vec<Fragment> = Vec::new();
    for f in parser.out {
        if f.text.is_empty() {
            continue;
        }
        match merged.last_mut() {
            Some(last) if last.weight == f.weight => last.text.push_str(&f.text),
            _ => merged.push(f),
        }
    }
    if merged.is_empty() {
        merged.push(Fragment {
            text: String::new(),
            weight: 1.0,
        });
    }
    Ok(merged)
}

/// What closes the group being parsed, and where it opened.
#[derive(Clone, Copy)]
enum Open {
    Round(usize),
    Square(usize),
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    out: Vec<Fragment>,
    /// Index of the innermost open group's first fragment: text never merges into fragments
    /// before it, since that group may still be rescaled by its `:number`.
    floor: usize,
}

impl Parser<'_> {
    fn push(&mut self, c: char, weight: f32) {
        let mergeable = self.out.len() > self.floor;
        match self.out.last_mut() {
            Some(last) if mergeable && last.weight == weight => last.text.push(c),
            _ => self.out.push(Fragment {
                text: c.to_string(),
                weight,
            }),
        }
    }

    fn err<T>(&self, message: impl Into<String>, position: usize) -> Result<T, ParseError> {
        Err(ParseError {
            message: message.into(),
            position,
        })
    }

    /// Parses until the bracket closing `open` (or the end, at top level). `weight` is the
    /// product of the enclosing groups' multipliers; a round group's own multiplier (1.1 or
    /// its `:number`) is only known at its end, so its fragments are rescaled then.
    fn group(&mut self, weight: f32, open: Option<Open>) -> Result<(), ParseError> {
        let parent_floor = std::mem::replace(&mut self.floor, self.out.len());
        let result = self.group_body(weight, open);
        self.floor = parent_floor;
        result
    }

    fn group_body(&mut self, weight: f32, open: Option<Open>) -> Result<(), ParseError> {
        let first = self.out.len();
        while let Some(c) = self.src[self.pos..].chars().next() {
            let at = self.pos;
            self.pos += c.len_utf8();
            match c {
                '\\' => match self.src[self.pos..].chars().next() {
                    Some(e @ ('(' | ')' | '[' | ']' | ':' | '\\')) => {
                        self.pos += 1;
                        self.push(e, weight);
                    }
                    // A backslash before anything else is itself, as in the reference.
                    _ => self.push('\\', weight),
                },
                '(' => self.group(weight * ROUND_BRACKET_MULTIPLIER, Some(Open::Round(at)))?,
                '[' => self.group(weight * SQUARE_BRACKET_MULTIPLIER, Some(Open::Square(at)))?,
                ':' if matches!(open, Some(Open::Round(_))) => {
                    let end = match self.src[self.pos..].find(')') {
                        Some(i) => self.pos + i,
                        None => {
                            let Some(Open::Round(o)) = open else {
                                unreachable!()
                            };
                            return self.err("unclosed '('", o);
                        }
                    };
                    let value = parse_weight(&self.src[self.pos..end], self.pos)?;
                    self.pos = end + 1;
                    // The group's fragments were pushed at weight * 1.1: replace that factor.
                    let scale = value / ROUND_BRACKET_MULTIPLIER;
                    for f in &mut self.out[first..] {
                        f.weight *= scale;
                    }
                    return Ok(());
                }
                ')' => {
                    return match open {
                        Some(Open::Round(_)) => Ok(()),
                        Some(Open::Square(o)) => {
                            self.err(format!("')' does not close the '[' at byte {o}"), at)
                        }
                        None => self.err("unmatched ')'", at),
                    };
                }
                ']' => {
                    return match open {
                        Some(Open::Square(_)) => Ok(()),
                        Some(Open::Round(o)) => {
                            self.err(format!("']' does not close the '(' at byte {o}"), at)
                        }
                        None => self.err("unmatched ']'", at),
                    };
                }
                c => self.push(c, weight),
            }
        }
        match open {
            None => Ok(()),
            Some(Open::Round(o)) => self.err("unclosed '('", o),
            Some(Open::Square(o)) => self.err("unclosed '['", o),
        }
    }
}

/// The number after `:` in `(text:number)`: optional sign, digits with at most one `.`,
/// surrounding spaces allowed. `start` is its byte offset, for errors.
fn parse_weight(raw: &str, start: usize) -> Result<f32, ParseError> {
    let lead = raw.len() - raw.trim_start().len();
    let text = raw.trim();
    let bad = |message: String| ParseError {
        message,
        position: start + lead,
    };
    if text.is_empty() {
        return Err(ParseError {
            message: "empty weight after ':'".into(),
            position: start,
        });
    }
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    let well_formed = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1
        && digits.chars().any(|c| c.is_ascii_digit());
    match text.parse::<f32>() {
        Ok(w) if well_formed && w.is_finite() => Ok(w),
        _ => Err(bad(format!("weight {text:?} is not a number"))),
    }
}

/// Applies per-token weights to hidden states `[R, T, D]` (`weights`: `R * T` values, row
/// major): each row is multiplied by its weights, then by `old_mean / new_mean` so its mean
/// over all positions (padding included) is unchanged (the reference's `process_tokens`, taken
/// per row here so one prompt's emphasis does not rescale another's). Rows whose weights are all
/// 1 are returned untouched, bit for bit. Computed in f32, returned in the input's dtype.
pub fn apply_weights(hidden: &Tensor, weights: &[f32]) -> Result<Tensor, ModelError> {
    let size = hidden.size();
    let &[r, t, _] = size.as_slice() else {
        return Err(ModelError::Input(format!(
            "hidden states must be [R, T, D], got {size:?}"
        )));
    };
    if weights.len() as i64 != r * t {
        return Err(ModelError::Input(format!(
            "{} weights for hidden states of shape {size:?}",
            weights.len()
        )));
    }
    let per_row = weights.chunks_exact(t as usize);
    if per_row.clone().all(|w| w.iter().all(|&x| x == 1.0)) {
        return Ok(hidden.shallow_clone());
    }
    let kind = hidden.kind();
    let mut rows = Vec::with_capacity(r as usize);
    for (i, w) in per_row.enumerate() {
        let row = hidden.f_narrow(0, i as i64, 1)?;
        if w.iter().all(|&x| x == 1.0) {
            rows.push(row);
            continue;
        }
        let z = row.f_to_kind(Kind::Float)?;
        let w = Tensor::f_from_slice(w)?
            .f_to_device(hidden.device())?
            .f_view([1, t, 1])?;
        let old_mean = z.f_mean(Kind::Float)?;
        let weighted = z.f_mul(&w)?;
        let new_mean = weighted.f_mean(Kind::Float)?;
        let restored = weighted.f_mul(&old_mean.f_div(&new_mean)?)?;
        rows.push(restored.f_to_kind(kind)?);
    }
    Ok(Tensor::f_cat(&rows, 0)?)
}

// Tests unwrap: a failure should stop the test where it happens, with its message.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frags(p: &str) -> Vec<(String, f32)> {
        parse(p)
            .unwrap()
            .into_iter()
            .map(|f| (f.text, f.weight))
            .collect()
    }

    fn close(a: &[(String, f32)], b: &[(&str, f32)]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for ((ta, wa), (tb, wb)) in a.iter().zip(b) {
            assert_eq!(ta, tb, "{a:?} vs {b:?}");
            // Products of a few f32 factors: a few ulps apart at most.
            assert!((wa - wb).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn plain_text_is_one_fragment() {
        close(&frags("a red circle"), &[("a red circle", 1.0)]);
        close(&frags(""), &[("", 1.0)]);
        // Colons outside round brackets are text.
        close(&frags("time: noon"), &[("time: noon", 1.0)]);
    }

    #[test]
    fn brackets_and_explicit_weights() {
        close(
            &frags("a (red:1.5) circle"),
            &[("a ", 1.0), ("red", 1.5), (" circle", 1.0)],
        );
        close(&frags("(red)"), &[("red", 1.1)]);
        close(&frags("[red]"), &[("red", 1.0 / 1.1)]);
        close(&frags("( red : 0.5 )"), &[(" red ", 0.5)]);
        close(&frags("(red:-1)"), &[("red", -1.0)]);
        // Weight 1 merges back with its neighbours.
        close(&frags("(red:1.0) circle"), &[("red circle", 1.0)]);
    }

    #[test]
    fn nesting_multiplies() {
        // A group right after one of the same weight still gets its own `:number`.
        close(&frags("((a)(b:2))"), &[("a", 1.21), ("b", 2.2)]);
        close(
            &frags("((a)) [b [c]] (d (e:2):0.5)"),
            &[
                ("a", 1.21),
                (" ", 1.0),
                ("b ", 1.0 / 1.1),
                ("c", 1.0 / 1.21),
                (" ", 1.0),
                ("d ", 0.5),
                ("e", 1.0),
            ],
        );
    }

    #[test]
    fn escapes_are_literal() {
        close(
            &frags(r"\(a\) \[b\] c\:d \\ e\x"),
            &[(r"(a) [b] c:d \ e\x", 1.0)],
        );
        close(&frags(r"(x\):2)"), &[("x)", 2.0)]);
    }

    #[test]
    fn malformed_input_names_the_byte() {
        let err = |p: &str| parse(p).unwrap_err();
        assert_eq!(err("a (b").position, 2);
        assert_eq!(err("a (b").to_string(), "unclosed '(' at byte 2");
        assert_eq!(err("a [b (c]").position, 7);
        assert_eq!(err("a b)").position, 3);
        assert_eq!(err("a b]").to_string(), "unmatched ']' at byte 3");
        assert_eq!(err("(a:1.2.3)").position, 3);
        assert!(err("(a:1.2.3)").message.contains("\"1.2.3\""));
        assert_eq!(err("(a:)").to_string(), "empty weight after ':' at byte 3");
        assert_eq!(err("(a:  )").position, 3);
        assert_eq!(err("(a: x)").position, 4);
        assert_eq!(err("(a:1e3)").position, 3);
        assert_eq!(err("(a:.)").position, 3);
        assert_eq!(err("(a:nan)").position, 3);
        assert_eq!(err("(a:1").position, 0);
        assert_eq!(err("((a:2)").position, 0);
        // Multi-byte characters before the error: the offset is in bytes.
        assert_eq!(err("é)").position, 2);
    }

    #[test]
    fn weighting_restores_the_row_mean_and_leaves_weight_one_rows_alone() {
        let hidden =
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).view([2, 2, 2]);
        let weights = [2.0, 1.0, 1.0, 1.0];
        let out = apply_weights(&hidden, &weights).unwrap();
        let got: Vec<f32> = Vec::try_from(out.flatten(0, -1)).unwrap();
        // Row 0: [2,4,3,4] has mean 3.25, the original 2.5: scale by 2.5/3.25.
        let s = 2.5 / 3.25;
        let want = [2.0 * s, 4.0 * s, 3.0 * s, 4.0 * s, 5.0, 6.0, 7.0, 8.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(&got[4..], &[5.0, 6.0, 7.0, 8.0]);
        let same = apply_weights(&hidden, &[1.0; 4]).unwrap();
        assert!(same.equal(&hidden));
        assert!(apply_weights(&hidden, &[1.0; 3]).is_err());
    }
}

//! The loss curve as a PNG, drawn with the `image` crate alone: one panel per training stage,
//! the raw per-step loss in light grey, a moving average in colour, on a log scale with a
//! grid line at every power of ten.

use image::{Rgb, RgbImage};

const WIDTH: u32 = 640;
const PANEL_HEIGHT: u32 = 240;
const MARGIN: u32 = 12;

/// A curve to draw: its per-step losses and the colour of its moving average.
#[derive(Debug)]
pub struct Curve<'a> {
    pub losses: &'a [f32],
    pub colour: [u8; 3],
}

/// Draws one panel per curve, stacked vertically.
pub fn loss_curves(curves: &[Curve<'_>]) -> RgbImage {
    let height = PANEL_HEIGHT * curves.len().max(1) as u32;
    let mut img = RgbImage::from_pixel(WIDTH, height, Rgb([255, 255, 255]));
    for (i, curve) in curves.iter().enumerate() {
        panel(&mut img, i as u32 * PANEL_HEIGHT, curve);
    }
    img
}

fn panel(img: &mut RgbImage, top: u32, curve: &Curve<'_>) {
    let (x0, x1) = (MARGIN as f32, (WIDTH - MARGIN) as f32);
    let (y0, y1) = ((top + MARGIN) as f32, (top + PANEL_HEIGHT - MARGIN) as f32);
    let finite: Vec<f32> = curve
        .losses
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    frame(img, x0, y0, x1, y1);
    if finite.len() < 2 {
        return;
    }
    let lo = finite
        .iter()
        .copied()
        .fold(f32::INFINITY, f32::min)
        .log10()
        .floor();
    let hi = finite
        .iter()
        .copied()
        .fold(0.0, f32::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let to_y = |v: f32| y1 - (v.max(1e-30).log10() - lo) / (hi - lo) * (y1 - y0);
    let n = curve.losses.len();
    let to_x = |i: usize| x0 + i as f32 / (n - 1).max(1) as f32 * (x1 - x0);
    // Decade grid lines.
    let mut decade = lo;
    while decade <= hi {
        let y = to_y(10f32.powf(decade));
        line(img, (x0, y), (x1, y), Rgb([225, 225, 225]));
        decade += 1.0;
    }
    let raw: Vec<(f32, f32)> = (0..n).map(|i| (to_x(i), to_y(curve.losses[i]))).collect();
    polyline(img, &raw, Rgb([200, 200, 200]));
    let window = (n / 50).max(1);
    let smooth: Vec<(f32, f32)> = (0..n)
        .map(|i| {
            let from = i.saturating_sub(window - 1);
            let part = &curve.losses[from..=i];
            (to_x(i), to_y(part.iter().sum::<f32>() / part.len() as f32))
        })
        .collect();
    polyline(img, &smooth, Rgb(curve.colour));
}

fn frame(img: &mut RgbImage, x0: f32, y0: f32, x1: f32, y1: f32) {
    let black = Rgb([60, 60, 60]);
    line(img, (x0, y0), (x0, y1), black);
    line(img, (x0, y1), (x1, y1), black);
}

fn polyline(img: &mut RgbImage, points: &[(f32, f32)], colour: Rgb<u8>) {
    for pair in points.windows(2) {
        line(img, pair[0], pair[1], colour);
    }
}

/// A straight segment, sampled at one point per pixel of its longer side.
fn line(img: &mut RgbImage, (ax, ay): (f32, f32), (bx, by): (f32, f32), colour: Rgb<u8>) {
    let steps = (bx - ax).abs().max((by - ay).abs()).ceil().max(1.0) as u32;
    for s in 0..=steps {
        let t = s as f32 / steps as f32;
        let (x, y) = (ax + (bx - ax) * t, ay + (by - ay) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_panel_per_curve_with_the_curve_colour() {
        let falling: Vec<f32> = (0..200).map(|i| 1.0 / (1.0 + i as f32)).collect();
        let img = loss_curves(&[
            Curve {
                losses: &falling,
                colour: [200, 0, 0],
            },
            Curve {
                losses: &[],
                colour: [0, 0, 200],
            },
        ]);
        assert_eq!(img.dimensions(), (WIDTH, 2 * PANEL_HEIGHT));
        let red = img.pixels().filter(|p| p.0 == [200, 0, 0]).count();
        assert!(red > 100, "moving average drawn ({red} pixels)");
    }
}

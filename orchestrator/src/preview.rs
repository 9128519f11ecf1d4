//! Cheap previews of a generation in progress: latents mapped straight to RGB by a fixed
//! linear projection, no VAE call. The factors are the widely used least-squares fit of
//! Stable Diffusion's 4-channel latent space to RGB; other latent spaces get no preview.

use image::{ExtendedColorType, ImageEncoder, codecs::png::PngEncoder};
use sd_proto::v1::{Image, OutputFormat};

/// RGB contribution of each of the 4 latent channels (SD 1.x/2.x VAE).
const LATENT_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// A PNG (at latent resolution) of the first image's latents, `[N, 4, h, w]`; `None` when
/// the latent space is not 4-channel.
pub fn latents_to_png(latents: &[f32], shape: &[i64; 4]) -> Option<Image> {
    let [_, c, h, w] = *shape;
    if c != 4 {
        return None;
    }
    let (h, w) = (h as usize, w as usize);
    let plane = h * w;
    let mut rgb = vec![0u8; plane * 3];
    for p in 0..plane {
        for (k, out) in rgb[p * 3..p * 3 + 3].iter_mut().enumerate() {
            let v: f32 = (0..4)
                .map(|ch| latents[ch * plane + p] * LATENT_RGB[ch][k])
                .sum();
            *out = (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    let mut png = Vec::new();
    PngEncoder::new(&mut png)
        .write_image(&rgb, w as u32, h as u32, ExtendedColorType::Rgb8)
        .ok()?;
    Some(Image {
        data: png.into(),
        format: OutputFormat::Png as i32,
        width: w as u32,
        height: h as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_four_channel_latents_only() {
        let latents = vec![0.5f32; 2 * 4 * 3 * 5];
        let img = latents_to_png(&latents, &[2, 4, 3, 5]).unwrap();
        assert_eq!((img.width, img.height), (5, 3));
        let decoded = image::load_from_memory(&img.data).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (5, 3));
        assert!(latents_to_png(&vec![0.0; 16 * 4], &[1, 16, 2, 2]).is_none());
    }
}

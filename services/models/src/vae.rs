//! The VAE's encoder and decoder: diffusers `models/autoencoders/vae.py` (`Encoder`,
//! `Decoder`). Variable names equal the checkpoint's under `encoder.` and `decoder.`.

use crate::resnet::{conv2d, group_norm};
use crate::unet_2d_blocks::{BlockConfig, DownBlock2D, MidBlock2D, UpBlock2D};
use tch::{Tensor, nn, nn::Module};

/// The VAE blocks' fixed settings: `resnet_eps=1e-6`, no time embedding, no text attention.
fn blocks(groups: usize) -> BlockConfig {
    BlockConfig {
        groups,
        eps: 1e-6,
        temb_channels: None,
        transformer: None,
    }
}

/// `Encoder(double_z=True)`: image `[B, in, H, W]` to the Gaussian's parameters
/// `[B, 2 * latent, H / f, W / f]` (before `quant_conv`).
#[derive(Debug)]
pub struct Encoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<DownBlock2D>,
    mid_block: MidBlock2D,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

/// The shape parameters [`Encoder`] and [`Decoder`] share, from `vae/config.json`.
#[derive(Debug, Clone, Copy)]
pub struct CoderConfig<'a> {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: &'a [usize],
    pub layers_per_block: usize,
    pub groups: usize,
    pub mid_block_add_attention: bool,
}

impl Encoder {
    /// `out_channels` is the latent width; the last conv doubles it for mean and log-variance.
    pub fn new(p: nn::Path, c: CoderConfig<'_>) -> Self {
        let boc = c.block_out_channels;
        let n = boc.len();
        let b = blocks(c.groups);
        let mut output_channel = boc[0];
        let down_blocks = (0..n)
            .map(|i| {
                let input_channel = output_channel;
                output_channel = boc[i];
                // DownEncoderBlock2D(downsample_padding=0)
                DownBlock2D::new(
                    &p / "down_blocks" / i,
                    input_channel,
                    output_channel,
                    c.layers_per_block,
                    i + 1 < n,
                    0,
                    &b,
                )
            })
            .collect();
        Self {
            conv_in: conv2d(&p / "conv_in", c.in_channels, boc[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock2D::new_vae(
                &p / "mid_block",
                boc[n - 1],
                c.mid_block_add_attention,
                &b,
            ),
            conv_norm_out: group_norm(&p / "conv_norm_out", c.groups, boc[n - 1], 1e-6),
            conv_out: conv2d(&p / "conv_out", boc[n - 1], 2 * c.out_channels, 3, 1, 1),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(xs);
        for block in &self.down_blocks {
            h = block.forward(&h, None, None).0;
        }
        let h = self.mid_block.forward(&h, None, None);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// `Decoder(norm_type="group")`: latents `[B, latent, h, w]` (after `post_quant_conv`) to
/// an image `[B, out, h * f, w * f]`.
#[derive(Debug)]
pub struct Decoder {
    conv_in: nn::Conv2D,
    mid_block: MidBlock2D,
    up_blocks: Vec<UpBlock2D>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    pub fn new(p: nn::Path, c: CoderConfig<'_>) -> Self {
        let boc = c.block_out_channels;
        let n = boc.len();
        let b = blocks(c.groups);
        let mut output_channel = boc[n - 1];
        let up_blocks = (0..n)
            .map(|i| {
                let prev_output_channel = output_channel;
                output_channel = boc[n - 1 - i];
                // UpDecoderBlock2D(num_layers=layers_per_block + 1)
                UpBlock2D::new_decoder(
                    &p / "up_blocks" / i,
                    prev_output_channel,
                    output_channel,
                    c.layers_per_block + 1,
                    i + 1 < n,
                    &b,
                )
            })
            .collect();
        Self {
            conv_in: conv2d(&p / "conv_in", c.in_channels, boc[n - 1], 3, 1, 1),
            mid_block: MidBlock2D::new_vae(
                &p / "mid_block",
                boc[n - 1],
                c.mid_block_add_attention,
                &b,
            ),
            up_blocks,
            conv_norm_out: group_norm(&p / "conv_norm_out", c.groups, boc[0], 1e-6),
            conv_out: conv2d(&p / "conv_out", boc[0], c.out_channels, 3, 1, 1),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let h = self.conv_in.forward(xs);
        let mut h = self.mid_block.forward(&h, None, None);
        for block in &self.up_blocks {
            h = block.forward(&h, &mut Vec::new(), None, None);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

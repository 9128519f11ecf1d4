//! The U-Net's and the VAE's down, mid and up blocks: diffusers `models/unets/unet_2d_blocks.py`.
//!
//! A cross-attention block and its plain counterpart differ only by the transformer after
//! each resnet, so one struct serves both (`attentions` empty for `DownBlock2D`/`UpBlock2D`).
//! Variable names equal the checkpoint's (`resnets.N`, `attentions.N`, `downsamplers.0`,
//! `upsamplers.0`).

use crate::attention::{SpatialSelfAttention, Transformer2DModel, TransformerConfig};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use tch::{Tensor, nn};

/// What the blocks of one model share: groups, eps, time-embedding width and (for
/// cross-attention blocks) the transformer settings, whose `in_channels` is set per block.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: Option<usize>,
    /// `None` for `DownBlock2D`/`UpBlock2D` (and the VAE's blocks).
    pub transformer: Option<TransformerConfig>,
}

impl BlockConfig {
    fn resnet(&self, cin: usize, cout: usize) -> ResnetConfig {
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: 1.0,
        }
    }

    fn transformer(&self, p: nn::Path, channels: usize) -> Option<Transformer2DModel> {
        self.transformer.map(|t| {
            Transformer2DModel::new(
                p,
                TransformerConfig {
                    in_channels: channels,
                    ..t
                },
            )
        })
    }
}

/// `CrossAttnDownBlock2D` / `DownBlock2D` (U-Net) and `DownEncoderBlock2D` (VAE encoder).
#[derive(Debug)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    /// `downsample_padding` is 1 in the U-Net and 0 in the VAE encoder (see [`Downsample2D`]).
    pub fn new(
        p: nn::Path,
        cin: usize,
        cout: usize,
        layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        c: &BlockConfig,
    ) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let rin = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::new(&p / "resnets" / i, c.resnet(rin, cout)));
            attentions.extend(c.transformer(&p / "attentions" / i, cout));
        }
        let downsampler = add_downsample
            .then(|| Downsample2D::new(&p / "downsamplers" / 0, cout, downsample_padding));
        Self {
            resnets,
            attentions,
            downsampler,
        }
    }

    /// Returns the block's output and, for the U-Net's skip connections, every intermediate
    /// state (one per resnet, plus the downsampler's output), as `CrossAttnDownBlock2D.forward`.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        context: Option<&Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let mut h = xs.shallow_clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb);
            if let (Some(attn), Some(ctx)) = (self.attentions.get(i), context) {
                h = attn.forward(&h, ctx);
            }
            states.push(h.shallow_clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h);
            states.push(h.shallow_clone());
        }
        (h, states)
    }
}

/// `CrossAttnUpBlock2D` / `UpBlock2D` (U-Net, with skip inputs) and `UpDecoderBlock2D` (VAE).
#[derive(Debug)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock2D {
    /// U-Net up block: resnet `i` takes `prev_output_channel` (i == 0) or `out_channels`,
    /// concatenated with a skip of `in_channels` (last resnet) or `out_channels` channels.
    pub fn new_unet(
        p: nn::Path,
        cin: usize,
        prev_out: usize,
        cout: usize,
        layers: usize,
        add_upsample: bool,
        c: &BlockConfig,
    ) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { cin } else { cout };
            let rin = if i == 0 { prev_out } else { cout };
            resnets.push(ResnetBlock2D::new(
                &p / "resnets" / i,
                c.resnet(rin + skip, cout),
            ));
            attentions.extend(c.transformer(&p / "attentions" / i, cout));
        }
        let upsampler = add_upsample.then(|| Upsample2D::new(&p / "upsamplers" / 0, cout));
        Self {
            resnets,
            attentions,
            upsampler,
        }
    }

    /// VAE decoder block (`UpDecoderBlock2D`): no skips, no time embedding.
    pub fn new_decoder(
        p: nn::Path,
        cin: usize,
        cout: usize,
        layers: usize,
        add_upsample: bool,
        c: &BlockConfig,
    ) -> Self {
        let resnets = (0..layers)
            .map(|i| {
                ResnetBlock2D::new(
                    &p / "resnets" / i,
                    c.resnet(if i == 0 { cin } else { cout }, cout),
                )
            })
            .collect();
        let upsampler = add_upsample.then(|| Upsample2D::new(&p / "upsamplers" / 0, cout));
        Self {
            resnets,
            attentions: Vec::new(),
            upsampler,
        }
    }

    /// How many skip states this block consumes (one per resnet).
    pub fn skips(&self) -> usize {
        self.resnets.len()
    }

    /// `CrossAttnUpBlock2D.forward`: each resnet takes the last remaining skip state,
    /// concatenated on channels. `skips` is empty for the VAE decoder.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: Option<&Tensor>,
        context: Option<&Tensor>,
    ) -> Tensor {
        let mut h = xs.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(skip) = skips.pop() {
                h = Tensor::cat(&[&h, &skip], 1);
            }
            h = resnet.forward(&h, temb);
            if let (Some(attn), Some(ctx)) = (self.attentions.get(i), context) {
                h = attn.forward(&h, ctx);
            }
        }
        match &self.upsampler {
            Some(u) => u.forward(&h),
            None => h,
        }
    }
}

/// What sits between the resnets of a mid block: the U-Net's text transformer or the VAE's
/// single-head spatial self-attention.
#[derive(Debug)]
enum MidAttention {
    Cross(Box<Transformer2DModel>),
    Spatial(Box<SpatialSelfAttention>),
}

/// `UNetMidBlock2DCrossAttn` (U-Net) and `UNetMidBlock2D` (VAE): resnet, then
/// (attention, resnet) once (`num_layers=1`).
#[derive(Debug)]
pub struct MidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<MidAttention>,
}

impl MidBlock2D {
    /// U-Net mid block; `c.transformer` must be set. `output_scale_factor` is the config's
    /// `mid_block_scale_factor`.
    pub fn new_cross_attn(
        p: nn::Path,
        channels: usize,
        output_scale_factor: f64,
        c: &BlockConfig,
    ) -> Self {
        let rc = ResnetConfig {
            output_scale_factor,
            ..c.resnet(channels, channels)
        };
        Self {
            resnets: vec![
                ResnetBlock2D::new(&p / "resnets" / 0, rc),
                ResnetBlock2D::new(&p / "resnets" / 1, rc),
            ],
            attentions: c
                .transformer(&p / "attentions" / 0, channels)
                .map(|t| MidAttention::Cross(Box::new(t)))
                .into_iter()
                .collect(),
        }
    }

    /// VAE mid block; `add_attention` is the config's `mid_block_add_attention`.
    pub fn new_vae(p: nn::Path, channels: usize, add_attention: bool, c: &BlockConfig) -> Self {
        let rc = c.resnet(channels, channels);
        let attentions = if add_attention {
            let attn = SpatialSelfAttention::new(&p / "attentions" / 0, channels, c.groups, c.eps);
            vec![MidAttention::Spatial(Box::new(attn))]
        } else {
            Vec::new()
        };
        Self {
            resnets: vec![
                ResnetBlock2D::new(&p / "resnets" / 0, rc),
                ResnetBlock2D::new(&p / "resnets" / 1, rc),
            ],
            attentions,
        }
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>, context: Option<&Tensor>) -> Tensor {
        let mut h = self.resnets[0].forward(xs, temb);
        for (i, resnet) in self.resnets.iter().enumerate().skip(1) {
            match (self.attentions.get(i - 1), context) {
                (Some(MidAttention::Cross(t)), Some(ctx)) => h = t.forward(&h, ctx),
                (Some(MidAttention::Spatial(a)), _) => h = a.forward(&h),
                _ => {}
            }
            h = resnet.forward(&h, temb);
        }
        h
    }
}

//! Residual blocks and the 2x resamplers shared by the U-Net and the VAE.
//!
//! Mirrors diffusers `models/resnet.py` (`ResnetBlock2D`), `models/downsampling.py`
//! (`Downsample2D`) and `models/upsampling.py` (`Upsample2D`); variable names equal the
//! checkpoint's (`norm1`, `conv1`, `time_emb_proj`, ..., `conv`).

use tch::{Tensor, nn, nn::Module};

/// A `torch.nn.GroupNorm` with affine parameters, as every diffusers block uses.
pub(crate) fn group_norm(p: nn::Path, groups: usize, channels: usize, eps: f64) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig {
        eps,
        affine: true,
        ..Default::default()
    };
    nn::group_norm(p, groups as i64, channels as i64, cfg)
}

/// A `torch.nn.Conv2d` with bias, square kernel, given stride and padding.
pub(crate) fn conv2d(
    p: nn::Path,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride: stride as i64,
        padding: padding as i64,
        ..Default::default()
    };
    nn::conv2d(p, cin as i64, cout as i64, kernel as i64, cfg)
}

/// A `torch.nn.Linear`, with or without bias.
pub(crate) fn linear(p: nn::Path, cin: usize, cout: usize, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        cin as i64,
        cout as i64,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

/// `ResnetBlock2D` with `time_embedding_norm="default"`, SiLU, pre-norm, as used by SD 1.x/2.x.
///
/// `temb_channels` is `None` in the VAE, which has no time conditioning and therefore no
/// `time_emb_proj` weights.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    output_scale_factor: f64,
}

/// Construction parameters of [`ResnetBlock2D`] (the diffusers constructor's arguments).
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(p: nn::Path, c: ResnetConfig) -> Self {
        let (cin, cout) = (c.in_channels, c.out_channels);
        Self {
            norm1: group_norm(&p / "norm1", c.groups, cin, c.eps),
            conv1: conv2d(&p / "conv1", cin, cout, 3, 1, 1),
            time_emb_proj: c
                .temb_channels
                .map(|t| linear(&p / "time_emb_proj", t, cout, true)),
            norm2: group_norm(&p / "norm2", c.groups, cout, c.eps),
            conv2: conv2d(&p / "conv2", cout, cout, 3, 1, 1),
            // `use_in_shortcut` defaults to `in_channels != out_channels`; a 1x1 conv.
            conv_shortcut: (cin != cout).then(|| conv2d(&p / "conv_shortcut", cin, cout, 1, 1, 0)),
            output_scale_factor: c.output_scale_factor,
        }
    }

    /// `ResnetBlock2D.forward`: `(shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale`.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(xs).silu());
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
        }
        // Dropout is the identity at inference.
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D(use_conv=True)`: a stride-2 3x3 conv named `conv`.
///
/// The U-Net uses `padding=1`; the VAE encoder uses `padding=0` and instead pads one zero
/// column/row on the right/bottom first, which is why the padding is a parameter.
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    padding: usize,
}

impl Downsample2D {
    pub fn new(p: nn::Path, channels: usize, padding: usize) -> Self {
        Self {
            conv: conv2d(&p / "conv", channels, channels, 3, 2, padding),
            padding,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if self.padding == 0 {
            // Downsample2D.forward: F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0)
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour 2x then a 3x3 conv named `conv`.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(p: nn::Path, channels: usize) -> Self {
        Self {
            conv: conv2d(&p / "conv", channels, channels, 3, 1, 1),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let (h, w) = (xs.size()[2], xs.size()[3]);
        // Upsample2D.forward: F.interpolate(scale_factor=2.0, mode="nearest")
        self.conv
            .forward(&xs.upsample_nearest2d([2 * h, 2 * w], None, None))
    }
}

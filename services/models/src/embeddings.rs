//! Timestep embeddings: diffusers `models/embeddings.py` (`get_timestep_embedding`,
//! `Timesteps`, `TimestepEmbedding`).

use crate::resnet::linear;
use tch::{Kind, Tensor, nn, nn::Module};

/// Sinusoidal embedding of one timestep per sample (`timesteps: [B]`) into `[B, dim]`, f32.
///
/// Follows `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift,
/// scale=1, max_period=10000)`; computed in f32 whatever the model's kind, as diffusers does.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor {
    let half = (dim / 2) as i64;
    let device = timesteps.device();
    // exponent = -ln(max_period) * arange(half) / (half - downscale_freq_shift)
    let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64).ln())
        / (half as f64 - freq_shift);
    let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * exponent.exp().unsqueeze(0);
    let (sin, cos) = (emb.sin(), emb.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], -1)
    } else {
        Tensor::cat(&[sin, cos], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `TimestepEmbedding(in_channels, time_embed_dim, act_fn="silu")`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    pub fn new(p: nn::Path, in_channels: usize, time_embed_dim: usize) -> Self {
        Self {
            linear_1: linear(&p / "linear_1", in_channels, time_embed_dim, true),
            linear_2: linear(&p / "linear_2", time_embed_dim, time_embed_dim, true),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}

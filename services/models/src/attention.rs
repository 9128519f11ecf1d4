//! Attention and the spatial transformer that injects the text context into the U-Net.
//!
//! Mirrors diffusers `models/attention_processor.py` (`Attention` with `AttnProcessor2_0`),
//! `models/attention.py` (`BasicTransformerBlock`, `FeedForward`, `GEGLU`) and
//! `models/transformers/transformer_2d.py` (`Transformer2DModel`, continuous input). Variable
//! names equal the checkpoint's (`to_q`, `to_out.0`, `ff.net.0.proj`, `proj_in`, ...).

use crate::resnet::{group_norm, linear};
use tch::{Kind, Tensor, nn, nn::Module};

/// Multi-head attention over token sequences `[B, N, C]`, computed by libtorch's fused
/// `scaled_dot_product_attention` (the same kernel diffusers' `AttnProcessor2_0` calls).
#[derive(Debug)]
pub struct Attention {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
    /// Compute the attention product in f32 even when the model runs in f16/bf16
    /// (`upcast_attention` in SD 2.x, `upcast_softmax` in the VAE): the logits overflow f16.
    upcast: bool,
}

impl Attention {
    /// `Attention(query_dim, cross_attention_dim, heads, dim_head, bias)`; `to_out.0` always
    /// has a bias (`out_bias=True`).
    pub fn new(
        p: nn::Path,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        bias: bool,
        upcast: bool,
    ) -> Self {
        let inner = heads * dim_head;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Self {
            to_q: linear(&p / "to_q", query_dim, inner, bias),
            to_k: linear(&p / "to_k", kv_dim, inner, bias),
            to_v: linear(&p / "to_v", kv_dim, inner, bias),
            to_out: linear(&p / "to_out" / 0, inner, query_dim, true),
            heads: heads as i64,
            upcast,
        }
    }

    /// `AttnProcessor2_0.__call__` on `[B, N, C]` tokens; `context` (`[B, T, D]`) makes it
    /// cross-attention, `None` self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(xs);
        let q = self.to_q.forward(xs);
        let k = self.to_k.forward(ctx);
        let v = self.to_v.forward(ctx);
        let (b, n, inner) = (q.size()[0], q.size()[1], q.size()[2]);
        let dim_head = inner / self.heads;
        // [B, N, H*D] -> [B, H, N, D]
        let split = |t: Tensor| t.view([b, -1, self.heads, dim_head]).transpose(1, 2);
        let (q, k, v) = (split(q), split(k), split(v));
        let kind = q.kind();
        let out = if self.upcast && kind != Kind::Float {
            let f = |t: &Tensor| t.to_kind(Kind::Float);
            Tensor::scaled_dot_product_attention(
                &f(&q),
                &f(&k),
                &f(&v),
                None::<Tensor>,
                0.0,
                false,
                None,
                false,
            )
            .to_kind(kind)
        } else {
            // Default scale 1/sqrt(dim_head), as `Attention.scale`.
            Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                None,
                false,
            )
        };
        let out = out.transpose(1, 2).reshape([b, n, inner]);
        // to_out.1 is dropout: the identity at inference.
        self.to_out.forward(&out)
    }
}

/// The VAE mid-block attention: `Attention(..., norm_num_groups, residual_connection=True,
/// _from_deprecated_attn_block=True)` over the pixels of a `[B, C, H, W]` map, single head.
#[derive(Debug)]
pub struct SpatialSelfAttention {
    group_norm: nn::GroupNorm,
    attn: Attention,
}

impl SpatialSelfAttention {
    pub fn new(p: nn::Path, channels: usize, groups: usize, eps: f64) -> Self {
        Self {
            group_norm: group_norm(&p / "group_norm", groups, channels, eps),
            // heads = in_channels // attention_head_dim with attention_head_dim = in_channels.
            attn: Attention::new(p, channels, None, 1, channels, true, true),
        }
    }

    /// `AttnProcessor2_0.__call__` with 4-D input: norm, attend over H*W tokens, add residual.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().expect("4-D map, checked by the caller");
        let tokens = self
            .group_norm
            .forward(xs)
            .view([b, c, h * w])
            .transpose(1, 2);
        let out = self
            .attn
            .forward(&tokens, None)
            .transpose(1, 2)
            .reshape([b, c, h, w]);
        out + xs
    }
}

/// `FeedForward(dim, activation_fn="geglu")`: `net.0` is `GEGLU` (a projection to twice the
/// inner width, half of it gating the other through exact GELU), `net.2` projects back.
#[derive(Debug)]
pub struct FeedForward {
    proj_in: nn::Linear,
    proj_out: nn::Linear,
}

impl FeedForward {
    pub fn new(p: nn::Path, dim: usize, mult: usize) -> Self {
        let inner = dim * mult;
        Self {
            proj_in: linear(&p / "net" / 0 / "proj", dim, inner * 2, true),
            proj_out: linear(&p / "net" / 2, inner, dim, true),
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        // GEGLU.forward: hidden_states, gate = proj(x).chunk(2, dim=-1); hidden_states * gelu(gate)
        let h = self.proj_in.forward(xs);
        let parts = h.chunk(2, -1);
        let gated = &parts[0] * parts[1].gelu("none");
        self.proj_out.forward(&gated)
    }
}

/// `BasicTransformerBlock` with `norm_type="layer_norm"`: self-attention, cross-attention on
/// the text context, GEGLU feed-forward, each pre-normed and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        p: nn::Path,
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: usize,
        upcast: bool,
    ) -> Self {
        // BasicTransformerBlock defaults: norm_eps=1e-5, elementwise affine, attention_bias=False.
        let ln = |name: &str| {
            nn::layer_norm(
                &p / name,
                vec![dim as i64],
                nn::LayerNormConfig {
                    eps: 1e-5,
                    ..Default::default()
                },
            )
        };
        Self {
            norm1: ln("norm1"),
            attn1: Attention::new(&p / "attn1", dim, None, heads, dim_head, false, upcast),
            norm2: ln("norm2"),
            attn2: Attention::new(
                &p / "attn2",
                dim,
                Some(context_dim),
                heads,
                dim_head,
                false,
                upcast,
            ),
            norm3: ln("norm3"),
            ff: FeedForward::new(&p / "ff", dim, 4),
        }
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let xs = self.attn1.forward(&self.norm1.forward(xs), None) + xs;
        let xs = self.attn2.forward(&self.norm2.forward(&xs), Some(context)) + xs;
        self.ff.forward(&self.norm3.forward(&xs)) + xs
    }
}

/// Projection into and out of the transformer: a 1x1 conv (SD 1.x) or a linear layer on the
/// token axis (`use_linear_projection`, SD 2.x). The two hold different weight shapes.
#[derive(Debug)]
enum Projection {
    Conv(nn::Conv2D),
    Linear(nn::Linear),
}

/// `Transformer2DModel` for continuous `[B, C, H, W]` input, as the SD U-Net uses it.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Construction parameters of [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub in_channels: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl Transformer2DModel {
    pub fn new(p: nn::Path, c: TransformerConfig) -> Self {
        let inner = c.heads * c.dim_head;
        let proj = |name: &str, cin: usize, cout: usize| {
            if c.use_linear_projection {
                Projection::Linear(linear(&p / name, cin, cout, true))
            } else {
                Projection::Conv(crate::resnet::conv2d(&p / name, cin, cout, 1, 1, 0))
            }
        };
        Self {
            // Transformer2DModel: GroupNorm(norm_num_groups, in_channels, eps=1e-6).
            norm: group_norm(&p / "norm", c.groups, c.in_channels, 1e-6),
            proj_in: proj("proj_in", c.in_channels, inner),
            blocks: (0..c.layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &p / "transformer_blocks" / i,
                        inner,
                        c.heads,
                        c.dim_head,
                        c.context_dim,
                        c.upcast_attention,
                    )
                })
                .collect(),
            proj_out: proj("proj_out", inner, c.in_channels),
        }
    }

    /// `Transformer2DModel._operate_on_continuous_inputs` / `_get_output_for_continuous_inputs`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Tensor {
        let (b, _, h, w) = xs.size4().expect("4-D map, checked by the caller");
        let normed = self.norm.forward(xs);
        let to_tokens = |t: Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(c) => to_tokens(c.forward(&normed)),
            Projection::Linear(l) => l.forward(&to_tokens(normed)),
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context);
        }
        let to_map = |t: Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous()
        };
        let out = match &self.proj_out {
            Projection::Conv(c) => c.forward(&to_map(tokens)),
            Projection::Linear(l) => to_map(l.forward(&tokens)),
        };
        out + xs
    }
}

//! The conditional U-Net (noise predictor) of Stable Diffusion 1.x and 2.x: diffusers
//! `models/unets/unet_2d_condition.py` (`UNet2DConditionModel`), configured from
//! `unet/config.json`.
//!
//! Only the features SD 1.x/2.x checkpoints use are built; every other config switch must hold
//! its default, and a config that sets one is refused naming the field, rather than silently
//! computing something else.

use crate::attention::TransformerConfig;
use crate::embeddings::{TimestepEmbedding, timestep_embedding};
use crate::resnet::{conv2d, group_norm};
use crate::unet_2d_blocks::{BlockConfig, DownBlock2D, MidBlock2D, UpBlock2D};
use crate::{ModelError, weights};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn, nn::Module};

/// The checkpoint file stem of diffusers model components.
pub const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

/// A config value given either once for every block or as one value per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    /// Expands to one value per block; a list of the wrong length is a config error.
    pub fn per_block(&self, n: usize, field: &str) -> Result<Vec<usize>, String> {
        match self {
            Self::One(v) => Ok(vec![*v; n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => Err(format!(
                "`{field}` has {} entries but there are {n} blocks",
                v.len()
            )),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_sample_size() -> usize {
    64
}
fn default_channels() -> usize {
    4
}
fn default_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers() -> PerBlock {
    PerBlock::One(2)
}
fn default_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_head_dim() -> PerBlock {
    PerBlock::One(8)
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_eps() -> f64 {
    1e-5
}
fn default_cross() -> usize {
    1280
}
fn default_scale() -> f64 {
    1.0
}
fn default_padding() -> usize {
    1
}
fn default_kernel() -> usize {
    3
}
fn default_silu() -> String {
    "silu".into()
}
fn default_default() -> String {
    "default".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_false_value() -> serde_json::Value {
    serde_json::Value::Bool(false)
}

/// `unet/config.json`, with diffusers' defaults for absent keys. Unknown keys are ignored
/// (`_class_name`, `_diffusers_version`, ...); the keys of features this crate does not build
/// are read so that [`UNet2DConditionConfig::validate`] can refuse non-default values.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    /// Must be `false` (or all `false`): the SD checkpoints never set it.
    #[serde(default = "default_false_value")]
    pub only_cross_attention: serde_json::Value,
    #[serde(default = "default_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "default_padding")]
    pub downsample_padding: usize,
    #[serde(default = "default_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross")]
    pub cross_attention_dim: usize,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    /// Per-head width in name, but SD configs use it as the head count: see [`Self::heads`].
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default = "default_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default = "default_default")]
    pub attention_type: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "default_scale")]
    pub resnet_out_scale_factor: f64,
    /// Conditioning extras SD 1.x/2.x do not have; each must be absent or null.
    #[serde(default)]
    pub class_embed_type: Option<serde_json::Value>,
    #[serde(default)]
    pub addition_embed_type: Option<serde_json::Value>,
    #[serde(default)]
    pub num_class_embeds: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<serde_json::Value>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<serde_json::Value>,
    #[serde(default)]
    pub timestep_post_act: Option<serde_json::Value>,
    #[serde(default)]
    pub cross_attention_norm: Option<serde_json::Value>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

/// The per-block numbers the model is built from, derived once from the config.
#[derive(Debug, Clone)]
struct Plan {
    cross_attn_down: Vec<bool>,
    cross_attn_up: Vec<bool>,
    mid: bool,
    layers: Vec<usize>,
    heads: Vec<usize>,
    transformer_layers: Vec<usize>,
    groups: usize,
}

impl UNet2DConditionConfig {
    /// Number of attention heads per down block. diffusers' quirk, kept for compatibility:
    /// `num_attention_heads = num_attention_heads or attention_head_dim`, so SD configs'
    /// `attention_head_dim` (8, or [5, 10, 20, 20]) is in fact the head count.
    pub fn heads(&self) -> Result<Vec<usize>, String> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.per_block(n, "num_attention_heads"),
            None => self.attention_head_dim.per_block(n, "attention_head_dim"),
        }
    }

    /// How much H and W shrink from input to the bottleneck: `2^(blocks - 1)`.
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Checks that the config describes a model this crate builds exactly.
    pub fn validate(&self) -> Result<(), String> {
        self.plan().map(|_| ())
    }

    fn plan(&self) -> Result<Plan, String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        let kind = |field: &str, v: &str, cross: &str, plain: &str| -> Result<bool, String> {
            if v == cross {
                Ok(true)
            } else if v == plain {
                Ok(false)
            } else {
                Err(format!(
                    "unsupported `{field}` entry {v:?} (supported: {cross}, {plain})"
                ))
            }
        };
        let cross_attn_down = self
            .down_block_types
            .iter()
            .map(|v| kind("down_block_types", v, "CrossAttnDownBlock2D", "DownBlock2D"))
            .collect::<Result<Vec<_>, _>>()?;
        let cross_attn_up = self
            .up_block_types
            .iter()
            .map(|v| kind("up_block_types", v, "CrossAttnUpBlock2D", "UpBlock2D"))
            .collect::<Result<Vec<_>, _>>()?;
        let mid = match self.mid_block_type.as_deref() {
            None => false,
            Some("UNetMidBlock2DCrossAttn") => true,
            Some(other) => {
                return Err(format!(
                    "unsupported `mid_block_type` {other:?} (supported: UNetMidBlock2DCrossAttn, null)"
                ));
            }
        };
        let groups = self
            .norm_num_groups
            .ok_or("`norm_num_groups` null is not supported")?;
        for (field, ok) in [
            ("act_fn", self.act_fn == "silu"),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
            ),
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
            ),
            ("attention_type", self.attention_type == "default"),
            ("dual_cross_attention", !self.dual_cross_attention),
            ("resnet_skip_time_act", !self.resnet_skip_time_act),
            (
                "resnet_out_scale_factor",
                self.resnet_out_scale_factor == 1.0,
            ),
            ("conv_in_kernel", self.conv_in_kernel == 3),
            ("conv_out_kernel", self.conv_out_kernel == 3),
            (
                "only_cross_attention",
                only_false(&self.only_cross_attention),
            ),
        ] {
            if !ok {
                return Err(format!(
                    "unsupported `{field}` (only the Stable Diffusion 1.x/2.x setting is built)"
                ));
            }
        }
        for (field, v) in [
            ("class_embed_type", &self.class_embed_type),
            ("addition_embed_type", &self.addition_embed_type),
            ("num_class_embeds", &self.num_class_embeds),
            ("encoder_hid_dim", &self.encoder_hid_dim),
            ("time_cond_proj_dim", &self.time_cond_proj_dim),
            ("timestep_post_act", &self.timestep_post_act),
            ("cross_attention_norm", &self.cross_attention_norm),
            (
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            ),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(format!(
                    "unsupported `{field}` {} (must be null for Stable Diffusion 1.x/2.x)",
                    v.as_ref().map(|v| v.to_string()).unwrap_or_default()
                ));
            }
        }
        let heads = self.heads()?;
        let layers = self.layers_per_block.per_block(n, "layers_per_block")?;
        let transformer_layers = self
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || c % groups != 0 {
                return Err(format!(
                    "`block_out_channels[{i}]` = {c} is not a positive multiple of `norm_num_groups` = {groups}"
                ));
            }
            if heads[i] == 0 || c % heads[i] != 0 {
                return Err(format!(
                    "`block_out_channels[{i}]` = {c} is not divisible by the {} attention heads of block {i}",
                    heads[i]
                ));
            }
            if layers[i] == 0 {
                return Err(format!("`layers_per_block[{i}]` is 0"));
            }
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.cross_attention_dim == 0 {
            return Err(
                "`in_channels`, `out_channels` and `cross_attention_dim` must be positive".into(),
            );
        }
        Ok(Plan {
            cross_attn_down,
            cross_attn_up,
            mid,
            layers,
            heads,
            transformer_layers,
            groups,
        })
    }
}

fn only_false(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Bool(b) => !b,
        serde_json::Value::Array(a) => a.iter().all(|x| x == &serde_json::Value::Bool(false)),
        _ => false,
    }
}

/// The Stable Diffusion U-Net: predicts the noise in `sample` at `timesteps`, conditioned on
/// the text encoder's `encoder_hidden_states`.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: nn::Conv2D,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock2D>,
    mid_block: Option<MidBlock2D>,
    up_blocks: Vec<UpBlock2D>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    device: Device,
    kind: Kind,
    /// Owns the variables the modules above hold handles to.
    vs: nn::VarStore,
}

impl UNet2DConditionModel {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors` (a
    /// diffusers `unet` folder), computing in `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, ModelError> {
        Self::load_variant(dir, device, kind, None)
    }

    /// As [`Self::load`], requiring the weights variant `variant` (e.g. `fp16`) when given.
    pub fn load_variant(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let config: UNet2DConditionConfig = weights::read_json(&config_path)?;
        let mut model = Self::build(nn::VarStore::new(device), config, &config_path)?;
        weights::load_component(&model.vs, dir, WEIGHTS_STEM, variant, &[])?;
        model.vs.set_kind(kind);
        model.kind = kind;
        Ok(model)
    }

    /// Builds the modules (f32, default-initialised) under the checkpoint's tensor names.
    fn build(
        vs: nn::VarStore,
        config: UNet2DConditionConfig,
        config_path: &Path,
    ) -> Result<Self, ModelError> {
        let root = &vs.root();
        let plan = config.plan().map_err(|message| ModelError::Config {
            path: PathBuf::from(config_path),
            message,
        })?;
        let c = &config;
        let boc = &c.block_out_channels;
        let n = boc.len();
        let time_embed_dim = c.time_embedding_dim.unwrap_or(boc[0] * 4);
        let block = |cross: bool, channels_heads: usize, layers: usize| BlockConfig {
            groups: plan.groups,
            eps: c.norm_eps,
            temb_channels: Some(time_embed_dim),
            transformer: cross.then_some(TransformerConfig {
                in_channels: 0, // set per block
                heads: plan.heads[channels_heads],
                dim_head: 0,
                layers,
                context_dim: c.cross_attention_dim,
                groups: plan.groups,
                use_linear_projection: c.use_linear_projection,
                upcast_attention: c.upcast_attention,
            }),
        };
        // Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, ...)
        let with_dim_head = |mut b: BlockConfig, channels: usize| {
            if let Some(t) = b.transformer.as_mut() {
                t.dim_head = channels / t.heads;
            }
            b
        };
        let mut down_blocks = Vec::with_capacity(n);
        let mut output_channel = boc[0];
        for i in 0..n {
            let input_channel = output_channel;
            output_channel = boc[i];
            let b = with_dim_head(
                block(plan.cross_attn_down[i], i, plan.transformer_layers[i]),
                output_channel,
            );
            down_blocks.push(DownBlock2D::new(
                root / "down_blocks" / i,
                input_channel,
                output_channel,
                plan.layers[i],
                i + 1 < n,
                c.downsample_padding,
                &b,
            ));
        }
        let mid_block = plan.mid.then(|| {
            let b = with_dim_head(
                block(true, n - 1, plan.transformer_layers[n - 1]),
                boc[n - 1],
            );
            MidBlock2D::new_cross_attn(root / "mid_block", boc[n - 1], c.mid_block_scale_factor, &b)
        });
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = boc[n - 1];
        for i in 0..n {
            // Reversed per-block lists: block i of the up path mirrors down block n-1-i.
            let r = n - 1 - i;
            let prev_output_channel = output_channel;
            output_channel = boc[r];
            let input_channel = boc[r.saturating_sub(1)];
            let b = with_dim_head(
                block(plan.cross_attn_up[i], r, plan.transformer_layers[r]),
                output_channel,
            );
            up_blocks.push(UpBlock2D::new_unet(
                root / "up_blocks" / i,
                input_channel,
                prev_output_channel,
                output_channel,
                plan.layers[r] + 1,
                i + 1 < n,
                &b,
            ));
        }
        let conv_in = conv2d(root / "conv_in", c.in_channels, boc[0], 3, 1, 1);
        let time_embedding =
            TimestepEmbedding::new(root / "time_embedding", boc[0], time_embed_dim);
        let conv_norm_out = group_norm(root / "conv_norm_out", plan.groups, boc[0], c.norm_eps);
        let conv_out = conv2d(root / "conv_out", boc[0], c.out_channels, 3, 1, 1);
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            device: vs.device(),
            kind: Kind::Float,
            vs,
            config,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The model's device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The element type the model computes in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Predicts the noise (or v) for `sample` `[B, in_channels, H, W]` at `timesteps` `[B]`
    /// (one per sample, so requests at different steps share a batch; a single value is
    /// broadcast), given `encoder_hidden_states` `[B, T, cross_attention_dim]` of any length
    /// `T`. Inputs are moved to the model's device and kind; the output has the model's kind.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let (b, _, _, _) = self.check_inputs(sample, timesteps, encoder_hidden_states)?;
        guarded(|| {
            tch::no_grad(|| {
                let sample = sample.to_device(self.device).to_kind(self.kind);
                let ctx = encoder_hidden_states
                    .to_device(self.device)
                    .to_kind(self.kind);
                let t = timesteps
                    .to_device(self.device)
                    .to_kind(Kind::Float)
                    .reshape([-1])
                    .expand([b], false);
                self.forward_checked(&sample, &t, &ctx)
            })
        })
    }

    fn forward_checked(&self, sample: &Tensor, timesteps: &Tensor, ctx: &Tensor) -> Tensor {
        let c = &self.config;
        // UNet2DConditionModel.forward: center_input_sample -> 2 * sample - 1.0
        let sample = if c.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };
        let t_emb = timestep_embedding(
            timesteps,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
        );
        let emb = self.time_embedding.forward(&t_emb.to_kind(self.kind));
        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&h, Some(&emb), Some(ctx));
            h = out;
            skips.extend(states);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, Some(&emb), Some(ctx));
        }
        for block in &self.up_blocks {
            h = block.forward(&h, &mut skips, Some(&emb), Some(ctx));
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }

    /// Checks shapes before libtorch sees them, naming what is wrong.
    fn check_inputs(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ctx: &Tensor,
    ) -> Result<(i64, i64, i64, i64), ModelError> {
        let c = &self.config;
        let s = sample.size();
        let [b, ch, h, w] = s[..] else {
            return Err(ModelError::Input(format!(
                "sample must be [B, C, H, W], got shape {s:?}"
            )));
        };
        if b == 0 {
            return Err(ModelError::Input("sample batch is empty".into()));
        }
        if ch != c.in_channels as i64 {
            return Err(ModelError::Input(format!(
                "sample has {ch} channels, the U-Net expects {}",
                c.in_channels
            )));
        }
        let f = c.downsample_factor() as i64;
        if h <= 0 || w <= 0 || h % f != 0 || w % f != 0 {
            return Err(ModelError::Input(format!(
                "sample height and width ({h}x{w}) must be positive multiples of {f}"
            )));
        }
        let t = timesteps.size();
        let tn: i64 = t.iter().product();
        if t.len() > 1 || (tn != b && tn != 1) {
            return Err(ModelError::Input(format!(
                "timesteps must have shape [{b}] (one per sample), got {t:?}"
            )));
        }
        let e = ctx.size();
        let [eb, et, ed] = e[..] else {
            return Err(ModelError::Input(format!(
                "encoder_hidden_states must be [B, T, D], got shape {e:?}"
            )));
        };
        if eb != b {
            return Err(ModelError::Input(format!(
                "encoder_hidden_states batch {eb} differs from sample batch {b}"
            )));
        }
        if et == 0 {
            return Err(ModelError::Input(
                "encoder_hidden_states has no tokens".into(),
            ));
        }
        if ed != c.cross_attention_dim as i64 {
            return Err(ModelError::Input(format!(
                "encoder_hidden_states width {ed} differs from the U-Net's cross_attention_dim {}",
                c.cross_attention_dim
            )));
        }
        for (name, t) in [("sample", sample), ("encoder_hidden_states", ctx)] {
            if !t.is_floating_point() {
                return Err(ModelError::Input(format!(
                    "{name} has element type {:?}, expected a float type",
                    t.kind()
                )));
            }
        }
        Ok((b, ch, h, w))
    }
}

/// Runs model code that may still fail inside libtorch after the shape checks (device
/// out-of-memory, a CUDA error) and turns tch's panic into [`ModelError::Torch`], so a
/// serving worker reports the error instead of dying.
pub(crate) fn guarded<F: FnOnce() -> Tensor>(f: F) -> Result<Tensor, ModelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "model code panicked".into());
        ModelError::Torch(tch::TchError::Torch(message))
    })
}

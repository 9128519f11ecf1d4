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
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn, nn::Module};

mod config;
pub use config::{PerBlock, UNet2DConditionConfig};

/// The checkpoint file stem of diffusers model components.
pub const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

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

    /// A new model with trainable variables initialised as PyTorch initialises its layers
    /// (f32 on `device`): the starting point of training from scratch.
    pub fn init(config: UNet2DConditionConfig, device: Device) -> Result<Self, ModelError> {
        Self::build(
            nn::VarStore::new(device),
            config,
            Path::new("unet/config.json"),
        )
    }

    /// The variables, under their checkpoint names: what an optimiser updates and what a
    /// checkpoint saves.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
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
        for (i, &channels) in boc.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = channels;
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

    /// The noise prediction with gradients recorded, for training: `sample` `[B, C, h, w]`,
    /// `timesteps` `[B]` and `encoder_hidden_states` `[B, T, D]` already on the model's
    /// device and kind (the training loop builds them so; shapes are checked as in
    /// [`Self::forward`]).
    pub fn forward_train(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.check_inputs(sample, timesteps, encoder_hidden_states)?;
        guarded(|| {
            self.forward_checked(
                sample,
                &timesteps.to_kind(Kind::Float),
                encoder_hidden_states,
            )
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

//! The Stable Diffusion VAE: diffusers `models/autoencoders/autoencoder_kl.py`
//! (`AutoencoderKL`), configured from `vae/config.json`.
//!
//! The VAE maps images in [-1, 1] to a diagonal Gaussian over latents and latents back to
//! images. Latent scaling (`scaling_factor`, `shift_factor`) belongs to the caller, which
//! reads it from [`AutoencoderKLConfig`]: `decode` takes latents already un-scaled, as
//! diffusers' `AutoencoderKL.decode` does.

use crate::unet_2d_condition::{WEIGHTS_STEM, guarded};
use crate::vae::{CoderConfig, Decoder, Encoder};
use crate::{ModelError, weights};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn, nn::Module};

fn default_rgb() -> usize {
    3
}
fn default_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_block_out() -> Vec<usize> {
    vec![64]
}
fn default_one() -> usize {
    1
}
fn default_silu() -> String {
    "silu".into()
}
fn default_latent() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_sample_size() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// `vae/config.json`, with `AutoencoderKL.__init__`'s defaults for absent keys.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "default_rgb")]
    pub in_channels: usize,
    #[serde(default = "default_rgb")]
    pub out_channels: usize,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// Latents the U-Net sees are `(z - shift_factor) * scaling_factor` (SD 1.x: 0.18215,
    /// SD 2.x: 0.18215, SDXL: 0.13025; the default only applies to configs without the key).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Set by newer VAEs (SD3, Flux); `None` means no shift.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// Whether diffusers runs this VAE in f32 even in an f16 pipeline (the SD 1.x/2.x VAE
    /// overflows in f16); the service decides what to do with it.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl AutoencoderKLConfig {
    /// Checks that the config describes the model built here, naming the offending field.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        for (field, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(format!(
                    "`{field}` has {} entries but `block_out_channels` has {n}",
                    types.len()
                ));
            }
            if let Some(bad) = types.iter().find(|t| *t != want) {
                return Err(format!(
                    "unsupported `{field}` entry {bad:?} (supported: {want})"
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "unsupported `act_fn` {:?} (supported: silu)",
                self.act_fn
            ));
        }
        let g = self.norm_num_groups;
        if let Some((i, c)) = self
            .block_out_channels
            .iter()
            .enumerate()
            .find(|(_, c)| g == 0 || **c == 0 || **c % g != 0)
        {
            return Err(format!(
                "`block_out_channels[{i}]` = {c} is not a positive multiple of `norm_num_groups` = {g}"
            ));
        }
        if self.layers_per_block == 0
            || self.latent_channels == 0
            || self.in_channels == 0
            || self.out_channels == 0
        {
            return Err("`layers_per_block`, `latent_channels`, `in_channels` and `out_channels` must be positive".into());
        }
        Ok(())
    }

    /// `2^(len(block_out_channels) - 1)`: image pixels per latent pixel along each axis.
    pub fn downsample_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// The encoder's output: a diagonal Gaussian over latents (diffusers
/// `DiagonalGaussianDistribution`), all tensors `[B, latent_channels, h, w]`.
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20], as diffusers does, so `std` neither vanishes nor overflows.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits `[B, 2C, h, w]` moments into mean and log-variance along channels.
    fn from_moments(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1);
        let logvar = parts[1].clamp(-30.0, 20.0);
        let std = (&logvar * 0.5).exp();
        Self {
            mean: parts[0].shallow_clone(),
            logvar,
            std,
        }
    }

    /// The distribution's mode (its mean): the deterministic latent img2img pipelines use
    /// with `sample_mode="argmax"`.
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }

    /// `mean + std * noise`, with `noise` standard normal of the mean's shape, drawn by the
    /// caller so seeds stay under the orchestrator's control.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor, ModelError> {
        if noise.size() != self.mean.size() {
            return Err(ModelError::Input(format!(
                "noise has shape {:?}, the latent distribution has {:?}",
                noise.size(),
                self.mean.size()
            )));
        }
        let noise = noise
            .to_device(self.mean.device())
            .to_kind(self.mean.kind());
        Ok(&self.mean + &self.std * noise)
    }
}

/// The KL autoencoder of Stable Diffusion.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
    device: Device,
    kind: Kind,
    /// Owns the variables the modules above hold handles to.
    vs: nn::VarStore,
}

impl AutoencoderKL {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model[.fp16].safetensors` (a
    /// diffusers `vae` folder), computing in `kind` on `device`.
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
        let config: AutoencoderKLConfig = weights::read_json(&config_path)?;
        config.validate().map_err(|message| ModelError::Config {
            path: config_path.clone(),
            message,
        })?;
        let mut model = Self::build(config, nn::VarStore::new(device));
        weights::load_component(&model.vs, dir, WEIGHTS_STEM, variant, &[])?;
        model.vs.set_kind(kind);
        model.kind = kind;
        Ok(model)
    }

    /// A new model with trainable variables initialised as PyTorch initialises its layers
    /// (f32 on `device`): the starting point of training from scratch.
    pub fn init(config: AutoencoderKLConfig, device: Device) -> Result<Self, ModelError> {
        config.validate().map_err(|message| ModelError::Config {
            path: "vae/config.json".into(),
            message,
        })?;
        Ok(Self::build(config, nn::VarStore::new(device)))
    }

    /// Builds the modules (f32, default-initialised) under the checkpoint's tensor names.
    fn build(config: AutoencoderKLConfig, vs: nn::VarStore) -> Self {
        let device = vs.device();
        let root = vs.root();
        let coder = |cin: usize, cout: usize| CoderConfig {
            in_channels: cin,
            out_channels: cout,
            block_out_channels: &config.block_out_channels,
            layers_per_block: config.layers_per_block,
            groups: config.norm_num_groups,
            mid_block_add_attention: config.mid_block_add_attention,
        };
        let encoder = Encoder::new(
            &root / "encoder",
            coder(config.in_channels, config.latent_channels),
        );
        let decoder = Decoder::new(
            &root / "decoder",
            coder(config.latent_channels, config.out_channels),
        );
        let (l2, l) = (2 * config.latent_channels, config.latent_channels);
        let quant_conv = config
            .use_quant_conv
            .then(|| crate::resnet::conv2d(&root / "quant_conv", l2, l2, 1, 1, 0));
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| crate::resnet::conv2d(&root / "post_quant_conv", l, l, 1, 1, 0));
        Self {
            config,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            device,
            kind: Kind::Float,
            vs,
        }
    }

    /// The config the model was built from (scaling and shift factors included).
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// Image pixels per latent pixel along each axis (8 for SD).
    pub fn downsample_factor(&self) -> usize {
        self.config.downsample_factor()
    }

    /// The element type the model computes in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The variables, for callers that inspect or move them.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Decodes latents `[B, latent_channels, h, w]`, already un-scaled
    /// (`z = latents / scaling_factor + shift_factor`), to images `[B, out_channels, h * f,
    /// w * f]` in about [-1, 1], in the model's kind.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        tch::no_grad(|| self.decode_train(latents))
    }

    /// [`Self::decode`] with gradients recorded, for training.
    pub fn decode_train(&self, latents: &Tensor) -> Result<Tensor, ModelError> {
        check_map("latents", latents, self.config.latent_channels, 1)?;
        guarded(|| {
            let z = latents.to_device(self.device).to_kind(self.kind);
            // AutoencoderKL._decode: post_quant_conv then decoder.
            let z = match &self.post_quant_conv {
                Some(c) => c.forward(&z),
                None => z,
            };
            self.decoder.forward(&z)
        })
    }

    /// Encodes images `[B, in_channels, H, W]` in [-1, 1] (H and W multiples of the
    /// downsample factor) to the latent distribution, before scaling.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian, ModelError> {
        tch::no_grad(|| self.encode_train(images))
    }

    /// [`Self::encode`] with gradients recorded, for training.
    pub fn encode_train(&self, images: &Tensor) -> Result<DiagonalGaussian, ModelError> {
        check_map(
            "images",
            images,
            self.config.in_channels,
            self.downsample_factor(),
        )?;
        let moments = guarded(|| {
            let x = images.to_device(self.device).to_kind(self.kind);
            // AutoencoderKL._encode: encoder then quant_conv.
            let h = self.encoder.forward(&x);
            match &self.quant_conv {
                Some(c) => c.forward(&h),
                None => h,
            }
        })?;
        Ok(DiagonalGaussian::from_moments(&moments))
    }
}

/// Checks a `[B, C, H, W]` float input with `channels` channels and sides multiple of `multiple`.
fn check_map(name: &str, t: &Tensor, channels: usize, multiple: usize) -> Result<(), ModelError> {
    let s = t.size();
    let [b, c, h, w] = s[..] else {
        return Err(ModelError::Input(format!(
            "{name} must be [B, C, H, W], got shape {s:?}"
        )));
    };
    if b == 0 {
        return Err(ModelError::Input(format!("{name}: batch is empty")));
    }
    if c != channels as i64 {
        return Err(ModelError::Input(format!(
            "{name} have {c} channels, the VAE expects {channels}"
        )));
    }
    let m = multiple as i64;
    if h <= 0 || w <= 0 || h % m != 0 || w % m != 0 {
        return Err(ModelError::Input(format!(
            "{name} height and width ({h}x{w}) must be positive multiples of {m}"
        )));
    }
    if !t.is_floating_point() {
        return Err(ModelError::Input(format!(
            "{name} have element type {:?}, expected a float type",
            t.kind()
        )));
    }
    Ok(())
}

/// Converts decoded images `[B, 3, H, W]` in about [-1, 1] to 8-bit RGB `[B, H, W, 3]`
/// (uint8, on the images' device), exactly as diffusers' `VaeImageProcessor.postprocess`
/// does for PIL/NumPy output: `denormalize` (`(x * 0.5 + 0.5).clamp(0, 1)`, in the images'
/// kind), then `.float()` and `(images * 255).round()` (round half to even, as NumPy).
pub fn latents_to_rgb8(images: &Tensor) -> Tensor {
    // VaeImageProcessor.denormalize, then pt_to_numpy (.float()), then numpy_to_pil.
    let x = (images * 0.5 + 0.5).clamp(0.0, 1.0).to_kind(Kind::Float);
    (x * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
}

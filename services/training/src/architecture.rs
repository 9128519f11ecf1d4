//! The default model's architecture, written as the diffusers/transformers `config.json` files
//! the export ships. The trainer builds its modules from these same files (parsed by
//! `sd-models`), so what is trained is exactly what the services and diffusers later load.
//!
//! Sizes are chosen for the shapes dataset and a 2-core CPU: 64x64 images, a VAE with a
//! downsample factor of 4 (16x16x4 latents, enough room for a shape's outline), a two-level
//! U-Net with its transformer (self- and cross-attention) at the 8x8 level and in the mid
//! block only, and a 2-layer CLIP text transformer over the real CLIP vocabulary. Everything
//! fits the 20 MB budget in float32.
//!
//! Attention at 16x16 (256 tokens) cost 44% of a training step for almost no parameters
//! (398 against 224 ms forward + backward for a batch of 32 on the 2-core VM): dropping it
//! buys nearly twice the training steps in the same time. The layout mirrors SD's, which also
//! leaves one level without attention (its lowest-resolution one, where SD's sequence is
//! shortest; here the 8x8 level is where a shape's layout is decided).

use serde_json::{Value, json};

/// The diffusers version the configs are written for (the reference the tests run).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// The real CLIP BPE vocabulary size (SD 1.x/2.x tokenizers).
pub const CLIP_VOCAB_SIZE: i64 = 49408;
/// CLIP's `<|startoftext|>` and `<|endoftext|>` ids in that vocabulary.
pub const BOS_ID: i64 = 49406;
pub const EOS_ID: i64 = 49407;

/// The knobs of the default architecture that the command line may change.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    /// Image side in pixels (square images).
    pub resolution: u32,
    /// Width of the text transformer, which is also the U-Net's cross-attention width.
    pub text_width: i64,
    /// U-Net channels per level.
    pub unet_channels: Vec<usize>,
    /// Per U-Net level (same length as `unet_channels`): whether its blocks carry a
    /// transformer (`CrossAttnDownBlock2D`/`CrossAttnUpBlock2D`) or are plain ResNet blocks.
    pub unet_attention: Vec<bool>,
    /// VAE channels per level; `len - 1` halvings give the downsample factor.
    pub vae_channels: Vec<usize>,
}

impl Default for Architecture {
    fn default() -> Self {
        Self {
            resolution: 64,
            text_width: 32,
            unet_channels: vec![32, 64],
            unet_attention: vec![false, true],
            vae_channels: vec![16, 32, 64],
        }
    }
}

impl Architecture {
    /// Image pixels per latent pixel.
    pub fn downsample_factor(&self) -> u32 {
        1 << (self.vae_channels.len() - 1)
    }

    /// The latent side the U-Net works on.
    pub fn latent_size(&self) -> u32 {
        self.resolution / self.downsample_factor()
    }

    /// `vae/config.json`; `scaling_factor` is measured after the VAE is trained.
    pub fn vae_config(&self, scaling_factor: f64) -> Value {
        let n = self.vae_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": DIFFUSERS_VERSION,
            "act_fn": "silu",
            "block_out_channels": self.vae_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "sample_size": self.resolution,
            "scaling_factor": scaling_factor,
            "force_upcast": true,
            "use_quant_conv": true,
            "use_post_quant_conv": true,
            "mid_block_add_attention": true,
        })
    }

    /// `unet/config.json`: SD's `UNet2DConditionModel` layout, scaled down. Heads are
    /// `attention_head_dim` in diffusers' (historically misnamed) SD convention, one head per
    /// 16 channels.
    pub fn unet_config(&self) -> Value {
        let n = self.unet_channels.len();
        let heads: Vec<usize> = self.unet_channels.iter().map(|c| (c / 16).max(1)).collect();
        let down: Vec<&str> = (0..n)
            .map(|i| match self.unet_attention.get(i) {
                Some(false) => "DownBlock2D",
                _ => "CrossAttnDownBlock2D",
            })
            .collect();
        let up: Vec<&str> = (0..n)
            .rev()
            .map(|i| match self.unet_attention.get(i) {
                Some(false) => "UpBlock2D",
                _ => "CrossAttnUpBlock2D",
            })
            .collect();
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "act_fn": "silu",
            "attention_head_dim": heads,
            "block_out_channels": self.unet_channels,
            "center_input_sample": false,
            "cross_attention_dim": self.text_width,
            "down_block_types": down,
            "up_block_types": up,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-5,
            "norm_num_groups": 8,
            "sample_size": self.latent_size(),
            "use_linear_projection": false,
            "upcast_attention": false,
        })
    }

    /// `text_encoder/config.json`: transformers' `CLIPTextConfig`, SD 1.x flavour
    /// (quick_gelu), over the full CLIP vocabulary and 77 positions.
    pub fn text_encoder_config(&self) -> Value {
        json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "attention_dropout": 0.0,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,
            "hidden_act": "quick_gelu",
            "hidden_size": self.text_width,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": self.text_width * 4,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": 77,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "projection_dim": self.text_width,
            "torch_dtype": "float32",
            "vocab_size": CLIP_VOCAB_SIZE,
        })
    }
}

/// `scheduler/scheduler_config.json`: SD's training noise schedule (scaled-linear betas
/// 0.00085 to 0.012 over 1000 steps, epsilon prediction), sampled with DDIM on trailing
/// timesteps so the first step starts from the pure noise the model was trained on.
pub fn scheduler_config() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
        "trained_betas": null,
        "rescale_betas_zero_snr": false,
        "thresholding": false,
    })
}

/// `model_index.json` of a `StableDiffusionPipeline` without safety checker.
pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// `tokenizer/tokenizer_config.json`: SD 1.x's CLIP tokenizer settings (77 positions,
/// padded with `<|endoftext|>`).
pub fn tokenizer_config() -> Value {
    json!({
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 77,
        "do_lower_case": true,
        "errors": "replace",
        "add_prefix_space": false,
    })
}

/// `tokenizer/special_tokens_map.json`, consistent with [`tokenizer_config`].
pub fn special_tokens_map() -> Value {
    json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_blocks_carry_attention_only_where_asked() {
        let config = Architecture::default().unet_config();
        assert_eq!(
            config["down_block_types"],
            json!(["DownBlock2D", "CrossAttnDownBlock2D"])
        );
        // The up path mirrors the down path: its first block is the lowest resolution.
        assert_eq!(
            config["up_block_types"],
            json!(["CrossAttnUpBlock2D", "UpBlock2D"])
        );
        assert_eq!(config["mid_block_type"], json!("UNetMidBlock2DCrossAttn"));
        let everywhere = Architecture {
            unet_attention: vec![true, true],
            ..Architecture::default()
        };
        assert_eq!(
            everywhere.unet_config()["up_block_types"],
            json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
        );
    }
}

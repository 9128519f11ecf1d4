//! Training the project's own default model: a small text-to-image latent diffusion model
//! (AutoencoderKL, UNet2DConditionModel, CLIP text transformer) trained from scratch on the
//! synthetic shapes dataset of `sd-shapes`, exactly as Stable Diffusion is trained, and
//! written as a diffusers folder that this project's services and Python diffusers both load.
//!
//! - [`architecture`]: the configs of the three components (what is trained is what ships);
//! - [`train`]: the VAE stage, then the diffusion stage (U-Net and text encoder jointly,
//!   epsilon loss under the model's noise schedule, caption dropout for guidance);
//! - [`schedule`]: forward diffusion; [`ema`]: the averaged weights that are exported;
//! - [`export`]: the diffusers folder; [`plot`]: the loss curve.

pub mod architecture;
pub mod ema;
pub mod export;
pub mod plot;
pub mod schedule;
pub mod train;

pub use train::{RunOptions, RunPaths, TrainConfig, TrainReport, train};

/// The model this repository ships, trained by `make default-model` (see its MODEL_CARD.md):
/// what `make demo` and `sd generate --local` use when no model is named.
pub const DEFAULT_MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/default-model");

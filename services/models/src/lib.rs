//! Stable Diffusion model code on libtorch (tch), loading diffusers-format folders.
//!
//! Module names mirror the diffusers/transformers reference files so the two can be read side
//! by side, and every module's variable paths equal the checkpoint's tensor names, so loading
//! is a plain name lookup ([`weights`]).

pub mod attention;
pub mod autoencoder_kl;
pub mod clip;
pub mod device;
pub mod embeddings;
pub mod error;
pub mod prompt_weighting;
pub mod resnet;
pub mod tokenizer;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;
pub mod weights;

pub use error::ModelError;

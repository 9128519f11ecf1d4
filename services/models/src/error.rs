//! Errors raised while reading a model folder or running a model.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Each variant names the file or
/// the input that was wrong, so a start-up failure tells the operator what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: missing (expected in a diffusers-format model folder)")]
    Missing { path: PathBuf },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "{path}: pickle checkpoints (.bin, .ckpt, .pt) are refused because loading them runs \
         code; convert to safetensors first, e.g. `python -c \"import torch, safetensors.torch as s; \
         s.save_file(torch.load('{file}', weights_only=True), '{stem}.safetensors')\"`, or \
         `pipe.save_pretrained(dir, safe_serialization=True)` with diffusers"
    )]
    Pickle {
        path: PathBuf,
        file: String,
        stem: String,
    },
    #[error("{path}: weights do not match the model built from its config:\n{report}")]
    WeightMismatch { path: PathBuf, report: String },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

//! Writes a trained model as a complete diffusers folder: `model_index.json`, each
//! component's config and `.safetensors` weights under the names diffusers and transformers
//! load, the scheduler config and the real CLIP tokenizer files.

use crate::architecture::{self, Architecture};
use anyhow::Context;
use serde_json::Value;
use std::path::Path;
use tch::nn::VarStore;

/// The trained parts of a model, as var stores under checkpoint names.
#[derive(Debug)]
pub struct Components<'a> {
    pub vae: &'a VarStore,
    pub unet: &'a VarStore,
    pub text_encoder: &'a VarStore,
    /// `1 / std` of the VAE's latents over the training images (SD's `scaling_factor`).
    pub scaling_factor: f64,
}

/// Writes `out/` (created if needed; files of a previous export are replaced). `tokenizer`
/// is a folder with the CLIP `vocab.json` and `merges.txt`.
pub fn write_model(
    out: &Path,
    arch: &Architecture,
    parts: &Components<'_>,
    tokenizer: &Path,
) -> anyhow::Result<()> {
    write_json(&out.join("model_index.json"), &architecture::model_index())?;
    write_json(
        &out.join("scheduler/scheduler_config.json"),
        &architecture::scheduler_config(),
    )?;
    write_json(
        &out.join("vae/config.json"),
        &arch.vae_config(parts.scaling_factor),
    )?;
    save(
        parts.vae,
        &out.join("vae/diffusion_pytorch_model.safetensors"),
    )?;
    write_json(&out.join("unet/config.json"), &arch.unet_config())?;
    save(
        parts.unet,
        &out.join("unet/diffusion_pytorch_model.safetensors"),
    )?;
    write_json(
        &out.join("text_encoder/config.json"),
        &arch.text_encoder_config(),
    )?;
    save(
        parts.text_encoder,
        &out.join("text_encoder/model.safetensors"),
    )?;
    write_tokenizer(&out.join("tokenizer"), tokenizer)
}

/// Copies the vocabulary and writes SD 1.x's tokenizer settings beside it.
pub fn write_tokenizer(dir: &Path, source: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in ["vocab.json", "merges.txt"] {
        let from = source.join(file);
        std::fs::copy(&from, dir.join(file)).with_context(|| {
            format!(
                "copying {} (the tokenizer folder needs CLIP's vocab.json and merges.txt)",
                from.display()
            )
        })?;
    }
    write_json(
        &dir.join("tokenizer_config.json"),
        &architecture::tokenizer_config(),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &architecture::special_tokens_map(),
    )
}

/// Pretty JSON with a trailing newline, creating the parent folder.
pub fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Saves a var store's tensors (contiguous, on the CPU) as safetensors.
fn save(vs: &VarStore, path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut named: Vec<(String, tch::Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    tch::Tensor::write_safetensors(&named, path)
        .with_context(|| format!("writing {}", path.display()))
}

//! The libtorch side shared by the three model stages.
//!
//! - [`batcher`]: the model lives on its own OS thread (tch tensors are `Send` but not
//!   `Sync`), fed by a bounded queue that gathers concurrent calls into one forward.
//! - [`wire`]: conversion between wire tensors (`sd.stage.v1.Tensor`) and `tch::Tensor`.
//! - [`StageArgs`]: the `--model`, `--device`, `--dtype` flags every stage takes.

pub mod batcher;
pub mod stage;
pub mod status;
pub mod wire;

use sd_models::device::{DTypeSpec, DeviceSpec};
use sd_proto::stage::{DataType, ModelInfo};
use std::path::{Path, PathBuf};

/// Flags shared by the model stages.
#[derive(Debug, Clone, clap::Args)]
pub struct StageArgs {
    /// Model folder in diffusers layout (model_index.json, tokenizer/, text_encoder/, unet/,
    /// vae/, scheduler/), weights as .safetensors.
    #[arg(long, env = "SD_MODEL")]
    pub model: PathBuf,
    /// Name reported to the orchestrator; defaults to the model folder's name.
    #[arg(long, env = "SD_MODEL_ID")]
    pub model_id: Option<String>,
    /// Device to compute on: cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Element type to compute in: f32, f16 or bf16 (half precision needs CUDA).
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    pub dtype: DTypeSpec,
    /// Requests waiting for the model beyond this are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
}

/// Dynamic batching flags of a model stage ([`batcher`]).
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Most rows per forward (prompts for the text encoder, latents for the VAE); 1 disables
    /// batching.
    #[arg(long, env = "SD_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// Milliseconds the first call of a batch waits for concurrent calls to join it.
    #[arg(long, env = "SD_BATCH_WAIT_MS", default_value_t = 5)]
    pub batch_wait_ms: u64,
}

impl Default for BatchArgs {
    fn default() -> Self {
        Self {
            max_batch: 8,
            batch_wait_ms: 5,
        }
    }
}

impl BatchArgs {
    /// The batcher limits, with `max_pending` queued calls admitted.
    pub fn config(&self, max_pending: usize) -> batcher::BatchConfig {
        batcher::BatchConfig {
            max_rows: self.max_batch.max(1),
            max_wait: std::time::Duration::from_millis(self.batch_wait_ms),
            max_pending: max_pending.max(1),
        }
    }
}

impl StageArgs {
    /// Checks the device and dtype choice before any loading starts.
    pub fn validate(&self) -> Result<(), String> {
        self.device.check_available()?;
        self.dtype.check_device(self.device)
    }

    /// The model id to report: `--model-id`, or the folder's name.
    pub fn model_id(&self) -> String {
        self.model_id.clone().unwrap_or_else(|| {
            let dir = self
                .model
                .canonicalize()
                .unwrap_or_else(|_| self.model.clone());
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
    }

    /// The `ModelInfo` a stage reports, with `revision` fingerprinting `component`.
    pub fn model_info(&self, component: &str) -> ModelInfo {
        ModelInfo {
            model_id: self.model_id(),
            revision: revision(&self.model.join(component)),
            dtype: wire::data_type(self.dtype.0).unwrap_or(DataType::Unspecified) as i32,
            device: self.device.to_string(),
        }
    }
}

/// Fingerprint of a component folder: FNV-1a over its `config.json` and the headers of its
/// safetensors files (names, dtypes, shapes and offsets of every tensor). Replicas of the same
/// model agree without hashing gigabytes of weights; a different config or checkpoint layout
/// changes it.
pub fn revision(component_dir: &Path) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    if let Ok(config) = std::fs::read(component_dir.join("config.json")) {
        feed(&config);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(component_dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
    files.sort();
    for file in files {
        feed(
            file.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        if let Some(header) = safetensors_header(&file) {
            feed(&header);
        }
    }
    format!("{hash:016x}")
}

fn safetensors_header(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len).min(100 << 20);
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    Some(header)
}

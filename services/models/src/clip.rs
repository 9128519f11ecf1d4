//! CLIP text encoder, as transformers' `CLIPTextModel` computes it (`models/clip/modeling_clip.py`).
//!
//! Token + position embeddings, `num_hidden_layers` pre-LayerNorm transformer layers with a
//! causal mask, then a final LayerNorm. Stable Diffusion conditions the U-Net on the whole
//! `last_hidden_state` (`[B, 77, hidden]`), not on the pooled output, so the pooler and the
//! projection are not built.
//!
//! Variables are created under the checkpoint's tensor names (`text_model.encoder.layers.0.
//! self_attn.q_proj.weight`, ...) so [`crate::weights::load_into`] loads strictly by name.
//! Every libtorch call uses the fallible `f_` variant: a CUDA out-of-memory error becomes a
//! [`ModelError::Torch`] the service can map to RESOURCE_EXHAUSTED instead of a panic.

use crate::{
    ModelError,
    weights::{find_weights, load_into, read_json, read_tensors},
};
use serde::Deserialize;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

/// Prefix of every tensor name in released checkpoints (transformers 4's `CLIPTextModel.text_model`).
const PREFIX: &str = "text_model.";

/// Tensors that older exports saved but the model recomputes: transformers registers
/// `position_ids` as a non-persistent buffer since v4.31, earlier checkpoints (SD 1.x's
/// `text_encoder/model.safetensors` among them) still carry it.
const IGNORED_TENSORS: &[&str] = &["text_model.embeddings.position_ids"];

/// The activation of the MLP inside each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI's CLIP ViT-L/14, used by SD 1.x.
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP ViT-H/14, used by SD 2.x.
    Gelu,
}

/// The fields of `text_encoder/config.json` the model uses (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    /// `quick_gelu` or `gelu`; see [`ClipTextConfig::activation`].
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<i64>,
}

// transformers' CLIPTextConfig defaults, for configs that omit the fields.
fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// Reads and checks `config.json` of a `text_encoder` folder.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let config: Self = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// The MLP activation named by `hidden_act`.
    pub fn activation(&self) -> Option<Activation> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }

    /// Rejects configs the model cannot be built from, naming the file and field, so a wrong
    /// folder fails at start-up rather than with a shape error on the first request.
    pub fn validate(&self, path: &Path) -> Result<(), ModelError> {
        let bad = |message: String| {
            Err(ModelError::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.activation().is_none() {
            return bad(format!(
                "hidden_act {:?} is not supported (expected \"quick_gelu\" or \"gelu\")",
                self.hidden_act
            ));
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value <= 0 {
                return bad(format!("{field} must be positive, got {value}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return bad(format!(
                "layer_norm_eps must be positive, got {}",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}

/// How the variables are created: placeholders that loading overwrites, or trainable
/// variables initialised for training from scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Params {
    /// Zeros, not trainable: the checkpoint's tensors are copied in.
    Loaded,
    /// Trainable: weights normal with standard deviation [`INIT_STD`] (transformers'
    /// `initializer_range`), biases zero, LayerNorm scales one.
    Fresh,
}

/// transformers' `CLIPTextConfig.initializer_range`.
const INIT_STD: f64 = 0.02;

impl Params {
    /// A variable of `dims`: zeros for loading; for training normal(0, `std`), or zeros when
    /// `std` is 0 (biases).
    fn var(self, p: &nn::Path, name: &str, dims: &[i64], std: f64) -> Result<Tensor, ModelError> {
        Ok(match self {
            Params::Loaded => p.f_zeros_no_train(name, dims)?,
            Params::Fresh if std == 0.0 => p.f_var(name, dims, nn::Init::Const(0.0))?,
            Params::Fresh => p.f_var(
                name,
                dims,
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
        })
    }
}

/// `nn.Linear` as plain tensors, applied with `f_linear` so failures are errors.
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn new(p: nn::Path, input: i64, output: i64, params: Params) -> Result<Self, ModelError> {
        Ok(Self {
            weight: params.var(&p, "weight", &[output, input], INIT_STD)?,
            bias: params.var(&p, "bias", &[output], 0.0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(x.f_linear(&self.weight, Some(&self.bias))?)
    }
}

/// `nn.LayerNorm` over the last dimension.
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(p: nn::Path, dim: i64, eps: f64, params: Params) -> Result<Self, ModelError> {
        let weight = match params {
            Params::Loaded => p.f_zeros_no_train("weight", &[dim])?,
            Params::Fresh => p.f_var("weight", &[dim], nn::Init::Const(1.0))?,
        };
        Ok(Self {
            weight,
            bias: params.var(&p, "bias", &[dim], 0.0)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let dim = self.weight.size();
        Ok(x.f_layer_norm(
            dim.as_slice(),
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )?)
    }
}

/// `CLIPAttention`: multi-head self-attention, causal in the text model.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl Attention {
    fn new(p: nn::Path, c: &ClipTextConfig, params: Params) -> Result<Self, ModelError> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: Linear::new(&p / "q_proj", h, h, params)?,
            k_proj: Linear::new(&p / "k_proj", h, h, params)?,
            v_proj: Linear::new(&p / "v_proj", h, h, params)?,
            out_proj: Linear::new(&p / "out_proj", h, h, params)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t, c) = x.size3()?;
        let head_dim = c / self.heads;
        // [B, T, C] -> [B, heads, T, head_dim], the layout scaled_dot_product_attention expects.
        let split = |y: Tensor| -> Result<Tensor, ModelError> {
            Ok(y.f_view([b, t, self.heads, head_dim])?.f_transpose(1, 2)?)
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        // Default scale 1/sqrt(head_dim), as CLIPAttention's `self.scale`; is_causal builds the
        // same mask as transformers' causal mask (each token sees itself and earlier tokens).
        let y = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            true,
            None::<f64>,
            false,
        )?;
        let y = y.f_transpose(1, 2)?.f_contiguous()?.f_view([b, t, c])?;
        self.out_proj.forward(&y)
    }
}

/// `CLIPMLP`: fc1, activation, fc2.
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let y = self.fc1.forward(x)?;
        let y = match self.activation {
            // transformers' QuickGELUActivation.
            Activation::QuickGelu => y.f_mul(&y.f_mul_scalar(1.702)?.f_sigmoid()?)?,
            // transformers' GELUActivation: torch's exact gelu.
            Activation::Gelu => y.f_gelu("none")?,
        };
        self.fc2.forward(&y)
    }
}

/// `CLIPEncoderLayer`: pre-LN attention and MLP blocks, each with a residual connection.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn new(
        p: nn::Path,
        c: &ClipTextConfig,
        activation: Activation,
        params: Params,
    ) -> Result<Self, ModelError> {
        let mlp = &p / "mlp";
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(&p / "layer_norm1", h, eps, params)?,
            self_attn: Attention::new(&p / "self_attn", c, params)?,
            layer_norm2: LayerNorm::new(&p / "layer_norm2", h, eps, params)?,
            mlp: Mlp {
                fc1: Linear::new(&mlp / "fc1", h, c.intermediate_size, params)?,
                fc2: Linear::new(&mlp / "fc2", c.intermediate_size, h, params)?,
                activation,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let x = x.f_add(&self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        Ok(x.f_add(&self.mlp.forward(&self.layer_norm2.forward(&x)?)?)?)
    }
}

/// The CLIP text transformer with loaded weights. Immutable after loading; not `Sync`
/// (tch tensors are not), so it lives on the worker thread that owns it.
pub struct ClipTextModel {
    config: ClipTextConfig,
    /// Owns the variables; the layers hold shallow handles to the same storage, so moving or
    /// casting the store (`set_device`, `half`) updates them in place.
    vs: nn::VarStore,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    device: Device,
}

impl std::fmt::Debug for ClipTextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTextModel")
            .field("config", &self.config)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl ClipTextModel {
    /// Loads a diffusers `text_encoder` folder (`config.json` + `model.safetensors`) onto
    /// `device` in `kind` (a floating-point kind). Weights are read on the CPU, checked strictly
    /// against the config, then moved and cast, so a mismatch is reported before any device
    /// memory is used.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, ModelError> {
        if !matches!(
            kind,
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            return Err(ModelError::Input(format!(
                "CLIP text model dtype must be floating point, got {kind:?}"
            )));
        }
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let mut model = Self::build(
            nn::VarStore::new(Device::Cpu),
            config,
            device,
            Params::Loaded,
        )?;
        let files = find_weights(dir, "model", None)?;
        let mut tensors = read_tensors(&files)?;
        // transformers 5 flattened CLIPTextModel and saves `embeddings.*`, `encoder.*`,
        // `final_layer_norm.*`; released SD folders (and transformers 4) nest them under
        // `text_model.`. Both load, under the released names.
        if !tensors.keys().any(|k| k.starts_with(PREFIX)) {
            tensors = tensors
                .into_iter()
                .map(|(k, v)| (format!("{PREFIX}{k}"), v))
                .collect();
        }
        load_into(&model.vs, tensors, IGNORED_TENSORS, &files[0])?;
        if device != Device::Cpu {
            model.vs.set_device(device);
        }
        match kind {
            Kind::Half => model.vs.half(),
            Kind::BFloat16 => model.vs.bfloat16(),
            Kind::Double => model.vs.double(),
            _ => {}
        }
        Ok(model)
    }

    /// A new model with trainable, freshly initialised variables (as transformers initialises
    /// `CLIPTextModel`), on `device` in f32: the starting point of training from scratch.
    pub fn init(config: ClipTextConfig, device: Device) -> Result<Self, ModelError> {
        config.validate(Path::new("text_encoder/config.json"))?;
        Self::build(nn::VarStore::new(device), config, device, Params::Fresh)
    }

    /// The variables, under their checkpoint names (`text_model.…`): what an optimiser
    /// updates and what a checkpoint saves.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Creates the variables under their checkpoint names, as `params` says.
    fn build(
        vs: nn::VarStore,
        config: ClipTextConfig,
        device: Device,
        params: Params,
    ) -> Result<Self, ModelError> {
        let Some(activation) = config.activation() else {
            return Err(ModelError::Input(format!(
                "hidden_act {:?} is not supported",
                config.hidden_act
            )));
        };
        let text = vs.root() / "text_model";
        let emb = &text / "embeddings";
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let token_embedding = params.var(
            &(&emb / "token_embedding"),
            "weight",
            &[config.vocab_size, h],
            INIT_STD,
        )?;
        let position_embedding = params.var(
            &(&emb / "position_embedding"),
            "weight",
            &[config.max_position_embeddings, h],
            INIT_STD,
        )?;
        let layers_path = &text / "encoder" / "layers";
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(&layers_path / i, &config, activation, params))
            .collect::<Result<Vec<_>, _>>()?;
        let final_layer_norm = LayerNorm::new(&text / "final_layer_norm", h, eps, params)?;
        Ok(Self {
            config,
            vs,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            device,
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The device the weights live on; inputs are moved there.
    pub fn device(&self) -> Device {
        self.device
    }

    /// `last_hidden_state` (`[B, T, hidden]`, final LayerNorm applied) for token ids `[B, T]`
    /// (int64, on any device). Equal to `forward_hidden(input_ids, 0)`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor, ModelError> {
        self.forward_hidden(input_ids, 0)
    }

    /// The hidden state Stable Diffusion pipelines use with `clip_skip` (diffusers'
    /// `encode_prompt`): `hidden_states[-(clip_skip + 1)]` of transformers' output, then the final
    /// LayerNorm. `hidden_states[0]` is the embeddings and `hidden_states[i]` the output of layer
    /// `i`, so this runs the first `num_hidden_layers - clip_skip` layers and skips the rest.
    /// `clip_skip = 0` is `last_hidden_state`; `clip_skip` above `num_hidden_layers` is an error
    /// (Python would raise IndexError).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        clip_skip: usize,
    ) -> Result<Tensor, ModelError> {
        let layers = self.config.num_hidden_layers;
        if clip_skip > layers {
            return Err(ModelError::Input(format!(
                "clip_skip {clip_skip} exceeds the text encoder's {layers} layers"
            )));
        }
        tch::no_grad(|| self.forward_layers(input_ids, layers - clip_skip))
    }

    /// `last_hidden_state` with gradients recorded, for training: the same computation as
    /// [`Self::forward`], whose result stays attached to the autograd graph.
    pub fn forward_train(&self, input_ids: &Tensor) -> Result<Tensor, ModelError> {
        self.forward_layers(input_ids, self.config.num_hidden_layers)
    }

    /// Embeddings, the first `layers` encoder layers, then the final LayerNorm.
    fn forward_layers(&self, input_ids: &Tensor, layers: usize) -> Result<Tensor, ModelError> {
        let (_, t) = self.check_ids(input_ids)?;
        let ids = input_ids.f_to_device(self.device)?;
        let positions = Tensor::f_arange(t, (Kind::Int64, self.device))?;
        // CLIPTextEmbeddings: token embedding + absolute position embedding.
        let tokens = Tensor::f_embedding(&self.token_embedding, &ids, -1, false, false)?;
        let pos = Tensor::f_embedding(&self.position_embedding, &positions, -1, false, false)?;
        let mut x = tokens.f_add(&pos)?;
        for layer in &self.layers[..layers] {
            x = layer.forward(&x)?;
        }
        self.final_layer_norm.forward(&x)
    }

    /// Checks shape, dtype and id range before indexing, so user input can never reach an
    /// out-of-range embedding lookup (which libtorch reports as an assertion on CUDA).
    fn check_ids(&self, ids: &Tensor) -> Result<(i64, i64), ModelError> {
        if ids.kind() != Kind::Int64 {
            return Err(ModelError::Input(format!(
                "input_ids must be int64, got {:?}",
                ids.kind()
            )));
        }
        let size = ids.size();
        let &[b, t] = size.as_slice() else {
            return Err(ModelError::Input(format!(
                "input_ids must have shape [B, T], got {size:?}"
            )));
        };
        if b == 0 || t == 0 {
            return Err(ModelError::Input(format!(
                "input_ids is empty (shape {size:?})"
            )));
        }
        let max_t = self.config.max_position_embeddings;
        if t > max_t {
            return Err(ModelError::Input(format!(
                "input_ids has {t} tokens per prompt, more than max_position_embeddings {max_t}"
            )));
        }
        let (lo, hi) = (
            ids.f_min()?.f_int64_value(&[])?,
            ids.f_max()?.f_int64_value(&[])?,
        );
        if lo < 0 || hi >= self.config.vocab_size {
            return Err(ModelError::Input(format!(
                "input_ids must lie in [0, {}), got values in [{lo}, {hi}]",
                self.config.vocab_size
            )));
        }
        Ok((b, t))
    }
}

// Tests unwrap: a failure should stop the test where it happens, with its message.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config(act: &str) -> ClipTextConfig {
        ClipTextConfig {
            vocab_size: 50,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            max_position_embeddings: 6,
            hidden_act: act.to_string(),
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(48),
            eos_token_id: Some(49),
        }
    }

    /// Writes a random-weight checkpoint for `config` into `dir` and returns the loaded model.
    fn random_model(
        dir: &Path,
        config: &ClipTextConfig,
        extra: &[(&str, Tensor)],
    ) -> ClipTextModel {
        tch::manual_seed(7);
        let json = serde_json::json!({
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "max_position_embeddings": config.max_position_embeddings,
            "hidden_act": config.hidden_act, "layer_norm_eps": config.layer_norm_eps,
        });
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        let model = ClipTextModel::build(
            nn::VarStore::new(Device::Cpu),
            config.clone(),
            Device::Cpu,
            Params::Loaded,
        )
        .unwrap();
        let mut tensors: Vec<(String, Tensor)> = model
            .vs
            .variables()
            .into_iter()
            .map(|(name, v)| {
                (
                    name,
                    Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.5,
                )
            })
            .collect();
        tensors.extend(
            extra
                .iter()
                .map(|(n, t)| (n.to_string(), t.shallow_clone())),
        );
        Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
        ClipTextModel::load(dir, Device::Cpu, Kind::Float).unwrap()
    }

    #[test]
    fn unknown_activation_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut json = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 4, "hidden_act": "relu",
        });
        std::fs::write(&path, json.to_string()).unwrap();
        let err = ClipTextConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("\"relu\""),
            "{err}"
        );
        json["hidden_act"] = "gelu".into();
        json["num_attention_heads"] = 3.into();
        std::fs::write(&path, json.to_string()).unwrap();
        let err = ClipTextConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("num_attention_heads 3"), "{err}");
    }

    #[test]
    fn rejects_bad_ids_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let model = random_model(dir.path(), &config("gelu"), &[]);
        let ids = |v: &[i64], shape: &[i64]| Tensor::from_slice(v).reshape(shape);
        for (input, needle) in [
            (ids(&[0, 50], &[1, 2]), "[0, 50)"),
            (ids(&[-1, 3], &[1, 2]), "[-1, 3]"),
            (ids(&[1; 7], &[1, 7]), "max_position_embeddings 6"),
            (ids(&[1, 2], &[2]), "shape [B, T]"),
            (Tensor::zeros([1, 0], (Kind::Int64, Device::Cpu)), "empty"),
            (Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)), "int64"),
        ] {
            let err = model.forward(&input).unwrap_err();
            assert!(matches!(err, ModelError::Input(_)), "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle}");
        }
        let err = model.forward_hidden(&ids(&[1, 2], &[1, 2]), 3).unwrap_err();
        assert!(err.to_string().contains("clip_skip 3"), "{err}");
    }

    #[test]
    fn causal_batched_and_clip_skip_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let position_ids = Tensor::arange(6, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let model = random_model(
            dir.path(),
            &config("quick_gelu"),
            &[("text_model.embeddings.position_ids", position_ids)],
        );
        let a = Tensor::from_slice(&[48i64, 5, 9, 49, 1, 1]).reshape([1, 6]);
        let b = Tensor::from_slice(&[48i64, 5, 9, 30, 2, 7]).reshape([1, 6]);
        let both = Tensor::cat(&[&a, &b], 0);
        let out = model.forward(&both).unwrap();
        assert_eq!(out.size(), [2, 6, 8]);
        // Causal: the first three tokens are shared, so their states must be too.
        let diff = (out.get(0).narrow(0, 0, 3) - out.get(1).narrow(0, 0, 3))
            .abs()
            .max();
        assert!(
            diff.double_value(&[]) < 1e-6,
            "prefix states differ: {diff}"
        );
        // ... and a later token does change.
        let diff = (out.get(0).get(3) - out.get(1).get(3)).abs().max();
        assert!(diff.double_value(&[]) > 1e-3);
        // Batching is row-independent.
        let single = model.forward(&b).unwrap();
        let diff = (single.get(0) - out.get(1)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "batched row differs by {diff}");
        // clip_skip = 0 is forward; clip_skip = layers is final LN over the embeddings alone.
        let skip0 = model.forward_hidden(&a, 0).unwrap();
        assert_eq!(
            (skip0 - model.forward(&a).unwrap())
                .abs()
                .max()
                .double_value(&[]),
            0.0
        );
        let skip2 = model.forward_hidden(&a, 2).unwrap();
        let emb = model.token_embedding.index_select(0, &a.get(0))
            + model.position_embedding.narrow(0, 0, 6);
        let expected = model.final_layer_norm.forward(&emb.unsqueeze(0)).unwrap();
        assert!((skip2 - expected).abs().max().double_value(&[]) < 1e-6);
        let skip1 = model.forward_hidden(&a, 1).unwrap();
        assert!(
            (skip1 - model.forward(&a).unwrap())
                .abs()
                .max()
                .double_value(&[])
                > 1e-3
        );
    }

    #[test]
    fn reduced_precision_load_casts_every_layer() {
        // The layers hold shallow handles to the store's variables; casting the store after
        // loading must reach them, or the first forward fails with a dtype mismatch (the f16
        // CUDA path). bf16 is the reduced precision the CPU supports for every op used here.
        let dir = tempfile::tempdir().unwrap();
        let full = random_model(dir.path(), &config("quick_gelu"), &[]);
        let half = ClipTextModel::load(dir.path(), Device::Cpu, Kind::BFloat16).unwrap();
        let ids = Tensor::from_slice(&[48i64, 5, 9, 49, 1, 1]).reshape([1, 6]);
        let reduced = half.forward(&ids).unwrap();
        assert_eq!(reduced.kind(), Kind::BFloat16);
        // bf16 keeps ~3 significant digits; layer-normed values are O(1).
        let diff = (reduced.to_kind(Kind::Float) - full.forward(&ids).unwrap())
            .abs()
            .max();
        assert!(
            diff.double_value(&[]) < 0.15,
            "bf16 output differs by {diff}"
        );
        let err = ClipTextModel::load(dir.path(), Device::Cpu, Kind::Int64).unwrap_err();
        assert!(err.to_string().contains("floating point"), "{err}");
    }

    #[test]
    fn strict_loading_reports_wrong_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        random_model(dir.path(), &config("gelu"), &[]);
        // Same folder, config claiming a third layer: the checkpoint lacks its tensors.
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        json["num_hidden_layers"] = 3.into();
        std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
        let err = ClipTextModel::load(dir.path(), Device::Cpu, Kind::Float)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("text_model.encoder.layers.2.self_attn.q_proj.weight"),
            "{err}"
        );
    }
}

//! `unet/config.json`: diffusers `UNet2DConditionModel.__init__`'s arguments, with its
//! defaults, and the check that a config describes a model [`super::UNet2DConditionModel`]
//! builds exactly.

use serde::Deserialize;

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
pub(super) struct Plan {
    pub(super) cross_attn_down: Vec<bool>,
    pub(super) cross_attn_up: Vec<bool>,
    pub(super) mid: bool,
    pub(super) layers: Vec<usize>,
    pub(super) heads: Vec<usize>,
    pub(super) transformer_layers: Vec<usize>,
    pub(super) groups: usize,
}

impl UNet2DConditionConfig {
    /// Number of attention heads per down block. diffusers' quirk, kept for compatibility:
    /// `num_attention_heads = num_attention_heads or attention_head_dim`, so SD configs'
    /// `attention_head_dim` (8, or [5, 10, 20, 20]) is in fact the head count. diffusers 0.42
    /// refuses a non-null `num_attention_heads` in this model's constructor; here it is taken
    /// as the head count it names, which is what that field is meant to become.
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

    pub(super) fn plan(&self) -> Result<Plan, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> UNet2DConditionConfig {
        serde_json::from_str(json).expect("config parses")
    }

    #[test]
    fn empty_config_is_diffusers_default_sd15_unet() {
        let c = parse("{}");
        c.validate().expect("defaults are valid");
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.heads().expect("heads"), vec![8; 4]);
        assert_eq!(c.downsample_factor(), 8);
        assert_eq!(c.cross_attention_dim, 1280);
    }

    #[test]
    fn head_count_quirk_and_explicit_heads() {
        let c = parse(r#"{"attention_head_dim": [5, 10, 20, 20], "num_attention_heads": null}"#);
        assert_eq!(c.heads().expect("heads"), vec![5, 10, 20, 20]);
        let c = parse(r#"{"attention_head_dim": 64, "num_attention_heads": [5, 10, 20, 20]}"#);
        assert_eq!(c.heads().expect("heads"), vec![5, 10, 20, 20]);
        let c = parse(r#"{"attention_head_dim": [5, 10]}"#);
        assert!(
            c.validate()
                .expect_err("wrong length")
                .contains("attention_head_dim")
        );
    }

    #[test]
    fn unsupported_switches_are_named() {
        for (json, field) in [
            (r#"{"class_embed_type": "timestep"}"#, "class_embed_type"),
            (
                r#"{"only_cross_attention": [false, true, false, false]}"#,
                "only_cross_attention",
            ),
            (
                r#"{"resnet_time_scale_shift": "scale_shift"}"#,
                "resnet_time_scale_shift",
            ),
            (
                r#"{"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}"#,
                "AttnUpBlock2D",
            ),
            (r#"{"norm_num_groups": 48}"#, "norm_num_groups"),
        ] {
            let err = parse(json).validate().expect_err(field);
            assert!(err.contains(field), "{err} should name {field}");
        }
        assert!(parse(r#"{"mid_block_type": null}"#).validate().is_ok());
    }
}

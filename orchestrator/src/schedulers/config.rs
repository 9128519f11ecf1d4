//! `scheduler/scheduler_config.json` of a diffusers model folder, parsed field by field.
//!
//! The file is written by whichever scheduler class the model was published with (SD 1.x ships
//! `PNDMScheduler`, SD 2.x `DDIMScheduler` or `EulerDiscreteScheduler`), and diffusers'
//! `from_config` lets any scheduler read it: keys a scheduler does not know are ignored, and
//! missing keys take that scheduler's defaults. This module keeps the same contract. Fields are
//! parsed by hand rather than with `#[derive(Deserialize)]` so that every error names the field
//! and the offending value, which serde's enum errors do not.

use std::path::Path;

use serde_json::{Map, Value};

use super::SchedulerError;

/// `beta_schedule`: how the per-timestep noise variances of training are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `torch.linspace(beta_start, beta_end, T)`.
    Linear,
    /// `torch.linspace(beta_start**0.5, beta_end**0.5, T) ** 2` (Stable Diffusion).
    ScaledLinear,
    /// `betas_for_alpha_bar` with the cosine schedule of Nichol & Dhariwal 2021, eq. 17.
    SquaredCosCapV2,
}

/// `prediction_type`: what the U-Net was trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε (SD 1.x, SD 2.x base).
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x 768, Salimans & Ho 2022).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// `timestep_spacing`: how inference timesteps are picked from the training range
/// (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// Multiples of `T / n` from 0, plus `steps_offset`.
    Leading,
    /// Evenly spaced over `[0, T-1]`, rounded.
    Linspace,
    /// Multiples of `T / n` counted down from `T`, minus one (always includes `T-1`).
    Trailing,
}

/// `interpolation_type` of the sigma schedulers: how inference sigmas are read off the
/// training sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationType {
    /// `np.interp` of σ(t) at the inference timesteps.
    Linear,
    /// Log-uniform from σ_min to σ_max.
    LogLinear,
}

/// The scheduler configuration shared by all schedulers. Defaults are those of diffusers'
/// `DDIMScheduler.__init__`; `timestep_spacing`, `set_alpha_to_one` and `clip_sample` are
/// optional because their defaults differ between schedulers (see
/// [`SchedulerConfig::timestep_spacing_or`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`: the scheduler the model was published with, if the file names one.
    pub class_name: Option<String>,
    /// T, the number of diffusion steps in training.
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when present they replace `beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    /// `clip_sample`; optional because DDIM defaults it to true and Heun to false.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// `set_alpha_to_one`; optional because DDIM defaults it to true and PNDM to false.
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: `skip_prk_steps` (false in diffusers when absent).
    pub skip_prk_steps: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub rescale_betas_zero_snr: bool,
    /// Sigma schedulers: `interpolation_type`.
    pub interpolation_type: InterpolationType,
    /// DDPM: `variance_type` as written (DDPMScheduler default "fixed_small" when absent).
    pub variance_type: Option<String>,
    /// LCM: `original_inference_steps`, the distillation schedule's length (LCMScheduler
    /// default 50 when absent).
    pub original_inference_steps: Option<usize>,
    /// LCM: `timestep_scaling` of the consistency boundary condition (default 10 when absent).
    pub timestep_scaling: Option<f64>,
    /// Sigma schedulers: `use_karras_sigmas` (Karras et al. 2022, eq. 5 σ spacing with ρ = 7).
    /// Schedulers without the option (DDIM, PNDM, ...) ignore it, as `from_config` does.
    pub use_karras_sigmas: bool,
    /// Sigma-schedule variants of the Euler family that are parsed but not implemented:
    /// `use_exponential_sigmas`, `use_beta_sigmas` set to true,
    /// `timestep_type` "continuous", `final_sigmas_type` "sigma_min". Each entry is the field
    /// name and its value; the sigma schedulers refuse to build while any is set, so a model
    /// that asks for them is never silently sampled another way. DDIM ignores them, as
    /// diffusers does.
    pub unsupported_sigma_options: Vec<(String, String)>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            skip_prk_steps: false,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            rescale_betas_zero_snr: false,
            interpolation_type: InterpolationType::Linear,
            variance_type: None,
            original_inference_steps: None,
            timestep_scaling: None,
            use_karras_sigmas: false,
            unsupported_sigma_options: Vec::new(),
        }
    }
}

impl SchedulerConfig {
    /// Reads `<model_dir>/scheduler/scheduler_config.json`.
    pub fn from_model_dir(model_dir: &Path) -> Result<Self, SchedulerError> {
        let path = model_dir.join("scheduler").join("scheduler_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| SchedulerError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses the JSON text of a `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self, SchedulerError> {
        let value: Value = serde_json::from_str(text).map_err(|e| SchedulerError::Config {
            field: "<file>".into(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(SchedulerError::Config {
                field: "<file>".into(),
                message: "expected a JSON object".into(),
            });
        };
        Self::from_map(&map)
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self, SchedulerError> {
        let d = Self::default();
        let fields = Fields(map);
        // diffusers' `thresholding` (Imagen dynamic thresholding) is for pixel-space models;
        // rejecting it beats silently sampling differently from the reference.
        if fields.bool("thresholding")?.unwrap_or(false) {
            return Err(fields.invalid("thresholding", "true is not supported"));
        }
        let config = Self {
            class_name: fields.string("_class_name")?,
            num_train_timesteps: fields
                .usize("num_train_timesteps")?
                .unwrap_or(d.num_train_timesteps),
            beta_start: fields.f64("beta_start")?.unwrap_or(d.beta_start),
            beta_end: fields.f64("beta_end")?.unwrap_or(d.beta_end),
            beta_schedule: fields
                .choice(
                    "beta_schedule",
                    &[
                        ("linear", BetaSchedule::Linear),
                        ("scaled_linear", BetaSchedule::ScaledLinear),
                        ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
                    ],
                )?
                .unwrap_or(d.beta_schedule),
            trained_betas: fields.f64_list("trained_betas")?,
            clip_sample: fields.bool("clip_sample")?,
            clip_sample_range: fields
                .f64("clip_sample_range")?
                .unwrap_or(d.clip_sample_range),
            set_alpha_to_one: fields.bool("set_alpha_to_one")?,
            skip_prk_steps: fields.bool("skip_prk_steps")?.unwrap_or(d.skip_prk_steps),
            steps_offset: fields.usize("steps_offset")?.unwrap_or(d.steps_offset),
            prediction_type: fields
                .choice(
                    "prediction_type",
                    &[
                        ("epsilon", PredictionType::Epsilon),
                        ("v_prediction", PredictionType::VPrediction),
                        ("sample", PredictionType::Sample),
                    ],
                )?
                .unwrap_or(d.prediction_type),
            timestep_spacing: fields.choice(
                "timestep_spacing",
                &[
                    ("leading", TimestepSpacing::Leading),
                    ("linspace", TimestepSpacing::Linspace),
                    ("trailing", TimestepSpacing::Trailing),
                ],
            )?,
            rescale_betas_zero_snr: fields
                .bool("rescale_betas_zero_snr")?
                .unwrap_or(d.rescale_betas_zero_snr),
            interpolation_type: fields
                .choice(
                    "interpolation_type",
                    &[
                        ("linear", InterpolationType::Linear),
                        ("log_linear", InterpolationType::LogLinear),
                    ],
                )?
                .unwrap_or(d.interpolation_type),
            variance_type: fields.string("variance_type")?,
            original_inference_steps: fields.usize("original_inference_steps")?,
            timestep_scaling: fields.f64("timestep_scaling")?,
            use_karras_sigmas: fields
                .bool("use_karras_sigmas")?
                .unwrap_or(d.use_karras_sigmas),
            unsupported_sigma_options: fields.unsupported_sigma_options()?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the values the schedule math relies on, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        let bad = |field: &str, message: String| SchedulerError::Config {
            field: field.into(),
            message,
        };
        if self.num_train_timesteps < 2 {
            return Err(bad(
                "num_train_timesteps",
                format!("{} is too small (need >= 2)", self.num_train_timesteps),
            ));
        }
        match &self.trained_betas {
            Some(betas) => {
                if betas.len() != self.num_train_timesteps {
                    return Err(bad(
                        "trained_betas",
                        format!(
                            "has {} values, num_train_timesteps is {}",
                            betas.len(),
                            self.num_train_timesteps
                        ),
                    ));
                }
                if let Some(b) = betas.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
                    return Err(bad("trained_betas", format!("{b} is outside (0, 1)")));
                }
            }
            None => {
                for (field, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                    if !(v > 0.0 && v < 1.0) {
                        return Err(bad(field, format!("{v} is outside (0, 1)")));
                    }
                }
            }
        }
        if self.clip_sample_range.is_nan() || self.clip_sample_range <= 0.0 {
            return Err(bad(
                "clip_sample_range",
                format!("{} must be > 0", self.clip_sample_range),
            ));
        }
        Ok(())
    }

    /// `_class_name`: the diffusers scheduler the model was published with, if named.
    pub fn class_name(&self) -> Option<&str> {
        self.class_name.as_deref()
    }

    /// The configured spacing, or the given scheduler's own default when the file has none.
    pub fn timestep_spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }
}

/// `serde_json::from_str::<SchedulerConfig>(text)` works too, with the same field-naming errors
/// and defaults as [`SchedulerConfig::from_json`].
impl<'de> serde::Deserialize<'de> for SchedulerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = Map::<String, Value>::deserialize(deserializer)?;
        Self::from_map(&map).map_err(serde::de::Error::custom)
    }
}

/// Typed, field-naming accessors over the JSON object. `null` counts as absent, as in diffusers
/// (`"trained_betas": null` is the common case).
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    fn invalid(&self, field: &str, message: impl Into<String>) -> SchedulerError {
        SchedulerError::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    fn wrong_type(&self, field: &str, expected: &str, got: &Value) -> SchedulerError {
        self.invalid(field, format!("expected {expected}, got {got}"))
    }

    fn bool(&self, field: &str) -> Result<Option<bool>, SchedulerError> {
        self.get(field)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.wrong_type(field, "a boolean", v))
            })
            .transpose()
    }

    fn f64(&self, field: &str) -> Result<Option<f64>, SchedulerError> {
        self.get(field)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(field, "a number", v))
            })
            .transpose()
    }

    fn usize(&self, field: &str) -> Result<Option<usize>, SchedulerError> {
        self.get(field)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.wrong_type(field, "a non-negative integer", v))
            })
            .transpose()
    }

    fn string(&self, field: &str) -> Result<Option<String>, SchedulerError> {
        self.get(field)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.wrong_type(field, "a string", v))
            })
            .transpose()
    }

    fn f64_list(&self, field: &str) -> Result<Option<Vec<f64>>, SchedulerError> {
        self.get(field)
            .map(|v| {
                v.as_array()
                    .and_then(|items| items.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| self.wrong_type(field, "a list of numbers", v))
            })
            .transpose()
    }

    fn unsupported_sigma_options(&self) -> Result<Vec<(String, String)>, SchedulerError> {
        let mut found = Vec::new();
        for field in ["use_exponential_sigmas", "use_beta_sigmas"] {
            if self.bool(field)?.unwrap_or(false) {
                found.push((field.to_owned(), "true".to_owned()));
            }
        }
        for (field, default) in [("timestep_type", "discrete"), ("final_sigmas_type", "zero")] {
            if let Some(v) = self.string(field)?.filter(|v| v != default) {
                found.push((field.to_owned(), v));
            }
        }
        Ok(found)
    }

    fn choice<T: Copy>(
        &self,
        field: &str,
        options: &[(&str, T)],
    ) -> Result<Option<T>, SchedulerError> {
        let Some(name) = self.string(field)? else {
            return Ok(None);
        };
        options
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| Some(*v))
            .ok_or_else(|| {
                let valid: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.invalid(
                    field,
                    format!("unknown value {name:?} (valid: {})", valid.join(", ")),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `runwayml/stable-diffusion-v1-5`'s file: a PNDM config read by another scheduler.
    const SD15: &str = r#"{
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "trained_betas": null, "clip_sample": false
    }"#;

    #[test]
    fn reads_sd15_config_ignoring_unknown_keys() {
        let c = SchedulerConfig::from_json(SD15).expect("valid config");
        assert_eq!(c.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!((c.beta_start, c.beta_end), (0.00085, 0.012));
        assert_eq!(c.steps_offset, 1);
        assert_eq!(c.set_alpha_to_one, Some(false));
        assert!(c.skip_prk_steps);
        assert_eq!(c.clip_sample, Some(false));
        assert_eq!(c.trained_betas, None);
        assert_eq!(c.prediction_type, PredictionType::Epsilon);
        assert_eq!(c.timestep_spacing, None);
    }

    #[test]
    fn serde_deserialize_matches_from_json() {
        let via_serde: SchedulerConfig = serde_json::from_str(SD15).expect("valid");
        assert_eq!(via_serde, SchedulerConfig::from_json(SD15).expect("valid"));
        let err = serde_json::from_str::<SchedulerConfig>(r#"{"beta_schedule": "cubic"}"#)
            .expect_err("unknown variant")
            .to_string();
        assert!(
            err.contains("beta_schedule") && err.contains("cubic"),
            "{err}"
        );
    }

    #[test]
    fn missing_fields_take_ddim_defaults() {
        assert_eq!(
            SchedulerConfig::from_json("{}").expect("valid"),
            SchedulerConfig::default()
        );
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let err = SchedulerConfig::from_json(r#"{"prediction_type": "x0"}"#)
            .expect_err("unknown variant")
            .to_string();
        assert!(
            err.contains("prediction_type") && err.contains("x0"),
            "{err}"
        );
        let err = SchedulerConfig::from_json(r#"{"steps_offset": -1}"#)
            .expect_err("negative")
            .to_string();
        assert!(err.contains("steps_offset"), "{err}");
        let err = SchedulerConfig::from_json(r#"{"thresholding": true}"#)
            .expect_err("unsupported")
            .to_string();
        assert!(err.contains("thresholding"), "{err}");
        let err = SchedulerConfig::from_json(r#"{"trained_betas": [0.1, 0.2]}"#)
            .expect_err("length")
            .to_string();
        assert!(err.contains("trained_betas"), "{err}");
    }
}

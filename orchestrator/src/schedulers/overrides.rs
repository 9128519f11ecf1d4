//! Per-request changes to the model's scheduler config, with the meaning of diffusers'
//! `XScheduler.from_config(config, **overrides)`: each set field replaces the config's value.
//!
//! Unlike `from_config`, which silently drops keys a class does not know, an override the chosen
//! scheduler does not have is an error: a client that asks for Karras sigmas on DDIM should hear
//! that it will not get them.

use super::SchedulerError;
use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

/// Optional per-request scheduler settings; `None` keeps the model config's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerOverrides {
    /// Karras et al. 2022 σ spacing (sigma schedulers: euler, heun, dpmpp_2m, dpmpp_2m_sde,
    /// lms, unipc; diffusers' Euler ancestral has no such option).
    pub use_karras_sigmas: Option<bool>,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: Option<usize>,
    pub prediction_type: Option<PredictionType>,
    pub beta_schedule: Option<BetaSchedule>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub clip_sample: Option<bool>,
    pub set_alpha_to_one: Option<bool>,
    /// DDIM's η (`DDIMScheduler.step(eta=...)`): 0 is deterministic, 1 is DDPM-like.
    pub eta: Option<f32>,
}

/// Every option, in the order errors list them.
pub const OPTIONS: &[&str] = &[
    "use_karras_sigmas",
    "timestep_spacing",
    "steps_offset",
    "prediction_type",
    "beta_schedule",
    "rescale_betas_zero_snr",
    "clip_sample",
    "set_alpha_to_one",
    "eta",
];

const COMMON: [&str; 4] = [
    "timestep_spacing",
    "steps_offset",
    "prediction_type",
    "beta_schedule",
];

/// The options a scheduler accepts: the `__init__` parameters of its diffusers class (plus
/// `eta` for DDIM's step).
pub fn supported_options(scheduler: &str) -> Vec<&'static str> {
    let extra: &[&'static str] = match scheduler {
        "ddim" => &[
            "rescale_betas_zero_snr",
            "clip_sample",
            "set_alpha_to_one",
            "eta",
        ],
        "euler" | "dpmpp_2m" | "dpmpp_2m_sde" => &["use_karras_sigmas", "rescale_betas_zero_snr"],
        // diffusers 0.42.1's EulerAncestralDiscreteScheduler has no use_karras_sigmas.
        "euler_ancestral" => &["rescale_betas_zero_snr"],
        "heun" => &["use_karras_sigmas", "clip_sample"],
        "lms" => &["use_karras_sigmas"],
        "pndm" => &["set_alpha_to_one"],
        "ddpm" => &["rescale_betas_zero_snr", "clip_sample"],
        "unipc" => &["use_karras_sigmas", "rescale_betas_zero_snr"],
        "lcm" => &["rescale_betas_zero_snr", "clip_sample", "set_alpha_to_one"],
        _ => &[],
    };
    let mut all: Vec<&'static str> = COMMON.iter().chain(extra).copied().collect();
    all.sort_by_key(|o| OPTIONS.iter().position(|x| x == o));
    all
}

fn choice<T: Copy>(option: &str, value: &str, options: &[(&str, T)]) -> Result<T, SchedulerError> {
    options
        .iter()
        .find(|(n, _)| *n == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let valid: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            SchedulerError::Option {
                option: option.into(),
                message: format!("unknown value {value:?} (valid: {})", valid.join(", ")),
            }
        })
}

impl SchedulerOverrides {
    /// Sets `option` from its string form (as an API or CLI receives it); errors name the
    /// option and list the valid options or values.
    pub fn set(&mut self, option: &str, value: &str) -> Result<(), SchedulerError> {
        let boolean = || {
            choice(
                option,
                &value.to_ascii_lowercase(),
                &[("true", true), ("false", false)],
            )
        };
        let number_err = |what: &str| SchedulerError::Option {
            option: option.into(),
            message: format!("{value:?} is not {what}"),
        };
        match option {
            "use_karras_sigmas" => self.use_karras_sigmas = Some(boolean()?),
            "rescale_betas_zero_snr" => self.rescale_betas_zero_snr = Some(boolean()?),
            "clip_sample" => self.clip_sample = Some(boolean()?),
            "set_alpha_to_one" => self.set_alpha_to_one = Some(boolean()?),
            "timestep_spacing" => {
                self.timestep_spacing = Some(choice(
                    option,
                    value,
                    &[
                        ("leading", TimestepSpacing::Leading),
                        ("linspace", TimestepSpacing::Linspace),
                        ("trailing", TimestepSpacing::Trailing),
                    ],
                )?);
            }
            "prediction_type" => {
                self.prediction_type = Some(choice(
                    option,
                    value,
                    &[
                        ("epsilon", PredictionType::Epsilon),
                        ("v_prediction", PredictionType::VPrediction),
                        ("sample", PredictionType::Sample),
                    ],
                )?);
            }
            "beta_schedule" => {
                self.beta_schedule = Some(choice(
                    option,
                    value,
                    &[
                        ("linear", BetaSchedule::Linear),
                        ("scaled_linear", BetaSchedule::ScaledLinear),
                        ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
                    ],
                )?);
            }
            "steps_offset" => {
                self.steps_offset = Some(
                    value
                        .parse()
                        .map_err(|_| number_err("a non-negative integer"))?,
                );
            }
            "eta" => {
                let eta: f32 = value.parse().map_err(|_| number_err("a number"))?;
                self.eta = Some(eta);
            }
            _ => {
                return Err(SchedulerError::Option {
                    option: option.into(),
                    message: format!("unknown option (valid: {})", OPTIONS.join(", ")),
                });
            }
        }
        Ok(())
    }

    /// Names of the options that are set.
    pub fn set_options(&self) -> Vec<&'static str> {
        let set = [
            self.use_karras_sigmas.is_some(),
            self.timestep_spacing.is_some(),
            self.steps_offset.is_some(),
            self.prediction_type.is_some(),
            self.beta_schedule.is_some(),
            self.rescale_betas_zero_snr.is_some(),
            self.clip_sample.is_some(),
            self.set_alpha_to_one.is_some(),
            self.eta.is_some(),
        ];
        OPTIONS
            .iter()
            .zip(set)
            .filter(|(_, s)| *s)
            .map(|(o, _)| *o)
            .collect()
    }

    /// The config `scheduler` is built from: `config` with the set fields replaced. `eta` is
    /// not a config field; the caller passes it to DDIM's step.
    pub fn apply(
        &self,
        scheduler: &str,
        config: &SchedulerConfig,
    ) -> Result<SchedulerConfig, SchedulerError> {
        let supported = supported_options(scheduler);
        if let Some(option) = self
            .set_options()
            .into_iter()
            .find(|o| !supported.contains(o))
        {
            return Err(SchedulerError::Option {
                option: option.into(),
                message: format!(
                    "not supported by the {scheduler} scheduler (it supports: {})",
                    supported.join(", ")
                ),
            });
        }
        let mut c = config.clone();
        if let Some(v) = self.use_karras_sigmas {
            c.use_karras_sigmas = v;
        }
        if let Some(v) = self.timestep_spacing {
            c.timestep_spacing = Some(v);
        }
        if let Some(v) = self.steps_offset {
            c.steps_offset = v;
        }
        if let Some(v) = self.prediction_type {
            c.prediction_type = v;
        }
        if let Some(v) = self.beta_schedule {
            c.beta_schedule = v;
        }
        if let Some(v) = self.rescale_betas_zero_snr {
            c.rescale_betas_zero_snr = v;
        }
        if let Some(v) = self.clip_sample {
            c.clip_sample = Some(v);
        }
        if let Some(v) = self.set_alpha_to_one {
            c.set_alpha_to_one = Some(v);
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_option_names_option_and_alternatives() {
        let o = SchedulerOverrides {
            use_karras_sigmas: Some(true),
            ..Default::default()
        };
        let err = o
            .apply("ddim", &SchedulerConfig::default())
            .expect_err("ddim has no karras sigmas")
            .to_string();
        assert!(
            err.contains("use_karras_sigmas") && err.contains("ddim") && err.contains("eta"),
            "{err}"
        );
        let c = o
            .apply("euler", &SchedulerConfig::default())
            .expect("euler has it");
        assert!(c.use_karras_sigmas);
    }

    #[test]
    fn set_parses_strings_and_lists_valid_values() {
        let mut o = SchedulerOverrides::default();
        o.set("timestep_spacing", "trailing").expect("valid");
        o.set("eta", "0.5").expect("valid");
        o.set("clip_sample", "True").expect("valid");
        assert_eq!(o.timestep_spacing, Some(TimestepSpacing::Trailing));
        assert_eq!(o.eta, Some(0.5));
        assert_eq!(o.clip_sample, Some(true));
        let err = o
            .set("timestep_spacing", "even")
            .expect_err("bad")
            .to_string();
        assert!(
            err.contains("timestep_spacing") && err.contains("leading, linspace, trailing"),
            "{err}"
        );
        let err = o.set("karras", "true").expect_err("bad").to_string();
        assert!(err.contains("use_karras_sigmas"), "{err}");
    }
}

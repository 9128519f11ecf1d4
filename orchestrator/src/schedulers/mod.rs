//! Samplers for the reverse-diffusion loop, ported from diffusers 0.42.1 behind one trait.
//!
//! The orchestrator's loop is the same for every sampler: scale the latents with
//! [`Scheduler::scale_model_input`], send them with `timesteps()[step]` to the denoiser, and feed
//! the guided prediction to [`Scheduler::step`]. Steps are addressed by their position in the
//! schedule, never by looking a float timestep up again (diffusers-rs' float-equality lookup
//! breaks when two schedules round the same timestep differently).
//!
//! Latents are flat `f32` slices in the denoiser's row-major layout; the samplers are
//! element-wise, so the batch and image shape do not matter here. Arithmetic on the latents is
//! f32 in diffusers' order of operations, so results track the reference to float32 rounding.

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpmsolver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod heun_discrete;
pub mod lcm;
pub mod lms_discrete;
pub mod overrides;
pub mod pndm;
pub mod schedule;
pub mod sigmas;
pub mod unipc_multistep;

pub use config::{
    BetaSchedule, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
};
pub use overrides::SchedulerOverrides;

use crate::rng::TorchGenerator;

/// Errors from building or stepping a scheduler. Messages name the field or value at fault so
/// they can be returned to API clients as INVALID_ARGUMENT.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A `scheduler_config.json` field has a wrong type or an unsupported value.
    #[error("scheduler config field `{field}`: {message}")]
    Config { field: String, message: String },
    /// The config file could not be read.
    #[error("reading scheduler config {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The requested number of inference steps is out of range.
    #[error("steps = {steps} is out of range: must be between 1 and num_train_timesteps ({max})")]
    Steps { steps: usize, max: usize },
    /// No scheduler has this name.
    #[error("unknown scheduler {name:?}; valid names: {}", NAMES.join(", "))]
    UnknownName { name: String },
    /// `step` was called with a step index past the end of the schedule.
    #[error("step index {step} is out of range for a {len}-step schedule")]
    StepIndex { step: usize, len: usize },
    /// `model_output` and `sample` differ in length.
    #[error("model_output has {model_output} elements but sample has {sample}")]
    Shape { model_output: usize, sample: usize },
    /// A sampler-specific option has an invalid value.
    #[error("scheduler option `{option}`: {message}")]
    Option { option: String, message: String },
}

/// A reverse-diffusion sampler configured for a fixed number of steps.
pub trait Scheduler: Send {
    /// Timesteps of the schedule in the order they are used (noisiest first), as the float
    /// values sent to the U-Net.
    fn timesteps(&self) -> &[f32];
    /// Factor on the initial noise: 1 for the ᾱ-parameterised samplers (DDIM, DDPM, PNDM,
    /// DPM-Solver, UniPC, LCM); σ_max-based for the σ samplers, which override it.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    /// Model input for step index `step`: the sample itself, except for the σ samplers
    /// (Euler-style), which scale it by 1/√(σ² + 1) and override this.
    fn scale_model_input(&self, sample: &[f32], _step: usize) -> Vec<f32> {
        sample.to_vec()
    }
    /// One reverse-diffusion step from the model output at step index `step`; returns the
    /// previous sample. `rng` supplies noise for stochastic samplers.
    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>, SchedulerError>;
    /// The σ schedule of sigma-based samplers (one per timestep plus the final one), as
    /// diffusers' `scheduler.sigmas`; `None` for samplers that have none (DDIM, PNDM, DDPM).
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// `add_noise`: `original` noised to the level of step index `step` (`timesteps()[step]`
    /// or its σ), as img2img does before starting the loop at `step`. `original` and `noise`
    /// have the same length; `step` must be below `timesteps().len()` (panics otherwise).
    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32>;
}

/// `add_noise` of the ᾱ (DDPM-parameterised) schedulers, e.g. `DDIMScheduler.add_noise`:
/// √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε (DDPM, Ho et al. 2020, eq. 4), in float32.
pub(crate) fn add_noise_alpha(original: &[f32], noise: &[f32], alpha_prod: f32) -> Vec<f32> {
    let sqrt_alpha = alpha_prod.sqrt();
    let sqrt_one_minus = (1.0 - alpha_prod).sqrt();
    original
        .iter()
        .zip(noise)
        .map(|(x, n)| sqrt_alpha * x + sqrt_one_minus * n)
        .collect()
}

/// `add_noise` of the σ schedulers, e.g. `EulerDiscreteScheduler.add_noise`: x₀ + σ·ε.
pub(crate) fn add_noise_sigma(original: &[f32], noise: &[f32], sigma: f32) -> Vec<f32> {
    original
        .iter()
        .zip(noise)
        .map(|(x, n)| x + n * sigma)
        .collect()
}

/// The scheduler used when a request names none.
pub const DEFAULT: &str = "ddim";

/// Names accepted by [`build`].
pub const NAMES: &[&str] = &[
    "ddim",
    "euler",
    "euler_ancestral",
    "dpmpp_2m",
    "pndm",
    "heun",
    "dpmpp_2m_sde",
    "ddpm",
    "lms",
    "lcm",
    "unipc",
];

/// Our name for the diffusers scheduler class a model folder names in `_class_name`, so a model
/// samples by default the way it was published. `None` for classes we do not implement (the
/// caller then falls back to [`DEFAULT`]). The class decides the family only: e.g. a
/// `DPMSolverMultistepScheduler` config is sampled as DPM++ 2M whatever its solver fields say.
pub fn name_for_class(class_name: Option<&str>) -> Option<&'static str> {
    match class_name? {
        "DDIMScheduler" => Some("ddim"),
        "EulerDiscreteScheduler" => Some("euler"),
        "EulerAncestralDiscreteScheduler" => Some("euler_ancestral"),
        "DPMSolverMultistepScheduler" => Some("dpmpp_2m"),
        "PNDMScheduler" => Some("pndm"),
        "HeunDiscreteScheduler" => Some("heun"),
        "DDPMScheduler" => Some("ddpm"),
        "LMSDiscreteScheduler" => Some("lms"),
        "LCMScheduler" => Some("lcm"),
        "UniPCMultistepScheduler" => Some("unipc"),
        _ => None,
    }
}

/// Builds the named scheduler for `steps` inference steps from the model's config as is.
pub fn build(
    name: &str,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    build_with(name, config, &SchedulerOverrides::default(), steps)
}

/// Builds the named scheduler for `steps` inference steps, with per-request `overrides` on top
/// of the model's config (`XScheduler.from_config(config, **overrides)`). An override the named
/// scheduler does not have is an error naming the option and the ones it does have.
pub fn build_with(
    name: &str,
    config: &SchedulerConfig,
    overrides: &SchedulerOverrides,
    steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    if !NAMES.contains(&name) {
        return Err(SchedulerError::UnknownName { name: name.into() });
    }
    let config = &overrides.apply(name, config)?;
    match name {
        "ddim" => Ok(Box::new(ddim::DdimScheduler::new(
            config,
            steps,
            overrides.eta.unwrap_or(0.0),
        )?)),
        "euler" => Ok(Box::new(euler_discrete::EulerDiscreteScheduler::new(
            config, steps,
        )?)),
        "dpmpp_2m" => Ok(Box::new(
            dpmsolver_multistep::DpmSolverMultistepScheduler::new(
                config,
                steps,
                dpmsolver_multistep::Algorithm::DpmSolverPlusPlus,
            )?,
        )),
        "dpmpp_2m_sde" => Ok(Box::new(
            dpmsolver_multistep::DpmSolverMultistepScheduler::new(
                config,
                steps,
                dpmsolver_multistep::Algorithm::SdeDpmSolverPlusPlus,
            )?,
        )),
        "pndm" => Ok(Box::new(pndm::PndmScheduler::new(config, steps)?)),
        "ddpm" => Ok(Box::new(ddpm::DdpmScheduler::new(config, steps)?)),
        "lcm" => Ok(Box::new(lcm::LcmScheduler::new(config, steps)?)),
        "unipc" => Ok(Box::new(unipc_multistep::UniPcMultistepScheduler::new(
            config, steps,
        )?)),
        "lms" => Ok(Box::new(lms_discrete::LmsDiscreteScheduler::new(
            config, steps,
        )?)),
        "heun" => Ok(Box::new(heun_discrete::HeunDiscreteScheduler::new(
            config, steps,
        )?)),
        "euler_ancestral" => Ok(Box::new(
            euler_ancestral_discrete::EulerAncestralDiscreteScheduler::new(config, steps)?,
        )),
        _ => Err(SchedulerError::UnknownName { name: name.into() }),
    }
}

/// Shared argument checks for `step`: index in range and matching lengths.
fn check_step_args(
    step: usize,
    len: usize,
    model_output: &[f32],
    sample: &[f32],
) -> Result<(), SchedulerError> {
    if step >= len {
        return Err(SchedulerError::StepIndex { step, len });
    }
    if model_output.len() != sample.len() {
        return Err(SchedulerError::Shape {
            model_output: model_output.len(),
            sample: sample.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_lists_valid_names() {
        let Err(err) = build("dpm", &SchedulerConfig::default(), 10) else {
            panic!("expected an error");
        };
        let msg = err.to_string();
        assert!(msg.contains("dpm") && msg.contains(DEFAULT), "{msg}");
    }

    #[test]
    fn class_names_map_to_built_schedulers() {
        assert_eq!(
            name_for_class(Some("EulerDiscreteScheduler")),
            Some("euler")
        );
        assert_eq!(name_for_class(Some("VQDiffusionScheduler")), None);
        assert_eq!(name_for_class(None), None);
        for class in [
            "DDIMScheduler",
            "EulerAncestralDiscreteScheduler",
            "DPMSolverMultistepScheduler",
        ] {
            let name = name_for_class(Some(class)).expect("mapped");
            assert!(NAMES.contains(&name), "{class} -> {name}");
        }
    }

    #[test]
    fn every_listed_name_builds() {
        let config = SchedulerConfig {
            skip_prk_steps: true,
            ..SchedulerConfig::default()
        };
        for name in NAMES {
            let s = build(name, &config, 10).expect("builds");
            // PLMS calls the U-Net once more than its step count (warm-up step).
            let expected = match *name {
                "pndm" => 11,
                // Heun: two U-Net calls per step but the first.
                "heun" => 19,
                _ => 10,
            };
            assert_eq!(s.timesteps().len(), expected, "{name}");
        }
    }

    #[test]
    fn multistep_schedulers_reject_out_of_order_steps() {
        let config = SchedulerConfig {
            skip_prk_steps: true,
            ..SchedulerConfig::default()
        };
        let mut rng = TorchGenerator::new(0);
        let x = vec![0.5f32; 4];
        for name in ["pndm", "dpmpp_2m", "dpmpp_2m_sde", "heun", "lms", "unipc"] {
            let mut s = build(name, &config, 10).expect("builds");
            let err = s
                .step(&x, 1, &x, &mut rng)
                .expect_err("step 1 before step 0");
            assert!(err.to_string().contains("expected step 0"), "{name}: {err}");
        }
    }

    #[test]
    fn mismatched_lengths_and_indices_are_errors() {
        let mut s = build(DEFAULT, &SchedulerConfig::default(), 10).expect("builds");
        let mut rng = TorchGenerator::new(0);
        let err = s
            .step(&[0.0; 3], 0, &[0.0; 4], &mut rng)
            .expect_err("shape");
        assert!(err.to_string().contains("model_output"), "{err}");
        let err = s
            .step(&[0.0; 4], 10, &[0.0; 4], &mut rng)
            .expect_err("index");
        assert!(err.to_string().contains("step index 10"), "{err}");
    }

    #[test]
    fn build_with_rejects_options_the_scheduler_lacks() {
        let config = SchedulerConfig::default();
        let karras = SchedulerOverrides {
            use_karras_sigmas: Some(true),
            ..SchedulerOverrides::default()
        };
        for name in ["ddim", "pndm", "ddpm", "lcm", "euler_ancestral"] {
            let Err(err) = build_with(name, &config, &karras, 10) else {
                panic!("{name} accepted use_karras_sigmas");
            };
            let msg = err.to_string();
            assert!(
                msg.contains("use_karras_sigmas") && msg.contains(name),
                "{name}: {msg}"
            );
        }
        for name in ["euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lms", "unipc"] {
            let s = build_with(name, &config, &karras, 10).expect("karras builds");
            // Karras spacing ends at the training σ_min, not at the σ of the last timestep.
            let plain = build(name, &config, 10).expect("builds");
            assert_ne!(s.sigmas(), plain.sigmas(), "{name}");
        }
        let eta = SchedulerOverrides {
            eta: Some(0.5),
            ..SchedulerOverrides::default()
        };
        let Err(err) = build_with("euler", &config, &eta, 10) else {
            panic!("euler accepted eta");
        };
        assert!(err.to_string().contains("eta"), "{err}");
        build_with("ddim", &config, &eta, 10).expect("ddim takes eta");
    }

    #[test]
    fn every_name_has_a_class_and_options() {
        for class in [
            "DDIMScheduler",
            "DDPMScheduler",
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "HeunDiscreteScheduler",
            "LMSDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "PNDMScheduler",
            "UniPCMultistepScheduler",
            "LCMScheduler",
        ] {
            let name = name_for_class(Some(class)).expect("mapped");
            assert!(NAMES.contains(&name), "{class} -> {name}");
        }
        for name in NAMES {
            assert!(
                overrides::supported_options(name).contains(&"timestep_spacing"),
                "{name}"
            );
        }
    }

    #[test]
    fn ddpm_rejects_learned_variances() {
        let config =
            SchedulerConfig::from_json(r#"{"variance_type": "learned_range"}"#).expect("valid");
        let Err(err) = build("ddpm", &config, 10) else {
            panic!("learned_range accepted");
        };
        assert!(err.to_string().contains("variance_type"), "{err}");
        // Other schedulers ignore the key, as from_config does.
        build("ddim", &config, 10).expect("ddim ignores variance_type");
    }

    #[test]
    fn lcm_rejects_more_steps_than_its_distillation_schedule() {
        let Err(err) = build("lcm", &SchedulerConfig::default(), 51) else {
            panic!("51 LCM steps accepted");
        };
        assert!(
            err.to_string().contains("original_inference_steps"),
            "{err}"
        );
    }

    #[test]
    fn steps_out_of_range_are_rejected() {
        let config = SchedulerConfig::default();
        for steps in [0, config.num_train_timesteps + 1] {
            let Err(err) = build(DEFAULT, &config, steps) else {
                panic!("steps = {steps} accepted");
            };
            assert!(err.to_string().contains("steps"), "{err}");
        }
    }
}

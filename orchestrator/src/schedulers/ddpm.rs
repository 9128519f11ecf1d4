//! DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
//! eq. 6–7), following diffusers 0.42.1 `scheduling_ddpm.py::DDPMScheduler` with
//! `variance_type="fixed_small"` (its default, and what Stable Diffusion configs use).

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::predicted_x0;
use super::{Scheduler, SchedulerError, add_noise_alpha, check_step_args, schedule};
use crate::rng::TorchGenerator;

/// Each step samples x_{t'} from the posterior q(x_{t'} | x_t, x̂₀) between consecutive schedule
/// timesteps t > t', adding σ-scaled noise from the request's generator on every step but the
/// one that lands on t = 0, where diffusers draws it (`randn_tensor` after the mean).
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    /// ᾱ per training timestep, rounded to f32 like diffusers' float32 table.
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
}

impl DdpmScheduler {
    /// `DDPMScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        schedule::check_steps(steps, config)?;
        // The learned/large variances are for pixel-space models (DeepFloyd IF, unCLIP); refuse
        // them rather than sample differently from the reference.
        if let Some(v) = config
            .variance_type
            .as_deref()
            .filter(|v| *v != "fixed_small")
        {
            return Err(SchedulerError::Config {
                field: "variance_type".into(),
                message: format!(
                    "{v:?} is not supported by the ddpm scheduler (valid: fixed_small)"
                ),
            });
        }
        let alphas_cumprod: Vec<f32> = schedule::alphas_cumprod(&schedule::betas(config))
            .into_iter()
            .map(|a| a as f32)
            .collect();
        // DDPMScheduler's default timestep_spacing is "leading".
        let spacing = config.timestep_spacing_or(TimestepSpacing::Leading);
        let timesteps = schedule::timesteps(config, spacing, steps);
        if let Some(t) = timesteps
            .iter()
            .find(|t| **t < 0 || **t as usize >= config.num_train_timesteps)
        {
            return Err(SchedulerError::Config {
                field: "steps_offset".into(),
                message: format!(
                    "{} puts timestep {t} outside [0, {})",
                    config.steps_offset, config.num_train_timesteps
                ),
            });
        }
        Ok(Self {
            alphas_cumprod,
            timesteps_f32: timesteps.iter().map(|t| *t as f32).collect(),
            timesteps,
            prediction_type: config.prediction_type,
            // DDPMScheduler's default for clip_sample is true.
            clip_sample: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range as f32),
        })
    }
}

impl Scheduler for DdpmScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32> {
        // DDPMScheduler.add_noise: √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε.
        add_noise_alpha(
            original,
            noise,
            self.alphas_cumprod[self.timesteps[step] as usize],
        )
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_args(step, self.timesteps.len(), model_output, sample)?;
        let t = self.timesteps[step];
        // previous_timestep: the next schedule entry, or -1 (ᾱ = 1) after the last.
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let alpha_prod_t_prev = match self.timesteps.get(step + 1) {
            Some(prev_t) => self.alphas_cumprod[*prev_t as usize],
            None => 1.0,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        // DDPM eq. 7: the posterior mean's coefficients on x̂₀ and x_t.
        let x0_coeff = (alpha_prod_t_prev.sqrt() * current_beta_t) / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;

        let mut prev: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                // step's pred_original_sample (DDPM eq. 15 for ε).
                let x0 = predicted_x0(self.prediction_type, x, m, sqrt_a, sqrt_b);
                let x0 = match self.clip_sample {
                    Some(r) => x0.clamp(-r, r),
                    None => x0,
                };
                x0_coeff * x0 + sample_coeff * x
            })
            .collect();
        if t > 0 {
            // _get_variance, fixed_small: β̃_t = (1 − ᾱ_{t'})/(1 − ᾱ_t)·β_t (DDPM eq. 7),
            // clamped at 1e-20.
            let variance = ((beta_prod_t_prev / beta_prod_t) * current_beta_t).max(1e-20);
            let std = variance.sqrt();
            let noise = rng.randn(prev.len());
            for (p, n) in prev.iter_mut().zip(noise) {
                *p += std * n;
            }
        }
        Ok(prev)
    }
}

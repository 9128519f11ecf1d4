//! DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), following diffusers 0.42.1
//! `scheduling_ddim.py::DDIMScheduler`.

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::{Scheduler, SchedulerError, add_noise_alpha, check_step_args, schedule};
use crate::rng::TorchGenerator;

/// DDIM with a fixed step count. `eta = 0` is the deterministic sampler diffusers' pipelines use
/// by default; `eta > 0` adds σ_t-scaled noise drawn from the request's generator, in the same
/// order and amount as diffusers (`randn_tensor(model_output.shape, generator)` per step).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    /// ᾱ per training timestep, rounded to f32 like diffusers' float32 table.
    alphas_cumprod: Vec<f32>,
    /// ᾱ used after the last step (`set_alpha_to_one` ? 1 : ᾱ_0).
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    /// `num_train_timesteps // num_inference_steps`: diffusers derives the previous timestep
    /// with this stride whatever the spacing, so we do too.
    stride: i64,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    eta: f32,
}

impl DdimScheduler {
    /// `DDIMScheduler(**config)` followed by `set_timesteps(steps)`; `eta` is `step`'s `eta`.
    pub fn new(config: &SchedulerConfig, steps: usize, eta: f32) -> Result<Self, SchedulerError> {
        config.validate()?;
        schedule::check_steps(steps, config)?;
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(SchedulerError::Option {
                option: "eta".into(),
                message: format!("{eta} must be a finite number >= 0"),
            });
        }
        let alphas_cumprod: Vec<f32> = schedule::alphas_cumprod(&schedule::betas(config))
            .into_iter()
            .map(|a| a as f32)
            .collect();
        // DDIMScheduler's default for set_alpha_to_one is true.
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing = config.timestep_spacing_or(TimestepSpacing::Leading);
        let timesteps = schedule::timesteps(config, spacing, steps);
        if let Some(t) = timesteps
            .iter()
            .find(|t| **t < 0 || **t as usize >= config.num_train_timesteps)
        {
            // Only reachable through a large `steps_offset` with leading spacing.
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
            final_alpha_cumprod,
            timesteps_f32: timesteps.iter().map(|t| *t as f32).collect(),
            timesteps,
            stride: (config.num_train_timesteps / steps) as i64,
            prediction_type: config.prediction_type,
            // DDIMScheduler's default for clip_sample is true.
            clip_sample: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range as f32),
            eta,
        })
    }

    /// The integer timesteps (noisiest first).
    pub fn timesteps_i64(&self) -> &[i64] {
        &self.timesteps
    }

    fn alpha_prod_prev(&self, prev_t: i64) -> f32 {
        if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32> {
        // DDIMScheduler.add_noise: √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε.
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
        // DDIM paper eq. 12, in DDIMScheduler.step's notation.
        let t = self.timesteps[step];
        let prev_t = t - self.stride;
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let alpha_prod_t_prev = self.alpha_prod_prev(prev_t);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        // DDIMScheduler._get_variance: σ_t² of eq. 16 without η.
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let dir_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let sqrt_a_prev = alpha_prod_t_prev.sqrt();

        let mut prev: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                // Predicted x₀ and ε ("predicted x_0" of eq. 12, per prediction type).
                let (x0, eps) = match self.prediction_type {
                    PredictionType::Epsilon => ((x - sqrt_b * m) / sqrt_a, m),
                    PredictionType::Sample => (m, (x - sqrt_a * m) / sqrt_b),
                    PredictionType::VPrediction => {
                        (sqrt_a * x - sqrt_b * m, sqrt_a * m + sqrt_b * x)
                    }
                };
                let x0 = match self.clip_sample {
                    Some(r) => x0.clamp(-r, r),
                    None => x0,
                };
                sqrt_a_prev * x0 + dir_coeff * eps
            })
            .collect();
        if self.eta > 0.0 {
            let noise = rng.randn(prev.len());
            for (p, n) in prev.iter_mut().zip(noise) {
                *p += std_dev_t * n;
            }
        }
        Ok(prev)
    }
}

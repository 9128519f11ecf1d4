//! Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency Models",
//! algorithm 3), following diffusers 0.42.1 `scheduling_lcm.py::LCMScheduler`.

use super::config::{PredictionType, SchedulerConfig};
use super::schedule::predicted_x0;
use super::{Scheduler, SchedulerError, add_noise_alpha, check_step_args, schedule};
use crate::rng::TorchGenerator;

/// `LCMScheduler`'s `original_inference_steps` default.
const ORIGINAL_INFERENCE_STEPS: usize = 50;
/// `LCMScheduler`'s `timestep_scaling` default.
const TIMESTEP_SCALING: f64 = 10.0;
/// σ_data of the consistency-model boundary condition (`get_scalings_for_boundary_condition_discrete`).
const SIGMA_DATA: f32 = 0.5;

/// Each step maps x_t to the consistency function's x₀ estimate and, but on the last step,
/// re-noises it to the next timestep with noise from the request's generator.
///
/// Meant for LCM-distilled U-Nets; a config that omits the betas gets DDIM's defaults here
/// rather than LCMScheduler's scaled_linear 0.00085/0.012 (published LCM configs state them).
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    timestep_scaling: f32,
}

impl LcmScheduler {
    /// `LCMScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        config.validate()?;
        schedule::check_steps(steps, config)?;
        let t_train = config.num_train_timesteps;
        let original = config
            .original_inference_steps
            .unwrap_or(ORIGINAL_INFERENCE_STEPS);
        if original == 0 || original > t_train {
            return Err(SchedulerError::Config {
                field: "original_inference_steps".into(),
                message: format!(
                    "{original} must be between 1 and num_train_timesteps ({t_train})"
                ),
            });
        }
        if steps > original {
            return Err(SchedulerError::Option {
                option: "steps".into(),
                message: format!(
                    "lcm takes at most original_inference_steps ({original}) steps, got {steps}"
                ),
            });
        }
        let alphas_cumprod: Vec<f32> = schedule::alphas_cumprod(&schedule::betas(config))
            .into_iter()
            .map(|a| a as f32)
            .collect();
        // LCMScheduler's default for set_alpha_to_one is true.
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        // set_timesteps: the distillation schedule k·i − 1 (i = 1..=original, k = T // original),
        // reversed, sampled at floor(linspace(0, len, steps, endpoint=False)).
        let k = (t_train / original) as i64;
        let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k - 1).collect();
        let stride = origin.len() as f64 / steps as f64;
        let timesteps: Vec<i64> = (0..steps)
            .map(|i| origin[(i as f64 * stride).floor() as usize])
            .collect();
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_f32: timesteps.iter().map(|t| *t as f32).collect(),
            timesteps,
            prediction_type: config.prediction_type,
            // LCMScheduler's default for clip_sample is false.
            clip_sample: config
                .clip_sample
                .unwrap_or(false)
                .then_some(config.clip_sample_range as f32),
            timestep_scaling: config.timestep_scaling.unwrap_or(TIMESTEP_SCALING) as f32,
        })
    }
}

impl Scheduler for LcmScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32> {
        // LCMScheduler.add_noise: √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε.
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
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let last = step + 1 == self.timesteps.len();
        let alpha_prod_t_prev = match self.timesteps.get(step + 1) {
            Some(prev_t) if *prev_t >= 0 => self.alphas_cumprod[*prev_t as usize],
            Some(_) => self.final_alpha_cumprod,
            // The last step returns the denoised sample; ᾱ_prev is unused.
            None => alpha_prod_t,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        // get_scalings_for_boundary_condition_discrete (LCM eq. 9): c_skip, c_out at t·scaling,
        // in float32 like the tensor arithmetic on the int64 timestep.
        let scaled = t as f32 * self.timestep_scaling;
        let sd2 = SIGMA_DATA * SIGMA_DATA;
        let c_skip = sd2 / (scaled * scaled + sd2);
        let c_out = scaled / (scaled * scaled + sd2).sqrt();
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        let denoised: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let x0 = predicted_x0(self.prediction_type, x, m, sqrt_a, sqrt_b);
                let x0 = match self.clip_sample {
                    Some(r) => x0.clamp(-r, r),
                    None => x0,
                };
                c_out * x0 + c_skip * x
            })
            .collect();
        if last {
            return Ok(denoised);
        }
        // Re-noise to the next timestep (LCM algorithm 3, line 6).
        let noise = rng.randn(denoised.len());
        let (sqrt_a_prev, sqrt_b_prev) = (alpha_prod_t_prev.sqrt(), beta_prod_t_prev.sqrt());
        Ok(denoised
            .iter()
            .zip(noise)
            .map(|(d, n)| sqrt_a_prev * d + sqrt_b_prev * n)
            .collect())
    }
}

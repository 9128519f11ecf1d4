//! PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical Methods
//! for Diffusion Models on Manifolds", eq. 12 with the transfer φ of eq. 11), following
//! diffusers 0.42.1 `scheduling_pndm.py::PNDMScheduler` with `skip_prk_steps=True` — the
//! configuration every Stable Diffusion 1.x checkpoint ships with.

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::{Scheduler, SchedulerError, add_noise_alpha, check_step_args, schedule};
use crate::rng::TorchGenerator;

/// PLMS keeps the last model outputs (`ets`) between calls, so steps must be taken in order.
/// Its schedule has `steps + 1` timesteps: the second U-Net call repeats the first step's
/// timestep to form a second-order start (the "pseudo improved Euler" warm-up).
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    /// `num_train_timesteps // num_inference_steps`.
    stride: i64,
    prediction_type: PredictionType,
    /// Past model outputs, oldest first (at most 4 used).
    ets: Vec<Vec<f32>>,
    /// The sample of step 0, reused by the warm-up step 1.
    cur_sample: Option<Vec<f32>>,
    counter: usize,
}

impl PndmScheduler {
    /// `PNDMScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        // PNDMScheduler has no rescale_betas_zero_snr parameter, so diffusers' from_config
        // drops it; do the same so a shared config samples identically.
        let config = &SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..config.clone()
        };
        config.validate()?;
        schedule::check_steps(steps, config)?;
        if !config.skip_prk_steps {
            return Err(SchedulerError::Config {
                field: "skip_prk_steps".into(),
                message: "false (diffusers' default when absent) is not supported: the pndm \
                          scheduler implements PLMS only (skip_prk_steps = true, as in Stable \
                          Diffusion's configs)"
                    .into(),
            });
        }
        if config.prediction_type == PredictionType::Sample {
            return Err(SchedulerError::Config {
                field: "prediction_type".into(),
                message: "\"sample\" is not supported by the pndm scheduler".into(),
            });
        }
        let alphas_cumprod: Vec<f32> = schedule::alphas_cumprod(&schedule::betas(config))
            .into_iter()
            .map(|a| a as f32)
            .collect();
        // PNDMScheduler's default for set_alpha_to_one is false.
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spacing = config.timestep_spacing_or(TimestepSpacing::Leading);
        // `_timesteps`, noisiest first; plms_timesteps repeats the second-noisiest one.
        let base = schedule::timesteps(config, spacing, steps);
        if let Some(t) = base
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
        let mut timesteps = Vec::with_capacity(steps + 1);
        timesteps.push(base[0]);
        if steps > 1 {
            timesteps.push(base[1]);
        }
        timesteps.extend_from_slice(&base[1..]);
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_f32: timesteps.iter().map(|t| *t as f32).collect(),
            timesteps,
            stride: (config.num_train_timesteps / steps) as i64,
            prediction_type: config.prediction_type,
            ets: Vec::new(),
            cur_sample: None,
            counter: 0,
        })
    }

    /// `_get_prev_sample`: the transfer φ(x_t, ε, t, t−δ) of PNDM eq. 11.
    fn prev_sample(&self, sample: &[f32], t: i64, prev_t: i64, eps: &[f32]) -> Vec<f32> {
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let (sqrt_a, sqrt_b) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let diff = alpha_prod_t_prev - alpha_prod_t;
        eps.iter()
            .zip(sample)
            .map(|(&e, &x)| {
                let e = match self.prediction_type {
                    PredictionType::VPrediction => sqrt_a * e + sqrt_b * x,
                    _ => e,
                };
                sample_coeff * x - diff * e / denom
            })
            .collect()
    }
}

impl Scheduler for PndmScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32> {
        // PNDMScheduler.add_noise: √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε.
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
        _rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_args(step, self.timesteps.len(), model_output, sample)?;
        if step != self.counter {
            return Err(SchedulerError::Option {
                option: "step".into(),
                message: format!(
                    "pndm is multistep: expected step {}, got {step}",
                    self.counter
                ),
            });
        }
        // step_plms.
        let mut t = self.timesteps[step];
        let mut prev_t = t - self.stride;
        if self.counter == 1 {
            // Warm-up: redo step 0's transition with the average of both outputs.
            prev_t = t;
            t += self.stride;
        } else {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.to_vec());
        }
        let n = self.ets.len();
        let e = |k: usize| &self.ets[n - k];
        // Adams-Bashforth combinations of PNDM eq. 12 (orders 1 to 4).
        let eps: Vec<f32> = match (n, self.counter) {
            (1, 0) => model_output.to_vec(),
            (1, _) => model_output
                .iter()
                .zip(e(1))
                .map(|(m, e1)| (m + e1) / 2.0)
                .collect(),
            (2, _) => e(1)
                .iter()
                .zip(e(2))
                .map(|(e1, e2)| (3.0 * e1 - e2) / 2.0)
                .collect(),
            (3, _) => (0..model_output.len())
                .map(|i| (23.0 * e(1)[i] - 16.0 * e(2)[i] + 5.0 * e(3)[i]) / 12.0)
                .collect(),
            _ => (0..model_output.len())
                .map(|i| {
                    (1.0 / 24.0)
                        * (55.0 * e(1)[i] - 59.0 * e(2)[i] + 37.0 * e(3)[i] - 9.0 * e(4)[i])
                })
                .collect(),
        };
        let base_sample = if self.counter == 1 {
            self.cur_sample.take().unwrap_or_else(|| sample.to_vec())
        } else {
            if self.counter == 0 {
                self.cur_sample = Some(sample.to_vec());
            }
            sample.to_vec()
        };
        let prev = self.prev_sample(&base_sample, t, prev_t, &eps);
        self.counter += 1;
        Ok(prev)
    }
}

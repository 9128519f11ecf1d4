//! Heun's second-order sampler (Karras et al. 2022, algorithm 1 with S_churn = 0), following
//! diffusers 0.42.1 `scheduling_heun_discrete.py::HeunDiscreteScheduler`.

use super::config::{InterpolationType, PredictionType, SchedulerConfig};
use super::euler_discrete::{pred_original_sample, v_coeffs};
use super::sigmas::SigmaSchedule;
use super::{Scheduler, SchedulerError, add_noise_sigma, check_step_args};
use crate::rng::TorchGenerator;

/// Each inference step but the first takes two U-Net calls (an Euler predictor at σ_i, then a
/// corrector at σ_{i+1}), so the schedule lists `2·steps − 1` timesteps, as diffusers does:
/// `[t_0, t_1, t_1, t_2, t_2, …]`. The predictor's state is kept between the two calls, so
/// steps must be taken in order.
///
/// diffusers' `HeunDiscreteScheduler` has no `rescale_betas_zero_snr` or `interpolation_type`
/// and defaults `beta_start`/`beta_end` to 0.00085/0.012; `from_config` ignores the first two,
/// and so do we. A config that omits the betas gets DDIM's defaults here (every published
/// Stable Diffusion config states them).
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    timesteps: Vec<f32>,
    /// σ per U-Net call, plus the final 0 (diffusers' interleaved `sigmas`).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    clip_sample: Option<f32>,
    /// Predictor state: (derivative, dt, sample) from the first-order half.
    predictor: Option<(Vec<f32>, f32, Vec<f32>)>,
    next_step: usize,
}

impl HeunDiscreteScheduler {
    /// `HeunDiscreteScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let config = &SchedulerConfig {
            rescale_betas_zero_snr: false,
            interpolation_type: InterpolationType::Linear,
            ..config.clone()
        };
        let base = SigmaSchedule::new(config, steps, "heun")?;
        // set_timesteps: sigmas = [σ_0, σ_1, σ_1, …, σ_{n−1}, σ_{n−1}, 0];
        // timesteps = [t_0, t_1, t_1, …, t_{n−1}, t_{n−1}].
        let n = base.timesteps.len();
        let mut sigmas = vec![base.sigmas[0]];
        let mut timesteps = vec![base.timesteps[0]];
        for i in 1..n {
            sigmas.extend([base.sigmas[i], base.sigmas[i]]);
            timesteps.extend([base.timesteps[i], base.timesteps[i]]);
        }
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma: base.init_noise_sigma,
            prediction_type: config.prediction_type,
            // HeunDiscreteScheduler's default for clip_sample is false.
            clip_sample: config
                .clip_sample
                .unwrap_or(false)
                .then_some(config.clip_sample_range as f32),
            predictor: None,
            next_step: 0,
        })
    }

    /// σ per U-Net call, plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for HeunDiscreteScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &[f32], step: usize) -> Vec<f32> {
        // x / √(σ² + 1) with the σ of this call (the corrector's is σ_{i+1}).
        let sigma = self.sigmas[step.min(self.sigmas.len() - 1)];
        let scale = (sigma * sigma + 1.0).sqrt();
        sample.iter().map(|x| x / scale).collect()
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32> {
        // HeunDiscreteScheduler.add_noise: x₀ + σ·ε.
        add_noise_sigma(original, noise, self.sigmas[step])
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        _rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_args(step, self.timesteps.len(), model_output, sample)?;
        if step != self.next_step {
            return Err(SchedulerError::Option {
                option: "step".into(),
                message: format!(
                    "heun is multistep: expected step {}, got {step}",
                    self.next_step
                ),
            });
        }
        self.next_step += 1;
        let clip = |x0: f32| match self.clip_sample {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        };
        match self.predictor.take() {
            // First order (Euler predictor): d = (x − x₀)/σ̂, x' = x + d·(σ_next − σ̂).
            None => {
                let sigma = self.sigmas[step];
                let sigma_next = self.sigmas[step + 1];
                let dt = sigma_next - sigma;
                let v = v_coeffs(sigma);
                let derivative: Vec<f32> = model_output
                    .iter()
                    .zip(sample)
                    .map(|(&m, &x)| {
                        let x0 = clip(pred_original_sample(self.prediction_type, sigma, m, x, v));
                        (x - x0) / sigma
                    })
                    .collect();
                let prev = sample
                    .iter()
                    .zip(&derivative)
                    .map(|(x, d)| x + d * dt)
                    .collect();
                // The last step lands on σ = 0 and has no corrector call.
                if sigma_next != 0.0 {
                    self.predictor = Some((derivative, dt, sample.to_vec()));
                }
                Ok(prev)
            }
            // Second order (trapezoidal corrector): average the derivatives at σ and σ_next,
            // then redo the step from the predictor's starting sample.
            Some((prev_derivative, dt, start)) => {
                let sigma_next = self.sigmas[step];
                let v = v_coeffs(sigma_next);
                Ok(model_output
                    .iter()
                    .zip(sample)
                    .zip(prev_derivative.iter().zip(&start))
                    .map(|((&m, &x), (&d_prev, &x_start))| {
                        let x0 = clip(pred_original_sample(
                            self.prediction_type,
                            sigma_next,
                            m,
                            x,
                            v,
                        ));
                        let d = (x - x0) / sigma_next;
                        let d = (d_prev + d) / 2.0;
                        x_start + d * dt
                    })
                    .collect())
            }
        }
    }
}

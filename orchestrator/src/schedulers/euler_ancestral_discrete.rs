//! Euler ancestral sampler (k-diffusion `sample_euler_ancestral`, η = 1), following diffusers
//! 0.42.1 `scheduling_euler_ancestral_discrete.py::EulerAncestralDiscreteScheduler`.

use super::config::{PredictionType, SchedulerConfig};
use super::euler_discrete::{pred_original_sample, v_coeffs};
use super::sigmas::SigmaSchedule;
use super::{Scheduler, SchedulerError, add_noise_sigma, check_step_args};
use crate::rng::TorchGenerator;

/// Each step goes deterministically down to σ_down and adds fresh noise of size σ_up, drawn from
/// the request's generator exactly where diffusers draws it (`randn_tensor` after the Euler
/// update), so a seed reproduces diffusers' image.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
}

impl EulerAncestralDiscreteScheduler {
    /// `EulerAncestralDiscreteScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        if config.prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError at the first step; fail at build instead.
            return Err(SchedulerError::Config {
                field: "prediction_type".into(),
                message: "\"sample\" is not supported by the euler_ancestral scheduler".into(),
            });
        }
        // The class has no use_karras_sigmas; from_config drops it, and so do we.
        let config = &SchedulerConfig {
            use_karras_sigmas: false,
            ..config.clone()
        };
        Ok(Self {
            schedule: SigmaSchedule::new(config, steps, "euler_ancestral")?,
            prediction_type: config.prediction_type,
        })
    }

    /// σ per step, plus the final target σ.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &[f32], step: usize) -> Vec<f32> {
        self.schedule.scale_model_input(sample, step)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.schedule.sigmas)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32> {
        // EulerAncestralDiscreteScheduler.add_noise: x₀ + σ·ε.
        add_noise_sigma(original, noise, self.schedule.sigmas[step])
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_args(step, self.schedule.timesteps.len(), model_output, sample)?;
        let sigma_from = self.schedule.sigmas[step];
        let sigma_to = self.schedule.sigmas[step + 1];
        // k-diffusion get_ancestral_step: σ_up = √(σ_to²(σ_from² − σ_to²)/σ_from²),
        // σ_down = √(σ_to² − σ_up²).
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma_from;
        let v = v_coeffs(sigma_from);
        let mut prev: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let x0 = pred_original_sample(self.prediction_type, sigma_from, m, x, v);
                let derivative = (x - x0) / sigma_from;
                x + derivative * dt
            })
            .collect();
        let noise = rng.randn(prev.len());
        for (p, n) in prev.iter_mut().zip(noise) {
            *p += n * sigma_up;
        }
        Ok(prev)
    }
}

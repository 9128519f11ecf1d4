//! Euler sampler (Karras et al. 2022, algorithm 2 with S_churn = 0), following diffusers 0.42.1
//! `scheduling_euler_discrete.py::EulerDiscreteScheduler`.

use super::config::{PredictionType, SchedulerConfig};
use super::sigmas::SigmaSchedule;
use super::{Scheduler, SchedulerError, add_noise_sigma, check_step_args};
use crate::rng::TorchGenerator;

/// Deterministic first-order sampler on the σ schedule. diffusers' `s_churn` (stochastic
/// churn) defaults to 0 and the pipelines never set it, so it is not offered.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
}

impl EulerDiscreteScheduler {
    /// `EulerDiscreteScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        Ok(Self {
            schedule: SigmaSchedule::new(config, steps, "euler")?,
            prediction_type: config.prediction_type,
        })
    }

    /// σ per step, plus the final target σ.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

/// The denoised estimate x₀ from the model output at noise level σ (`step`'s
/// `pred_original_sample`, all three prediction types).
pub(super) fn pred_original_sample(
    prediction_type: PredictionType,
    sigma: f32,
    model_output: f32,
    sample: f32,
    v_coeffs: (f32, f32),
) -> f32 {
    match prediction_type {
        PredictionType::Epsilon => sample - sigma * model_output,
        // model_output * (-σ/√(σ²+1)) + sample/(σ²+1).
        PredictionType::VPrediction => model_output * v_coeffs.0 + sample / v_coeffs.1,
        PredictionType::Sample => model_output,
    }
}

/// `(-σ/√(σ²+1), σ²+1)`, the v-prediction coefficients in diffusers' float32 order.
pub(super) fn v_coeffs(sigma: f32) -> (f32, f32) {
    let s2p1 = sigma * sigma + 1.0;
    (-sigma / s2p1.sqrt(), s2p1)
}

impl Scheduler for EulerDiscreteScheduler {
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
        // EulerDiscreteScheduler.add_noise: x₀ + σ·ε.
        add_noise_sigma(original, noise, self.schedule.sigmas[step])
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        _rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_args(step, self.schedule.timesteps.len(), model_output, sample)?;
        let sigma = self.schedule.sigmas[step];
        // σ̂ = σ·(γ + 1) with γ = 0.
        let sigma_hat = sigma;
        let dt = self.schedule.sigmas[step + 1] - sigma_hat;
        let v = v_coeffs(sigma);
        Ok(model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let x0 = pred_original_sample(self.prediction_type, sigma_hat, m, x, v);
                // Karras et al. 2022, eq. 5 / algorithm 2: d = (x − x₀)/σ̂, x ← x + d·(σ_next − σ̂).
                let derivative = (x - x0) / sigma_hat;
                x + derivative * dt
            })
            .collect())
    }
}

//! Linear multistep sampler (k-diffusion `sample_lms`, order 4), following diffusers 0.42.1
//! `scheduling_lms_discrete.py::LMSDiscreteScheduler`.

use super::config::{InterpolationType, PredictionType, SchedulerConfig};
use super::euler_discrete::{pred_original_sample, v_coeffs};
use super::sigmas::SigmaSchedule;
use super::{Scheduler, SchedulerError, add_noise_sigma, check_step_args};
use crate::rng::TorchGenerator;

/// The order diffusers' pipelines use (`step(..., order=4)` default).
const ORDER: usize = 4;

/// Adams–Bashforth in σ over the last (up to) four derivatives d = (x − x̂₀)/σ, with the
/// weights integrated from the Lagrange basis on the σ nodes. The derivative history is kept
/// between calls, so steps must be taken in order.
///
/// diffusers' class has no `rescale_betas_zero_snr`, `interpolation_type` or `clip_sample`;
/// `from_config` ignores them, and so do we.
#[derive(Debug, Clone)]
pub struct LmsDiscreteScheduler {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
    /// Newest last, at most [`ORDER`] entries.
    derivatives: Vec<Vec<f32>>,
    next_step: usize,
}

impl LmsDiscreteScheduler {
    /// `LMSDiscreteScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let config = &SchedulerConfig {
            rescale_betas_zero_snr: false,
            interpolation_type: InterpolationType::Linear,
            ..config.clone()
        };
        Ok(Self {
            schedule: SigmaSchedule::new(config, steps, "lms")?,
            prediction_type: config.prediction_type,
            derivatives: Vec::with_capacity(ORDER),
            next_step: 0,
        })
    }

    /// `get_lms_coefficient(order, t, current_order)`: ∫_{σ_t}^{σ_{t+1}} of the Lagrange basis
    /// polynomial that is 1 at σ_{t−current_order} and 0 at the other nodes σ_{t−k}, k < order.
    /// diffusers integrates it with `scipy.integrate.quad`; the integrand is a polynomial of
    /// degree < 4, which 4-point Gauss–Legendre integrates exactly, so we do that in f64.
    fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let s = |i: usize| f64::from(self.schedule.sigmas[i]);
        let basis = |tau: f64| {
            (0..order)
                .filter(|k| *k != current_order)
                .map(|k| (tau - s(t - k)) / (s(t - current_order) - s(t - k)))
                .product::<f64>()
        };
        // Gauss–Legendre nodes ±√(3/7 ∓ 2/7·√(6/5)) and weights (18 ± √30)/36 on [−1, 1].
        let r = (6.0f64 / 5.0).sqrt();
        let inner = (3.0 / 7.0 - 2.0 / 7.0 * r).sqrt();
        let outer = (3.0 / 7.0 + 2.0 / 7.0 * r).sqrt();
        let w_inner = (18.0 + 30f64.sqrt()) / 36.0;
        let w_outer = (18.0 - 30f64.sqrt()) / 36.0;
        let (a, b) = (s(t), s(t + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        half * [
            (inner, w_inner),
            (-inner, w_inner),
            (outer, w_outer),
            (-outer, w_outer),
        ]
        .iter()
        .map(|(x, w)| w * basis(mid + half * x))
        .sum::<f64>()
    }
}

impl Scheduler for LmsDiscreteScheduler {
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
        // LMSDiscreteScheduler.add_noise: x₀ + σ·ε.
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
        if step != self.next_step {
            return Err(SchedulerError::Option {
                option: "step".into(),
                message: format!(
                    "lms is multistep: expected step {}, got {step}",
                    self.next_step
                ),
            });
        }
        self.next_step += 1;
        let sigma = self.schedule.sigmas[step];
        let v = v_coeffs(sigma);
        let derivative: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| {
                let x0 = pred_original_sample(self.prediction_type, sigma, m, x, v);
                (x - x0) / sigma
            })
            .collect();
        if self.derivatives.len() == ORDER {
            self.derivatives.remove(0);
        }
        self.derivatives.push(derivative);
        let order = (step + 1).min(ORDER);
        // The coefficients multiply float32 tensors, so they act as f32.
        let coeffs: Vec<f32> = (0..order)
            .map(|c| self.lms_coefficient(order, step, c) as f32)
            .collect();
        // sample + sum(coeff * derivative for newest-first derivatives), summed left to right.
        let mut acc: Vec<f32> = vec![0.0; sample.len()];
        for (i, (c, d)) in coeffs.iter().zip(self.derivatives.iter().rev()).enumerate() {
            for (a, d) in acc.iter_mut().zip(d) {
                *a = if i == 0 { c * d } else { *a + c * d };
            }
        }
        Ok(sample.iter().zip(&acc).map(|(x, a)| x + a).collect())
    }
}

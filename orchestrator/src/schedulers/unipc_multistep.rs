//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), following
//! diffusers 0.42.1 `scheduling_unipc_multistep.py::UniPCMultistepScheduler` with its defaults:
//! `solver_order=2`, `solver_type="bh2"`, `predict_x0=True`, `lower_order_final=True`, the
//! corrector on every step, `final_sigmas_type="zero"`.

use super::config::{PredictionType, SchedulerConfig};
use super::dpmsolver_multistep::{alpha_sigma, lambda, multistep_schedule};
use super::schedule::predicted_x0;
use super::{Scheduler, SchedulerError, check_step_args};
use crate::rng::TorchGenerator;

/// `solver_order`.
const ORDER: usize = 2;

/// Each call first corrects the previous step's prediction with the new model output (UniC),
/// then predicts the next sample (UniP), both in the data-prediction (x₀) form. The last two
/// x₀ estimates, the uncorrected sample and the order used are kept between calls, so steps
/// must be taken in order.
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler {
    timesteps: Vec<f32>,
    /// σ per step plus the final 0.
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    /// x₀ estimates, oldest first, at most [`ORDER`] (`model_outputs`).
    model_outputs: Vec<Vec<f32>>,
    /// The sample the last predictor started from (`last_sample`).
    last_sample: Option<Vec<f32>>,
    /// The predictor order of the last step (`this_order`), which the corrector reuses.
    this_order: usize,
    lower_order_nums: usize,
    next_step: usize,
}

impl UniPcMultistepScheduler {
    /// `UniPCMultistepScheduler(**config)` followed by `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let (timesteps, sigmas) = multistep_schedule(config, steps, "unipc", false)?;
        Ok(Self {
            timesteps,
            sigmas,
            prediction_type: config.prediction_type,
            model_outputs: Vec::with_capacity(ORDER),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// (α, σ, λ) at step index `i`.
    fn at(&self, i: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = alpha_sigma(self.sigmas[i]);
        (alpha, sigma, lambda(alpha, sigma))
    }
}

/// The bh2 coefficient set of `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update`
/// (UniPC eq. 8 with B(h) = e^h − 1, in the x₀ form where hh = −h): returns (hφ₁, B(h), b).
fn bh2_coefficients(h: f32, order: usize) -> (f32, f32, Vec<f32>) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial_i = 1.0f32;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        b.push(h_phi_k * factorial_i / b_h);
        factorial_i *= (i + 1) as f32;
        h_phi_k = h_phi_k / hh - 1.0 / factorial_i;
    }
    (h_phi_1, b_h, b)
}

/// `torch.linalg.solve` of the 2×2 system [[1, 1], [r, 1]]·ρ = b (LU with partial pivoting,
/// as LAPACK's sgesv), in float32.
fn solve2(r: f32, b: &[f32]) -> [f32; 2] {
    // Rows (a0, a1 | rhs).
    let (mut p, mut q) = ([1.0f32, 1.0, b[0]], [r, 1.0, b[1]]);
    if r.abs() > 1.0 {
        std::mem::swap(&mut p, &mut q);
    }
    let l = q[0] / p[0];
    let u11 = q[1] - l * p[1];
    let y1 = q[2] - l * p[2];
    let x1 = y1 / u11;
    let x0 = (p[2] - p[1] * x1) / p[0];
    [x0, x1]
}

impl Scheduler for UniPcMultistepScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32> {
        // UniPCMultistepScheduler.add_noise: α_t·x₀ + σ_t·ε with (α_t, σ_t) from the VE σ.
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step]);
        original
            .iter()
            .zip(noise)
            .map(|(x, n)| alpha_t * x + sigma_t * n)
            .collect()
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
                    "unipc is multistep: expected step {}, got {step}",
                    self.next_step
                ),
            });
        }
        self.next_step += 1;

        // convert_model_output (predict_x0): the data prediction x₀.
        let (alpha_s, sigma_s, _) = self.at(step);
        let x0: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| predicted_x0(self.prediction_type, x, m, alpha_s, sigma_s))
            .collect();

        // UniC (multistep_uni_c_bh_update): correct the sample the last predictor produced,
        // using this step's x₀ as the new node.
        let sample: Vec<f32> = match &self.last_sample {
            Some(last_sample) if step > 0 => {
                let order = self.this_order;
                let (alpha_t, sigma_t, lambda_t) = self.at(step);
                let (_, sigma_s0, lambda_s0) = self.at(step - 1);
                let h = lambda_t - lambda_s0;
                let (h_phi_1, b_h, b) = bh2_coefficients(h, order);
                let m0 = &self.model_outputs[self.model_outputs.len() - 1];
                // Order 2: one earlier node, rk = (λ_{s1} − λ_{s0})/h, D1 = (m1 − m0)/rk.
                let (rhos, d1): (Vec<f32>, Option<(f32, &Vec<f32>)>) = if order == 1 {
                    (vec![0.5], None)
                } else {
                    let (_, _, lambda_s1) = self.at(step - 2);
                    let rk = (lambda_s1 - lambda_s0) / h;
                    let m1 = &self.model_outputs[self.model_outputs.len() - 2];
                    (solve2(rk, &b).to_vec(), Some((rk, m1)))
                };
                let c_x = sigma_t / sigma_s0;
                let c_m0 = alpha_t * h_phi_1;
                let c_res = alpha_t * b_h;
                let rho_t = rhos[rhos.len() - 1];
                (0..sample.len())
                    .map(|i| {
                        let x_t_ = c_x * last_sample[i] - c_m0 * m0[i];
                        let d1_t = x0[i] - m0[i];
                        let inner = match d1 {
                            Some((rk, m1)) => rhos[0] * ((m1[i] - m0[i]) / rk) + rho_t * d1_t,
                            None => rho_t * d1_t,
                        };
                        x_t_ - c_res * inner
                    })
                    .collect()
            }
            _ => sample.to_vec(),
        };

        if self.model_outputs.len() == ORDER {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0);
        // lower_order_final: first order on the last step; warm-up: at most one order more
        // than the steps taken.
        let this_order = ORDER
            .min(self.timesteps.len() - step)
            .min(self.lower_order_nums + 1);
        self.this_order = this_order;

        // UniP (multistep_uni_p_bh_update).
        let (alpha_t, sigma_t, lambda_t) = self.at(step + 1);
        let (_, sigma_s0, lambda_s0) = self.at(step);
        let h = lambda_t - lambda_s0;
        let (h_phi_1, b_h, _) = bh2_coefficients(h, this_order);
        let m0 = &self.model_outputs[self.model_outputs.len() - 1];
        let c_x = sigma_t / sigma_s0;
        let c_m0 = alpha_t * h_phi_1;
        let c_res = alpha_t * b_h;
        let prev: Vec<f32> = if this_order == 2 {
            // rhos_p = [0.5] for order 2.
            let (_, _, lambda_s1) = self.at(step - 1);
            let rk = (lambda_s1 - lambda_s0) / h;
            let m1 = &self.model_outputs[self.model_outputs.len() - 2];
            (0..sample.len())
                .map(|i| {
                    let x_t_ = c_x * sample[i] - c_m0 * m0[i];
                    let pred_res = 0.5 * ((m1[i] - m0[i]) / rk);
                    x_t_ - c_res * pred_res
                })
                .collect()
        } else {
            (0..sample.len())
                .map(|i| c_x * sample[i] - c_m0 * m0[i])
                .collect()
        };
        if self.lower_order_nums < ORDER {
            self.lower_order_nums += 1;
        }
        self.last_sample = Some(sample);
        Ok(prev)
    }
}

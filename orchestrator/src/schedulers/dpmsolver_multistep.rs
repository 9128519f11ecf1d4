//! DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2, midpoint form), following
//! diffusers 0.42.1 `scheduling_dpmsolver_multistep.py::DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"` and
//! `final_sigmas_type="zero"` — the sampler UIs call "DPM++ 2M" — and, with
//! `algorithm_type="sde-dpmsolver++"`, "DPM++ 2M SDE" (Lu et al. 2022, section 5 / appendix).

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::predicted_x0;
use super::sigmas::{karras_sigmas, log_sigmas, sigma_to_t};
use super::{Scheduler, SchedulerError, check_step_args, schedule};
use crate::rng::TorchGenerator;

/// The name fixes the algorithm (data prediction, second order, midpoint), whatever solver
/// fields the model's `scheduler_config.json` carries, just as choosing "DPM++ 2M" does in
/// sampler UIs. Second order needs the previous step's x₀ estimate, kept between calls, so
/// steps must be taken in order.
/// diffusers' `algorithm_type`, restricted to the two data-prediction solvers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `"dpmsolver++"`: deterministic (DPM++ 2M).
    DpmSolverPlusPlus,
    /// `"sde-dpmsolver++"`: adds √(1 − e^(−2h))·σ_t noise each step (DPM++ 2M SDE).
    SdeDpmSolverPlusPlus,
}

#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    algorithm: Algorithm,
    timesteps: Vec<f32>,
    /// σ per step plus the final 0.
    sigmas: Vec<f32>,
    prediction_type: PredictionType,
    /// x₀ estimate of the previous step (`model_outputs[-2]` in diffusers).
    previous_x0: Option<Vec<f32>>,
    /// The step index the next call must have: the multistep history is only valid in order.
    next_step: usize,
}

impl DpmSolverMultistepScheduler {
    /// `DPMSolverMultistepScheduler(**config, algorithm_type=...)` followed by
    /// `set_timesteps(steps)`.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        algorithm: Algorithm,
    ) -> Result<Self, SchedulerError> {
        let name = match algorithm {
            Algorithm::DpmSolverPlusPlus => "dpmpp_2m",
            Algorithm::SdeDpmSolverPlusPlus => "dpmpp_2m_sde",
        };
        let (timesteps, sigmas) = multistep_schedule(config, steps, name, true)?;
        Ok(Self {
            algorithm,
            timesteps,
            sigmas,
            prediction_type: config.prediction_type,
            previous_x0: None,
            next_step: 0,
        })
    }

    /// σ per step, plus the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// Timesteps and σ (plus the final 0) of `DPMSolverMultistepScheduler.set_timesteps` and
/// `UniPCMultistepScheduler.set_timesteps` (identical but for `cosine_unrounded`: DPM-Solver
/// leaves Karras timesteps of the cosine schedule unrounded). `name` names the caller in errors.
pub(super) fn multistep_schedule(
    config: &SchedulerConfig,
    steps: usize,
    name: &str,
    cosine_unrounded: bool,
) -> Result<(Vec<f32>, Vec<f32>), SchedulerError> {
    config.validate()?;
    schedule::check_steps(steps, config)?;
    if let Some((field, value)) = config.unsupported_sigma_options.first() {
        return Err(SchedulerError::Config {
            field: field.clone(),
            message: format!("{value} is not supported by the {name} scheduler"),
        });
    }
    let mut alphas_cumprod: Vec<f32> = schedule::alphas_cumprod(&schedule::betas(config))
        .into_iter()
        .map(|a| a as f32)
        .collect();
    if config.rescale_betas_zero_snr
        && let Some(last) = alphas_cumprod.last_mut()
    {
        // As in __init__: keep σ_T finite.
        *last = 2f32.powi(-24);
    }
    let t_train = config.num_train_timesteps;
    let spacing = config.timestep_spacing_or(TimestepSpacing::Linspace);
    // set_timesteps with lambda_min_clipped = -inf (so last_timestep = T): n + 1 points with
    // the final (t = 0) one dropped, except for trailing spacing.
    let timesteps: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => {
            let step = (t_train - 1) as f64 / steps as f64;
            (1..=steps)
                .rev()
                .map(|i| {
                    let v = if i == steps {
                        (t_train - 1) as f64
                    } else {
                        step * i as f64
                    };
                    v.round_ties_even() as i64
                })
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = (t_train / (steps + 1)) as i64;
            (1..=steps as i64)
                .rev()
                .map(|i| i * ratio + config.steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => schedule::timesteps(config, spacing, steps),
    };
    if let Some(t) = timesteps
        .iter()
        .find(|t| **t < 0 || **t as usize >= t_train)
    {
        return Err(SchedulerError::Config {
            field: "steps_offset".into(),
            message: format!(
                "{} puts timestep {t} outside [0, {t_train})",
                config.steps_offset
            ),
        });
    }
    // σ_t = √((1 − ᾱ_t)/ᾱ_t) in float32, like diffusers' torch expression.
    let train_sigmas: Vec<f32> = alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect();
    let (timesteps, mut sigmas): (Vec<f32>, Vec<f32>) = if config.use_karras_sigmas {
        // set_timesteps' use_karras_sigmas branch: Karras σ between the training σ_min and
        // σ_max, timesteps read back with _sigma_to_t and rounded (DPM-Solver truncates
        // them to int64 for the cosine schedule, which it leaves unrounded).
        let log_sigmas = log_sigmas(&train_sigmas);
        let karras = karras_sigmas(
            f64::from(train_sigmas[0]),
            f64::from(train_sigmas[t_train - 1]),
            steps,
        );
        let cosine = cosine_unrounded && config.beta_schedule == BetaSchedule::SquaredCosCapV2;
        let ts = karras
            .iter()
            .map(|s| {
                let t = sigma_to_t(*s, &log_sigmas);
                (if cosine {
                    t.trunc()
                } else {
                    t.round_ties_even()
                }) as f32
            })
            .collect();
        (ts, karras.iter().map(|s| *s as f32).collect())
    } else {
        // np.interp at integer timesteps reads the training σ_t exactly.
        let sigmas = timesteps
            .iter()
            .map(|t| train_sigmas[*t as usize])
            .collect();
        (timesteps.iter().map(|t| *t as f32).collect(), sigmas)
    };
    sigmas.push(0.0);
    Ok((timesteps, sigmas))
}

/// `_sigma_to_alpha_sigma_t`: (α_t, σ_t) of the VP process from the VE σ:
/// α_t = 1/√(σ²+1), σ_t = σ·α_t.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α_t − log σ_t, the half log-SNR DPM-Solver steps in.
pub(super) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], step: usize) -> Vec<f32> {
        // DPMSolverMultistepScheduler.add_noise: α_t·x₀ + σ_t·ε with (α_t, σ_t) from the VE σ.
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
        rng: &mut TorchGenerator,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step_args(step, self.timesteps.len(), model_output, sample)?;
        if step != self.next_step {
            return Err(SchedulerError::Option {
                option: "step".into(),
                message: format!(
                    "{} is multistep: expected step {}, got {step}",
                    match self.algorithm {
                        Algorithm::DpmSolverPlusPlus => "dpmpp_2m",
                        Algorithm::SdeDpmSolverPlusPlus => "dpmpp_2m_sde",
                    },
                    self.next_step
                ),
            });
        }
        // convert_model_output (dpmsolver++): the data prediction x₀.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let x0: Vec<f32> = model_output
            .iter()
            .zip(sample)
            .map(|(&m, &x)| predicted_x0(self.prediction_type, x, m, alpha_s0, sigma_s0))
            .collect();

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let last = step == self.timesteps.len() - 1;
        let first_order = self.previous_x0.is_none() || last;
        // The second-order correction D1 = (m0 − m1)/r0 with r0 = h_0/h
        // (multistep_dpm_solver_second_order_update); zero on first-order steps.
        let d1: Vec<f32> = match (&self.previous_x0, first_order) {
            (Some(m1), false) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
                let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let inv_r0 = 1.0 / (h_0 / h);
                x0.iter()
                    .zip(m1)
                    .map(|(d0, m1)| inv_r0 * (d0 - m1))
                    .collect()
            }
            _ => Vec::new(),
        };
        let prev: Vec<f32> = match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                let c_sample = sigma_t / sigma_s0;
                let c_d = alpha_t * ((-h).exp() - 1.0);
                if first_order {
                    // dpm_solver_first_order_update (DPM-Solver++ eq. 13 with k = 1): on the
                    // first step, and on the last, which lands on σ = 0 (final_sigmas_type zero).
                    x0.iter()
                        .zip(sample)
                        .map(|(&d0, &x)| c_sample * x - c_d * d0)
                        .collect()
                } else {
                    // multistep_dpm_solver_second_order_update, dpmsolver++ midpoint.
                    let half_c_d = 0.5 * c_d;
                    x0.iter()
                        .zip(&d1)
                        .zip(sample)
                        .map(|((&d0, &d1), &x)| c_sample * x - c_d * d0 - half_c_d * d1)
                        .collect()
                }
            }
            Algorithm::SdeDpmSolverPlusPlus => {
                // The step's noise is drawn before the update, every step, as diffusers' step
                // does (randn_tensor(model_output.shape, generator)).
                let noise = rng.randn(sample.len());
                let c_sample = sigma_t / sigma_s0 * (-h).exp();
                let c_d = alpha_t * (1.0 - (-2.0 * h).exp());
                let c_noise = sigma_t * (1.0 - (-2.0 * h).exp()).sqrt();
                if first_order {
                    // dpm_solver_first_order_update, sde-dpmsolver++.
                    x0.iter()
                        .zip(sample)
                        .zip(&noise)
                        .map(|((&d0, &x), &n)| c_sample * x + c_d * d0 + c_noise * n)
                        .collect()
                } else {
                    // multistep_dpm_solver_second_order_update, sde-dpmsolver++ midpoint.
                    let half_c_d = 0.5 * c_d;
                    x0.iter()
                        .zip(&d1)
                        .zip(sample.iter().zip(&noise))
                        .map(|((&d0, &d1), (&x, &n))| {
                            c_sample * x + c_d * d0 + half_c_d * d1 + c_noise * n
                        })
                        .collect()
                }
            }
        };
        self.previous_x0 = Some(x0);
        self.next_step = step + 1;
        Ok(prev)
    }
}

//! Noise-schedule math shared by the schedulers: training betas and ᾱ (alphas_cumprod), and
//! the choice of inference timesteps.
//!
//! diffusers keeps the training tables in torch float32, so they are reproduced value for value
//! here: torch's CPU `linspace` (a float32 step, each value computed in double and rounded),
//! squaring and `1 - β` in float32, and `cumprod` accumulated in double and rounded per element
//! (torch's CPU accumulate type for float). The results are stored as f64 holding those exact
//! float32 values; everything downstream is f64.

use super::SchedulerError;
use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

/// The training betas, including `rescale_betas_zero_snr` when configured.
pub fn betas(config: &SchedulerConfig) -> Vec<f64> {
    let t = config.num_train_timesteps;
    let betas = if let Some(trained) = &config.trained_betas {
        trained.iter().map(|&b| to_f32(b)).collect()
    } else {
        match config.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, t),
            // scheduling_ddim.__init__: linspace(beta_start**0.5, beta_end**0.5, T) ** 2.
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), t)
                    .into_iter()
                    .map(|b| {
                        let b = b as f32;
                        f64::from(b * b)
                    })
                    .collect()
            }
            // betas_for_alpha_bar computes in Python floats, then torch.tensor(float32).
            BetaSchedule::SquaredCosCapV2 => betas_for_alpha_bar_cosine(t, 0.999)
                .into_iter()
                .map(to_f32)
                .collect(),
        }
    };
    if config.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    }
}

/// The data prediction x₀ from a model output `m` at sample `x`, where the noised sample is
/// `x = alpha·x₀ + sigma·ε` (alpha = √ᾱ, sigma = √(1 − ᾱ) in the DDPM parametrisation): the
/// `pred_original_sample` / `convert_model_output` formula the schedulers share (DDPM eq. 15 for
/// ε; Salimans & Ho 2022 for v).
pub fn predicted_x0(prediction: PredictionType, x: f32, m: f32, alpha: f32, sigma: f32) -> f32 {
    match prediction {
        PredictionType::Epsilon => (x - sigma * m) / alpha,
        PredictionType::VPrediction => alpha * x - sigma * m,
        PredictionType::Sample => m,
    }
}

/// Rounds to float32 (the dtype of diffusers' tables), kept as f64.
fn to_f32(x: f64) -> f64 {
    f64::from(x as f32)
}

/// torch's CPU `torch.linspace(start, end, n, dtype=float32)`: the endpoints and the step
/// rounded to float32, each value `start + step * i` (first half) or `end - step * (n-1-i)`
/// (second half) computed in double and rounded to float32. Checked value for value against
/// torch 2.11 by `tests/scheduler_parity.rs` through the schedules built on it.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f64> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![f64::from(s)];
    }
    let step = f64::from((e - s) / (n - 1) as f32);
    let half = n / 2;
    (0..n)
        .map(|i| {
            let v = if i < half {
                f64::from(s) + step * i as f64
            } else {
                f64::from(e) - step * (n - 1 - i) as f64
            };
            to_f32(v)
        })
        .collect()
}

/// ᾱ_t = Π_{s<=t} (1 − β_s) (DDPM, Ho et al. 2020, eq. 4 notation), as torch computes it on
/// float32 tensors: `1 - β` in float32, the running product in double, each ᾱ rounded to
/// float32.
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    betas
        .iter()
        .scan(1.0f64, |acc, &b| {
            *acc *= f64::from(1.0f32 - b as f32);
            Some(to_f32(*acc))
        })
        .collect()
}

/// `np.linspace(start, end, n)` / `torch.linspace` (endpoint included).
pub(super) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i == n - 1 {
                end
            } else {
                start + step * i as f64
            }
        })
        .collect()
}

/// `betas_for_alpha_bar(T, max_beta, "cosine")`: β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), max_beta)
/// with ᾱ(t) = cos²((t + 0.008)/1.008 · π/2) (Nichol & Dhariwal 2021, eq. 17).
fn betas_for_alpha_bar_cosine(t: usize, max_beta: f64) -> Vec<f64> {
    let alpha_bar = |x: f64| {
        ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..t)
        .map(|i| {
            let t1 = i as f64 / t as f64;
            let t2 = (i + 1) as f64 / t as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta)
        })
        .collect()
}

/// `rescale_zero_terminal_snr` (Lin et al. 2023, algorithm 1): shift and scale √ᾱ so that the
/// last timestep has zero signal while the first keeps its value. In float32, operation for
/// operation as diffusers runs it on torch tensors.
///
/// One operation differs: torch's CPU `sqrt` (and `** 0.5`) on a float32 tensor calls MKL's
/// `vmsSqrt(.., VML_HA)`, which is not correctly rounded (errors up to 0.75 ulp; with torch
/// 2.11's MKL on the reference AMD EPYC, 17% of all float32 inputs in [1, 4) come out one ulp
/// off, and 182 of SD's 1000 √ᾱ), while `f32::sqrt` is. MKL's algorithm is closed (none of the
/// usual rsqrt + Newton/FMA-correction schemes reproduces it) and may differ with the CPU and
/// MKL version, so it is not emulated. Fed torch's √ᾱ values, the rest of this function and the
/// cumprod after it give diffusers' ᾱ bit for bit; with `f32::sqrt`, the shift √ᾱ − √ᾱ_T
/// amplifies those ulps near t = T (ᾱ up to 3.8e-6 relative off there, 7.5e-7 under the
/// parity test's 1e-3 floor) and σ = √((1 − ᾱ)/ᾱ) amplifies ᾱ's one-ulp errors near t = 0
/// by ᾱ/(2(1 − ᾱ)) ≈ 26 (σ at t = 19 is 3.2e-6 relative off). See `tests/scheduler_parity.rs`.
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut sqrt_ac: Vec<f32> = alphas_cumprod(betas)
        .iter()
        .map(|&a| (a as f32).sqrt())
        .collect();
    let first = sqrt_ac[0];
    let last = sqrt_ac[sqrt_ac.len() - 1];
    let scale = first / (first - last);
    for s in &mut sqrt_ac {
        *s -= last;
        *s *= scale;
    }
    let alphas_bar: Vec<f32> = sqrt_ac.iter().map(|s| s * s).collect();
    // Undo the cumulative product: α_0 = ᾱ_0, α_t = ᾱ_t / ᾱ_{t-1}; β = 1 − α.
    let mut out = Vec::with_capacity(alphas_bar.len());
    out.push(f64::from(1.0f32 - alphas_bar[0]));
    out.extend(
        alphas_bar
            .windows(2)
            .map(|w| f64::from(1.0f32 - w[1] / w[0])),
    );
    out
}

/// Checks `1 <= steps <= num_train_timesteps`, the range diffusers' `set_timesteps` accepts.
pub fn check_steps(steps: usize, config: &SchedulerConfig) -> Result<(), SchedulerError> {
    if steps == 0 || steps > config.num_train_timesteps {
        return Err(SchedulerError::Steps {
            steps,
            max: config.num_train_timesteps,
        });
    }
    Ok(())
}

/// Integer inference timesteps, noisiest first, as `DDIMScheduler.set_timesteps` (and the other
/// discrete schedulers) computes them with numpy.
///
/// One deliberate difference: for `trailing`, diffusers' `np.arange(T, 0, -T/n)` returns n + 1
/// values for some n (61, 103, 121, ... with T = 1000) because of float rounding, the extra one
/// being timestep -1. We always return exactly `steps` timesteps, which equal diffusers' first n.
pub fn timesteps(config: &SchedulerConfig, spacing: TimestepSpacing, steps: usize) -> Vec<i64> {
    let t = config.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (t - 1) as f64, steps)
            .iter()
            .rev()
            .map(|v| v.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (t / steps) as i64;
            (0..steps as i64)
                .rev()
                .map(|i| i * ratio + config.steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            // np.arange(T, 0, -ratio) fills start + i * delta with delta = (start + step) - start.
            let start = t as f64;
            let delta = (start - t as f64 / steps as f64) - start;
            (0..steps)
                .map(|i| (start + i as f64 * delta).round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

/// Float inference timesteps of the sigma schedulers (`EulerDiscreteScheduler.set_timesteps`):
/// like [`timesteps`] except that `linspace` is not rounded (diffusers keeps
/// `np.linspace(..., dtype=float32)` as is, so 50 steps give 999, 978.61224, ...).
pub fn timesteps_f32(config: &SchedulerConfig, spacing: TimestepSpacing, steps: usize) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (config.num_train_timesteps - 1) as f64, steps)
            .iter()
            .rev()
            .map(|v| *v as f32)
            .collect(),
        TimestepSpacing::Leading | TimestepSpacing::Trailing => timesteps(config, spacing, steps)
            .iter()
            .map(|t| *t as f32)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_spacing_matches_sd15_ddim() {
        let config = SchedulerConfig {
            steps_offset: 1,
            ..SchedulerConfig::default()
        };
        let ts = timesteps(&config, TimestepSpacing::Leading, 10);
        assert_eq!(ts, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    }

    #[test]
    fn trailing_spacing_starts_at_the_last_training_step() {
        let ts = timesteps(&SchedulerConfig::default(), TimestepSpacing::Trailing, 61);
        assert_eq!(ts.len(), 61);
        assert_eq!(ts[0], 999);
        assert!(ts.iter().all(|t| *t >= 0));
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_signal() {
        let config = SchedulerConfig {
            rescale_betas_zero_snr: true,
            ..SchedulerConfig::default()
        };
        let ac = alphas_cumprod(&betas(&config));
        assert_eq!(ac[ac.len() - 1], 0.0);
    }
}

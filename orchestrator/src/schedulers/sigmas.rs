//! The σ (noise-level) schedule shared by the k-diffusion style samplers (Euler, Euler
//! ancestral, Heun, LMS), with optional Karras spacing, following `EulerDiscreteScheduler.__init__` / `set_timesteps` in diffusers 0.42.1.
//!
//! These samplers work on x = x₀ + σ·ε (Karras et al. 2022, "Elucidating the Design Space",
//! eq. 1 with s(t) = 1), where σ_t = √((1 − ᾱ_t)/ᾱ_t); the U-Net still expects the DDPM scaling,
//! hence `scale_model_input` divides by √(σ² + 1).

use super::config::{InterpolationType, SchedulerConfig, TimestepSpacing};
use super::{SchedulerError, schedule};

/// Inference timesteps and their sigmas (one more sigma than timesteps: the last is the target
/// of the final step).
#[derive(Debug, Clone)]
pub struct SigmaSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

impl SigmaSchedule {
    /// Builds the schedule; `scheduler` names the caller in errors.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        scheduler: &str,
    ) -> Result<Self, SchedulerError> {
        config.validate()?;
        schedule::check_steps(steps, config)?;
        if let Some((field, value)) = config.unsupported_sigma_options.first() {
            return Err(SchedulerError::Config {
                field: field.clone(),
                message: format!("{value} is not supported by the {scheduler} scheduler"),
            });
        }
        let mut alphas_cumprod: Vec<f32> = schedule::alphas_cumprod(&schedule::betas(config))
            .into_iter()
            .map(|a| a as f32)
            .collect();
        if config.rescale_betas_zero_snr {
            // EulerDiscreteScheduler.__init__: ᾱ_T = 2^-24 instead of 0, so σ_T stays finite.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        // σ_t = √((1 − ᾱ_t)/ᾱ_t), computed in float32 like diffusers' torch expression. torch's
        // `** 0.5` is MKL's sqrt, which is not correctly rounded (see
        // `schedule::rescale_zero_terminal_snr`), so σ can be one ulp off: σ_T = √(2^24 − 1) is
        // 4095.9998 here (correctly rounded) and 4096.0 in diffusers.
        let train_sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();

        let spacing = config.timestep_spacing_or(TimestepSpacing::Linspace);
        let mut timesteps = schedule::timesteps_f32(config, spacing, steps);
        // numpy keeps these in f64 until the final cast; Karras spacing reads its ends from them.
        let in_sigmas: Vec<f64> = match config.interpolation_type {
            InterpolationType::Linear => timesteps
                .iter()
                .map(|t| interp(f64::from(*t), &train_sigmas))
                .collect(),
            // set_timesteps' log_linear branch: n + 1 log-uniform sigmas from σ_max down to
            // σ_min; with the final 0 appended the last one is never reached, as in diffusers.
            InterpolationType::LogLinear => {
                let hi = f64::from(train_sigmas[train_sigmas.len() - 1]).ln();
                let lo = f64::from(train_sigmas[0]).ln();
                (0..=steps)
                    .map(|i| f64::from((hi + (lo - hi) * i as f64 / steps as f64).exp() as f32))
                    .collect()
            }
        };
        let mut sigmas: Vec<f32> = if config.use_karras_sigmas {
            let log_sigmas = log_sigmas(&train_sigmas);
            let karras = karras_sigmas(in_sigmas[in_sigmas.len() - 1], in_sigmas[0], steps);
            timesteps = karras
                .iter()
                .map(|s| sigma_to_t(*s, &log_sigmas) as f32)
                .collect();
            karras.iter().map(|s| *s as f32).collect()
        } else {
            in_sigmas.iter().map(|s| *s as f32).collect()
        };
        sigmas.push(0.0);

        let max_sigma = sigmas.iter().copied().fold(0.0f32, f32::max);
        // EulerDiscreteScheduler.init_noise_sigma: leading spacing never reaches σ_max's
        // timestep, so the initial latents get the variance-preserving σ·√(1 + 1/σ²).
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    /// `scale_model_input`: x / √(σ² + 1), the DDPM-scaled input the U-Net was trained on.
    pub fn scale_model_input(&self, sample: &[f32], step: usize) -> Vec<f32> {
        let sigma = self.sigmas[step.min(self.sigmas.len() - 1)];
        let scale = (sigma * sigma + 1.0).sqrt();
        sample.iter().map(|x| x / scale).collect()
    }
}

/// `np.log(sigmas)` of the float32 training σ table (float32, as numpy keeps it).
pub(super) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas
        .iter()
        .map(|s| f64::from(*s).ln() as f32)
        .collect()
}

/// `_convert_to_karras`: n sigmas with σ^(1/ρ) evenly spaced from σ_max to σ_min, ρ = 7
/// (Karras et al. 2022, eq. 5), in f64 like numpy.
pub(super) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    schedule::linspace(0.0, 1.0, n)
        .iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// `_sigma_to_t`: the fractional training timestep whose σ is `sigma`, interpolating linearly in
/// log σ between the two bracketing training steps (clamped to the table's range).
pub(super) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // cumsum(dists >= 0).argmax(): the last index whose log σ is <= log_sigma (0 if none).
    let low_idx = log_sigmas
        .iter()
        .rposition(|l| log_sigma - f64::from(*l) >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = f64::from(log_sigmas[low_idx]);
    let high = f64::from(log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `np.interp(x, arange(len(fp)), fp)`: piecewise-linear in f64, clamped at both ends.
fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    // numpy's compiled interp: slope * (x - xp[j]) + fp[j].
    (y1 - y0) * (x - j as f64) + y0
}

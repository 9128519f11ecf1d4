//! Forward diffusion under the model's training noise schedule: what the U-Net learns to undo.

use tch::{Device, Tensor};

/// `ᾱ_t` for t = 0..T of SD's scaled-linear schedule, as the exported scheduler config
/// describes it (`beta_start`, `beta_end`, `num_train_timesteps`).
#[derive(Debug)]
pub struct NoiseSchedule {
    alphas_cumprod: Tensor,
}

impl NoiseSchedule {
    /// Scaled-linear betas, `linspace(√β_start, √β_end, T)²`, and their cumulative product
    /// of `1 - β`, computed in f64 and kept as f32 on `device`.
    pub fn scaled_linear(beta_start: f64, beta_end: f64, steps: usize, device: Device) -> Self {
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let last = (steps.max(2) - 1) as f64;
        let mut product = 1.0;
        let alphas_cumprod: Vec<f32> = (0..steps)
            .map(|i| {
                let beta = (a + (b - a) * i as f64 / last).powi(2);
                product *= 1.0 - beta;
                product as f32
            })
            .collect();
        Self {
            alphas_cumprod: Tensor::from_slice(&alphas_cumprod).to_device(device),
        }
    }

    /// The number of training timesteps.
    pub fn steps(&self) -> i64 {
        self.alphas_cumprod.size()[0]
    }

    /// Loss weights `[B]` for the epsilon MSE at `timesteps` `[B]`: `min(1 / SNR_t, cap)` with
    /// `SNR_t = ᾱ_t / (1 - ᾱ_t)`. An epsilon error e implies an error `e / √SNR_t` in the
    /// predicted clean latent, so weighting by `1 / SNR_t` makes the loss the error of the
    /// implied x0 wherever that is below the cap. Unweighted, the noisiest timesteps, where
    /// the layout of the image is decided, teach almost nothing about x0 (their epsilon is
    /// nearly the input); the cap keeps them from drowning out the rest.
    pub fn x0_weights(&self, timesteps: &Tensor, cap: f64) -> Tensor {
        let a = self.alphas_cumprod.index_select(0, timesteps);
        ((-&a + 1.0) / &a).clamp_max(cap)
    }

    /// The training draw of timesteps for the x0-weighted loss ([`Self::x0_weights`]): a
    /// mixture of the uniform distribution (share `uniform_share`) and one proportional to the
    /// weights, with each draw's loss weight divided by its probability relative to uniform.
    /// The expected loss is the same x0-weighted objective as with uniform draws, but the
    /// batch is spent where that objective is: with the cap at 20, timesteps below 500 hold
    /// 5% of the weight and half of a uniform batch.
    pub fn timestep_sampler(&self, cap: f64, uniform_share: f64) -> TimestepSampler {
        let all = Tensor::arange(
            self.steps(),
            (tch::Kind::Int64, self.alphas_cumprod.device()),
        );
        let w = self.x0_weights(&all, cap).to_kind(tch::Kind::Double);
        let t = self.steps() as f64;
        let probs = (&w / w.sum(tch::Kind::Double)) * (1.0 - uniform_share) + uniform_share / t;
        let weights = (&w / (&probs * t)).to_kind(tch::Kind::Float);
        TimestepSampler {
            probs: probs.to_kind(tch::Kind::Float),
            weights,
        }
    }

    /// `x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε` for a batch `[B, ...]` with timesteps `[B]` (int64).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let mut shape = vec![-1i64];
        shape.resize(x0.dim(), 1);
        let a = self
            .alphas_cumprod
            .index_select(0, timesteps)
            .to_kind(x0.kind())
            .view(shape.as_slice());
        let one_minus_a = -&a + 1.0;
        x0 * a.sqrt() + noise * one_minus_a.sqrt()
    }
}

/// Draws training timesteps with their loss weights; see [`NoiseSchedule::timestep_sampler`].
#[derive(Debug)]
pub struct TimestepSampler {
    /// `p(t)`, `[T]`.
    probs: Tensor,
    /// `w(t) / (T p(t))`, `[T]`: the x0 weight over the draw's relative probability.
    weights: Tensor,
}

impl TimestepSampler {
    /// `b` timesteps (int64, from libtorch's generator) and their loss weights, both `[b]`.
    pub fn sample(&self, b: i64) -> (Tensor, Tensor) {
        let t = self.probs.multinomial(b, true);
        let w = self.weights.index_select(0, &t);
        (t, w)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn matches_sd_schedule_end_points() {
        let s = NoiseSchedule::scaled_linear(0.00085, 0.012, 1000, Device::Cpu);
        assert_eq!(s.steps(), 1000);
        let first = s.alphas_cumprod.double_value(&[0]);
        let last = s.alphas_cumprod.double_value(&[999]);
        assert!((first - (1.0 - 0.00085)).abs() < 1e-7, "{first}");
        // diffusers 0.42.1's DDIMScheduler for SD's schedule: alphas_cumprod[-1] = 0.00466009…
        assert!((last - 0.004_660_095).abs() < 1e-8, "{last}");
    }

    #[test]
    fn x0_weights_follow_inverse_snr_up_to_the_cap() {
        let s = NoiseSchedule::scaled_linear(0.00085, 0.012, 1000, Device::Cpu);
        let w = s.x0_weights(&Tensor::from_slice(&[0i64, 999]), 20.0);
        // t = 0: 1 / SNR = β_0 / (1 - β_0); t = 999: 1 / SNR ≈ 213, capped.
        assert!((w.double_value(&[0]) - 0.00085 / 0.99915).abs() < 1e-7);
        assert_eq!(w.double_value(&[1]), 20.0);
    }

    #[test]
    fn importance_sampled_timesteps_keep_the_weighted_objective() {
        let s = NoiseSchedule::scaled_linear(0.00085, 0.012, 1000, Device::Cpu);
        let all = Tensor::arange(1000, (Kind::Int64, Device::Cpu));
        let w = s.x0_weights(&all, 20.0).to_kind(Kind::Double);
        for share in [1.0, 0.5, 0.0] {
            let sampler = s.timestep_sampler(20.0, share);
            let p = sampler.probs.to_kind(Kind::Double);
            assert!((p.sum(Kind::Double).double_value(&[]) - 1.0).abs() < 1e-5);
            // Σ_t p(t) · weight(t) · f(t) = mean_t w(t) · f(t) for any f: the estimator is
            // unbiased. With f = 1 and f = t:
            let q = &p * sampler.weights.to_kind(Kind::Double);
            let tf = all.to_kind(Kind::Double);
            for f in [Tensor::ones_like(&tf), tf.shallow_clone()] {
                let got = (&q * &f).sum(Kind::Double).double_value(&[]);
                let want = (&w * &f).mean(Kind::Double).double_value(&[]);
                assert!(
                    (got - want).abs() < 1e-4 * want.abs(),
                    "{share}: {got} vs {want}"
                );
            }
        }
        // Uniform draws keep the plain weights; weighted draws favour the noisy end.
        let uniform = s.timestep_sampler(20.0, 1.0);
        assert!(
            uniform
                .weights
                .allclose(&w.to_kind(Kind::Float), 1e-5, 1e-6, false)
        );
        let mixed = s.timestep_sampler(20.0, 0.5);
        tch::manual_seed(1);
        let (t, weight) = mixed.sample(4096);
        assert_eq!(weight.size(), [4096]);
        let late = t
            .ge(500)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(late > 0.7, "{late}");
    }

    #[test]
    fn add_noise_mixes_by_alpha_bar() {
        let s = NoiseSchedule::scaled_linear(0.00085, 0.012, 1000, Device::Cpu);
        let x0 = Tensor::ones([2, 1, 1, 1], (Kind::Float, Device::Cpu));
        let eps = Tensor::zeros([2, 1, 1, 1], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[0i64, 999]);
        let xt = s.add_noise(&x0, &eps, &t);
        let expected = s.alphas_cumprod.index_select(0, &t).sqrt();
        assert!(xt.view([-1]).allclose(&expected, 1e-6, 1e-7, false));
    }
}

//! Exponential moving average of a model's weights: the weights that are exported, because an
//! average over the last few hundred steps samples far better than the last step's weights.

use tch::{Tensor, nn::VarStore};

/// Shadow copies of a set of trainable variables.
pub struct Ema {
    /// (shadow, live) pairs; the shadows belong to another model's var store.
    pairs: Vec<(Tensor, Tensor)>,
    max_decay: f64,
}

impl std::fmt::Debug for Ema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ema")
            .field("tensors", &self.pairs.len())
            .field("max_decay", &self.max_decay)
            .finish()
    }
}

impl Ema {
    /// Tracks `live` in `shadow` (two var stores of the same model), starting from a copy.
    pub fn new(shadow: &VarStore, live: &VarStore, max_decay: f64) -> anyhow::Result<Self> {
        let shadows = shadow.variables();
        let mut pairs = Vec::new();
        for (name, live) in live.variables() {
            let s = shadows
                .get(&name)
                .ok_or_else(|| anyhow::anyhow!("EMA model has no variable {name}"))?;
            tch::no_grad(|| s.shallow_clone().copy_(&live));
            pairs.push((s.shallow_clone(), live));
        }
        Ok(Self { pairs, max_decay })
    }

    /// The decay at optimiser step `step` (from 0): warms up as `(1 + step) / (10 + step)` so
    /// the first steps' random weights are forgotten quickly, then stays at `max_decay`.
    pub fn decay(&self, step: usize) -> f64 {
        let s = step as f64;
        ((1.0 + s) / (10.0 + s)).min(self.max_decay)
    }

    /// `shadow = decay * shadow + (1 - decay) * live` for every variable.
    pub fn update(&mut self, step: usize) {
        let d = self.decay(step);
        tch::no_grad(|| {
            for (shadow, live) in &mut self.pairs {
                let _ = shadow.lerp_(live, 1.0 - d);
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tch::{Device, Kind, nn};

    #[test]
    fn shadow_follows_live_weights() {
        let live = VarStore::new(Device::Cpu);
        let w = live.root().var("w", &[2], nn::Init::Const(1.0));
        let shadow = VarStore::new(Device::Cpu);
        let s = shadow.root().var("w", &[2], nn::Init::Const(0.0));
        let mut ema = Ema::new(&shadow, &live, 0.5).unwrap();
        assert_eq!(s.double_value(&[0]), 1.0, "starts as a copy");
        let _ = tch::no_grad(|| w.shallow_clone().fill_(3.0));
        ema.update(1000);
        assert_eq!(s.double_value(&[0]), 2.0);
        assert_eq!(s.kind(), Kind::Float);
        assert!((ema.decay(0) - 0.1).abs() < 1e-12);
    }
}

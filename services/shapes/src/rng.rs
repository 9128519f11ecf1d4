//! A tiny counter-based random number generator.
//!
//! The dataset must be a pure function of `(seed, index)` and must never change when a
//! dependency is upgraded, so it does not use the `rand` crate: SplitMix64 is a dozen lines,
//! its output is fixed by its definition, and seeding it from a hash of `(seed, index)` lets
//! any sample be produced without generating the ones before it.

/// SplitMix64 (Steele, Lea & Flood 2014): a 64-bit state advanced by a constant and mixed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser: a bijective 64-bit mix with good avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    /// A generator whose first output is `mix(state + gamma)`.
    pub fn new(state: u64) -> Self {
        Self { state }
    }

    /// The independent stream for item `index` of the dataset with seed `seed`.
    ///
    /// The seed is mixed before the index is added so that neighbouring seeds do not give
    /// shifted copies of the same streams.
    pub fn for_sample(seed: u64, index: u64) -> Self {
        Self::new(mix(mix(seed ^ 0x5348_4150_4553_0001).wrapping_add(index)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix(self.state)
    }

    /// A uniform float in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n` (`n > 0`); the multiply-shift bias is below 2^-32 for
    /// the small `n` used here.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 32).wrapping_mul(n as u64) >> 32) as usize
    }

    /// A uniform float in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// An approximately standard normal value (Irwin–Hall: the sum of 12 uniforms minus 6).
    ///
    /// Used only for test noise; it avoids `ln`/`cos`, whose last bits may differ between
    /// platforms' maths libraries.
    pub fn gaussian(&mut self) -> f64 {
        (0..12).map(|_| self.next_f64()).sum::<f64>() - 6.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_values_never_change() {
        // SplitMix64 seeded with 0: the published reference sequence.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn streams_are_independent_of_order() {
        let a: Vec<u64> = (0..4)
            .map(|_| SplitMix64::for_sample(7, 3).next_u64())
            .collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(
            SplitMix64::for_sample(7, 3).next_u64(),
            SplitMix64::for_sample(8, 3).next_u64()
        );
        assert_ne!(
            SplitMix64::for_sample(7, 3).next_u64(),
            SplitMix64::for_sample(7, 4).next_u64()
        );
    }

    #[test]
    fn below_and_uniform_stay_in_range() {
        let mut rng = SplitMix64::new(42);
        let mut seen = [0usize; 5];
        for _ in 0..10_000 {
            seen[rng.below(5)] += 1;
            let u = rng.uniform(-1.0, 2.0);
            assert!((-1.0..2.0).contains(&u));
        }
        assert!(seen.iter().all(|&c| (1800..2200).contains(&c)), "{seen:?}");
    }
}

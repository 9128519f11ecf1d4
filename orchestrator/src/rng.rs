//! A pure-Rust reproduction of torch's CPU random generator, so a request's seed gives the same
//! initial latents (and the same per-step noise of stochastic samplers) as diffusers run with
//! `torch.Generator("cpu").manual_seed(seed)`, without linking libtorch into the orchestrator.
//!
//! What is reproduced (torch 2.11, `aten/src/ATen`):
//! - `core/MT19937RNGEngine.h`: the 32-bit Mersenne Twister, seeded with the low 32 bits of the
//!   64-bit seed (`init_with_uint32`);
//! - `CPUGeneratorImpl.cpp`: `random()` is one engine output, `random64()` is two (first one high);
//! - `core/DistributionsHelper.h`: `uniform_real_distribution<float>` keeps 24 random bits,
//!   `<double>` 53; `normal_distribution<double>` is Box-Muller that caches its second value in
//!   the generator;
//! - `native/cpu/DistributionTemplates.h`: `normal_kernel` for float tensors. Contiguous tensors
//!   of 16 or more elements take `normal_fill` (all uniforms first, then Box-Muller over blocks of
//!   16, the last block recomputed from fresh uniforms when the size is not a multiple of 16);
//!   smaller ones draw each element from `normal_distribution<double>`.
//!
//! torch picks the `normal_fill` implementation by the CPU's dispatch level: at the AVX2 level it
//! is `normal_fill_AVX2`, whose logarithm and sine/cosine come from `avx_mathfun.h` (cephes
//! polynomials) with the angle computed in f32; otherwise (AVX-512, ARM,
//! `ATEN_CPU_CAPABILITY=default`) it is the scalar `normal_fill` using libm with the angle
//! computed in f64. The two differ in the last bits of about 1% of values, so [`NormalFill`]
//! chooses which one to follow. Both are reproduced bit for bit (see `tests/rng_parity.rs`).

/// Which of torch's two `normal_fill` kernels to reproduce for float tensors of >= 16 elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormalFill {
    /// `normal_fill_AVX2`: what the PyPI torch wheel runs on x86-64 CPUs whose best dispatch
    /// level is AVX2 (this project's reference machines, and most desktop CPUs).
    #[default]
    Avx2,
    /// The scalar `normal_fill`: torch on CPUs with AVX-512 dispatch, on aarch64, or with
    /// `ATEN_CPU_CAPABILITY=default`.
    Scalar,
}

/// Number of 32-bit words in the Mersenne Twister state.
const MT_N: usize = 624;
/// Middle word offset of the twist.
const MT_M: usize = 397;

/// torch's `at::mt19937` (the standard MT19937 output sequence).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    /// Index of the next word to temper; `MT_N` means the state must be regenerated first.
    next: usize,
}

impl Mt19937 {
    /// `mt19937_engine::init_with_uint32`: only the low 32 bits of the seed are used.
    fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, next: MT_N }
    }

    /// `mt19937_engine::next_state`: the twist over the whole state.
    fn twist(&mut self) {
        const MATRIX_A: u32 = 0x9908_b0df;
        let mix = |u: u32, v: u32| (u & 0x8000_0000) | (v & 0x7fff_ffff);
        for i in 0..MT_N {
            let y = mix(self.state[i], self.state[(i + 1) % MT_N]);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    /// `mt19937_engine::operator()`: one tempered 32-bit output.
    fn next_u32(&mut self) -> u32 {
        if self.next >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// torch's CPU generator: the engine plus the cached second Box-Muller value of
/// `normal_distribution<double>`, which persists across calls exactly like torch's
/// `next_double_normal_sample_` (so interleaving small and large draws stays in step).
#[derive(Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    next_double_normal: Option<f64>,
    fill: NormalFill,
}

impl std::fmt::Debug for TorchGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchGenerator")
            .field("fill", &self.fill)
            .field("next_double_normal", &self.next_double_normal)
            .finish_non_exhaustive()
    }
}

impl TorchGenerator {
    /// Same stream as `torch.Generator("cpu").manual_seed(seed)` on an AVX2 x86-64 machine
    /// (see [`NormalFill`]). Seeds that differ only above bit 31 give the same stream, as in torch.
    pub fn new(seed: u64) -> Self {
        Self::with_fill(seed, NormalFill::default())
    }

    /// Like [`TorchGenerator::new`], following the given `normal_fill` kernel.
    pub fn with_fill(seed: u64, fill: NormalFill) -> Self {
        Self {
            engine: Mt19937::new(seed),
            next_double_normal: None,
            fill,
        }
    }

    /// `CPUGeneratorImpl::random`.
    pub fn random_u32(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// `CPUGeneratorImpl::random64`: `make64BitsFrom32Bits(first, second)`, first draw high.
    pub fn random_u64(&mut self) -> u64 {
        let hi = u64::from(self.engine.next_u32());
        let lo = u64::from(self.engine.next_u32());
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits, exact in f32, in [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        let bits = self.random_u32() & ((1 << 24) - 1);
        bits as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits, in [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        let bits = self.random_u64() & ((1 << 53) - 1);
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `normal_distribution<double>(0, 1)`: Box-Muller, returning the cosine branch and caching
    /// the sine branch for the next call.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(shape, generator=g, dtype=torch.float32)` flattened, for any shape with
    /// `numel` elements; successive calls continue the stream as torch does.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            // normal_kernel's serial path: one double normal per element, narrowed to f32.
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        let full = numel - numel % 16;
        for block in data[..full].chunks_exact_mut(16) {
            self.normal_fill_16(block);
        }
        if !numel.is_multiple_of(16) {
            // normal_fill recomputes the last 16 values from fresh uniforms; the overlap with the
            // previous block is overwritten, which is why this is not simply "fill the tail".
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            self.normal_fill_16(tail);
        }
        data
    }

    /// `normal_fill_16` / `normal_fill_16_AVX2` with mean 0 and std 1: Box-Muller pairing element
    /// `j` with `j + 8`.
    fn normal_fill_16(&self, data: &mut [f32]) {
        debug_assert_eq!(data.len(), 16);
        for j in 0..8 {
            let (u1, u2) = (1.0 - data[j], data[j + 8]);
            let (cos, sin, radius) = match self.fill {
                NormalFill::Scalar => {
                    let radius = (-2.0 * u1.ln()).sqrt();
                    let theta = (2.0 * std::f64::consts::PI * f64::from(u2)) as f32;
                    (theta.cos(), theta.sin(), radius)
                }
                NormalFill::Avx2 => {
                    let radius = (-2.0 * avx_mathfun::log(u1)).sqrt();
                    let theta = TWO_PI_F32 * u2;
                    let (sin, cos) = avx_mathfun::sincos(theta);
                    (cos, sin, radius)
                }
            };
            // `radius * cos(theta) * std + mean` with std = 1 and mean = 0: the multiply is exact,
            // and adding +0.0 turns a -0.0 into +0.0 exactly as torch's (fused) add does.
            data[j] = radius * cos + 0.0;
            data[j + 8] = radius * sin + 0.0;
        }
    }
}

/// `_mm256_set1_ps(2.0f * c10::pi<double>)` in `normal_fill_AVX2`: 2π rounded to f32.
const TWO_PI_F32: f32 = (2.0 * std::f64::consts::PI) as f32;

/// Lane-wise scalar port of the two functions `normal_fill_16_AVX2` takes from torch's
/// `aten/src/ATen/native/cpu/avx_mathfun.h` (Pommier's cephes-based `sse_mathfun`, AVX version).
/// Every step is one IEEE f32 operation in the intrinsics' order, so results are bit-identical.
/// The `mul_add`s are not in the C source: GCC builds the wheel with FMA enabled and its default
/// `-ffp-contract=fast` fuses each multiply whose only use is an add into that add (the first
/// multiply in program order wins when both operands are products). Verified against torch on
/// 100k+ draws; without the fusion about 1% of values differ by 1-2 ulp.
// The coefficients are copied verbatim from the C source, which writes them as double literals
// stored into float arrays: we round the same way (decimal -> f64 -> f32), hence the f64
// literals with more digits than f32 holds.
#[allow(clippy::excessive_precision)]
mod avx_mathfun {
    /// `cephes_SQRTHF`, 0.707106781186547524 in the source.
    const SQRTHF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    const LOG_P: [f32; 9] = [
        7.037_683_629_2E-2_f64 as f32,
        -1.151_461_031_0E-1_f64 as f32,
        1.167_699_874_0E-1_f64 as f32,
        -1.242_014_084_6E-1_f64 as f32,
        1.424_932_278_7E-1_f64 as f32,
        -1.666_805_766_5E-1_f64 as f32,
        2.000_071_476_5E-1_f64 as f32,
        -2.499_999_399_3E-1_f64 as f32,
        3.333_333_117_4E-1_f64 as f32,
    ];
    const LOG_Q1: f32 = -2.121_944_40e-4_f64 as f32;
    const LOG_Q2: f32 = 0.693_359_375;

    const MINUS_DP1: f32 = -0.785_156_25;
    const MINUS_DP2: f32 = -2.418_756_484_985_351_562_5e-4;
    const MINUS_DP3: f32 = -3.774_894_977_445_941_08e-8_f64 as f32;
    const SINCOF: [f32; 3] = [
        -1.951_529_589_1E-4_f64 as f32,
        8.332_160_873_6E-3_f64 as f32,
        -1.666_665_461_1E-1_f64 as f32,
    ];
    const COSCOF: [f32; 3] = [
        2.443_315_711_809_948E-5_f64 as f32,
        -1.388_731_625_493_765E-3_f64 as f32,
        4.166_664_568_298_827E-2_f64 as f32,
    ];
    /// `cephes_FOPI`, 4/π.
    const FOPI: f32 = 1.273_239_544_735_16_f64 as f32;

    /// `log256_ps` (cephes `logf`) for one lane; only called with `x` in (0, 1].
    pub(super) fn log(x: f32) -> f32 {
        let invalid = x <= 0.0;
        let x = x.max(f32::from_bits(0x0080_0000));
        let bits = x.to_bits();
        let exponent = (bits >> 23) as i32 - 0x7f;
        // Keep the mantissa, with the exponent of 0.5: x in [0.5, 1).
        let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let mut e = exponent as f32 + 1.0;
        let below = x < SQRTHF;
        let tmp = if below { x } else { 0.0 };
        x -= 1.0;
        e -= if below { 1.0 } else { 0.0 };
        x += tmp;

        let z = x * x;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(x, p);
        }
        y *= x;
        y = y.mul_add(z, e * LOG_Q1);
        y = (-z).mul_add(0.5, y);
        let r = e.mul_add(LOG_Q2, x + y);
        if invalid { f32::NAN } else { r }
    }

    /// `sincos256_ps` (cephes `sinf`/`cosf` with the octant reduction) for one lane:
    /// returns `(sin, cos)`.
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        let sign_sin = x.to_bits() & 0x8000_0000;
        let mut x = x.abs();
        // _mm256_cvttps_epi32 truncates; then j = (j + 1) & !1.
        let j = (((x * FOPI) as i32).wrapping_add(1)) & !1;
        let y = j as f32;
        let swap_sign_sin = ((j & 4) as u32) << 29;
        let poly_mask = j & 2 == 0;
        let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
        let sign_sin = sign_sin ^ swap_sign_sin;

        // "Extended precision modular arithmetic": x = ((x - y*DP1) - y*DP2) - y*DP3.
        x = y.mul_add(MINUS_DP1, x);
        x = y.mul_add(MINUS_DP2, x);
        x = y.mul_add(MINUS_DP3, x);

        let z = x * x;
        let mut c = COSCOF[0];
        c = c.mul_add(z, COSCOF[1]);
        c = c.mul_add(z, COSCOF[2]);
        c *= z;
        c = c.mul_add(z, -(z * 0.5));
        c += 1.0;

        let mut s = SINCOF[0];
        s = s.mul_add(z, SINCOF[1]);
        s = s.mul_add(z, SINCOF[2]);
        s *= z;
        s = s.mul_add(x, x);

        // The vector code selects with masks and adds the other (zeroed) lane, hence `+ 0.0`.
        let (sin, cos) = if poly_mask { (s, c) } else { (c, s) };
        let sin = f32::from_bits((sin + 0.0).to_bits() ^ sign_sin);
        let cos = f32::from_bits((cos + 0.0).to_bits() ^ sign_cos);
        (sin, cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of the reference MT19937 for seed 5489 (C++ `std::mt19937` default).
    #[test]
    fn mt19937_matches_reference_sequence() {
        let mut mt = Mt19937::new(5489);
        assert_eq!(mt.next_u32(), 3_499_211_612);
        assert_eq!(mt.next_u32(), 581_869_302);
        let mut mt = Mt19937::new(5489);
        let last = (0..10_000).map(|_| mt.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn seeds_differing_above_bit_31_share_a_stream() {
        let a = TorchGenerator::new(5).randn(20);
        let b = TorchGenerator::new((1 << 32) + 5).randn(20);
        assert_eq!(a, b);
    }

    #[test]
    fn scalar_path_caches_the_second_box_muller_value() {
        let mut g = TorchGenerator::new(0);
        let two_at_once = g.randn(2);
        let mut g = TorchGenerator::new(0);
        let one_by_one = [g.randn(1)[0], g.randn(1)[0]];
        assert_eq!(two_at_once, one_by_one);
    }
}

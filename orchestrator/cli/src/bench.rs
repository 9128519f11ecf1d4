//! `sd bench unet`: times the U-Net in this process (no gRPC) on one classifier-free-guided
//! step, as the denoiser stage runs it, so it can be compared with diffusers' eager U-Net
//! (`tests/python/bench_unet.py`, which times the same step the same way).

use anyhow::Context;
use sd_models::device::{DTypeSpec, DeviceSpec};
use sd_models::unet_2d_condition::UNet2DConditionModel;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    target: Target,
}

#[derive(Debug, clap::Subcommand)]
enum Target {
    /// Time one guided U-Net step (batch 2: uncond + cond).
    Unet(UnetArgs),
    /// Throughput and per-stage latency of the whole service (all stages in-process, gRPC on
    /// loopback) at several concurrency levels, batching on and off.
    Serve(crate::bench_serve::ServeArgs),
    /// The per-step cost of the gRPC split: one guided step through the denoiser stage on
    /// loopback against the same U-Net called in-process, alternating.
    Split(crate::bench_split::SplitArgs),
}

#[derive(Debug, clap::Args)]
struct UnetArgs {
    /// Model folder (diffusers layout; only `unet/` is needed, `vae/config.json` sets the
    /// latent factor, 8 without it).
    #[arg(long, env = "SD_MODEL")]
    model: PathBuf,
    /// Image height in pixels (the latent is this over the VAE factor).
    #[arg(long, default_value_t = 256)]
    height: u32,
    /// Image width in pixels.
    #[arg(long, default_value_t = 256)]
    width: u32,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Untimed steps first (allocator and kernel warm-up).
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    iters: u32,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// f32, f16 or bf16 (half precision needs CUDA).
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    dtype: DTypeSpec,
    /// Seed of the random latents and text context.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.target {
        Target::Unet(a) => unet(a),
        Target::Serve(a) => crate::bench_serve::run(a).await,
        Target::Split(a) => crate::bench_split::run(a).await,
    }
}

fn unet(a: UnetArgs) -> anyhow::Result<()> {
    a.device.check_available().map_err(anyhow::Error::msg)?;
    a.dtype.check_device(a.device).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(a.iters > 0, "--iters must be at least 1");
    let f = vae_factor(&a.model)?;
    anyhow::ensure!(
        a.height.is_multiple_of(f) && a.width.is_multiple_of(f),
        "--height/--width must be multiples of the VAE factor {f}"
    );
    let unet_dir = a.model.join("unet");
    let model = UNet2DConditionModel::load(&unet_dir, a.device.0, a.dtype.0)
        .with_context(|| format!("loading {}", unet_dir.display()))?;
    let c = model.config();
    let (lh, lw) = (i64::from(a.height / f), i64::from(a.width / f));
    tch::manual_seed(a.seed);
    let opts = (Kind::Float, Device::Cpu);
    let latents = Tensor::randn([1, c.in_channels as i64, lh, lw], opts);
    let context = Tensor::randn([2, 77, c.cross_attention_dim as i64], opts);
    let timesteps = Tensor::from_slice(&[500f32, 500.0]);
    // The denoiser stage's guided step: one batch of 2, then uncond + g * (cond - uncond).
    let step = || -> anyhow::Result<()> {
        tch::no_grad(|| {
            let both = Tensor::cat(&[&latents, &latents], 0);
            let pred = model.forward(&both, &timesteps, &context)?;
            let halves = pred.chunk(2, 0);
            let (uncond, cond) = (&halves[0], &halves[1]);
            let guided = uncond + (cond - uncond) * a.guidance;
            // Wait for the device, so the time covers the work, not just its launch.
            let _ = guided.sum(Kind::Float).double_value(&[]);
            Ok(())
        })
    };
    for _ in 0..a.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(a.iters as usize);
    for _ in 0..a.iters {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "sd-models {:?} unet, {}x{} (latent {lw}x{lh}), batch 2 (cfg), {} {}, {} iters after {} warm-up",
        c.block_out_channels, a.width, a.height, a.dtype, a.device, a.iters, a.warmup
    );
    println!(
        "machine: {}, libtorch via tch, threads {}",
        cpu_model(),
        tch::get_num_threads()
    );
    times.sort_by(f64::total_cmp);
    let mid = times.len() / 2;
    // The median as Python's statistics.median takes it (mean of the middle two when even).
    let median = if times.len() % 2 == 0 {
        (times[mid - 1] + times[mid]) / 2.0
    } else {
        times[mid]
    };
    println!("ms/step: mean {mean:.1} median {median:.1} min {min:.1} max {max:.1}");
    Ok(())
}

/// `2^(len(block_out_channels) - 1)` from `vae/config.json`, 8 when the folder has no VAE.
pub(crate) fn vae_factor(model: &Path) -> anyhow::Result<u32> {
    let path = model.join("vae/config.json");
    if !path.exists() {
        return Ok(8);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let levels = config["block_out_channels"]
        .as_array()
        .map(|a| a.len())
        .filter(|n| *n > 0)
        .with_context(|| format!("{}: no block_out_channels", path.display()))?;
    Ok(1 << (levels - 1))
}

/// The CPU's `model name` from /proc/cpuinfo.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

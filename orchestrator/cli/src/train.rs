//! `sd train`: trains the default model's architecture from scratch on the shapes dataset
//! and writes a diffusers folder (see `sd-training`).

use anyhow::Context;
use sd_models::device::DeviceSpec;
use sd_training::{RunOptions, RunPaths, TrainConfig};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The diffusers folder to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Checkpoints and resumable state (default: OUT with `-checkpoints` appended).
    #[arg(long)]
    checkpoints: Option<PathBuf>,
    /// A folder with CLIP's BPE vocabulary, `vocab.json` and `merges.txt`
    /// (`tests/python/clip_vocab.py` makes one from the open_clip_torch wheel).
    #[arg(long, default_value = ".cache/clip-vocab")]
    tokenizer: PathBuf,
    /// Continue the run in the checkpoint folder from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Stop (checkpointed) after this many steps in this invocation; --resume continues.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Seed of the dataset, the initial weights, and every batch and noise draw.
    #[arg(long, default_value_t = TrainConfig::default().seed)]
    seed: u64,
    /// Optimiser steps of the VAE stage.
    #[arg(long, default_value_t = TrainConfig::default().vae_steps)]
    vae_steps: usize,
    /// Images per VAE step.
    #[arg(long, default_value_t = TrainConfig::default().vae_batch)]
    vae_batch: usize,
    /// Peak learning rate of the VAE stage.
    #[arg(long, default_value_t = TrainConfig::default().vae_lr)]
    vae_lr: f64,
    /// Optimiser steps of the diffusion stage (U-Net and text encoder).
    #[arg(long, default_value_t = TrainConfig::default().diffusion_steps)]
    diffusion_steps: usize,
    /// Latents per diffusion step.
    #[arg(long, default_value_t = TrainConfig::default().diffusion_batch)]
    diffusion_batch: usize,
    /// Peak learning rate of the diffusion stage.
    #[arg(long, default_value_t = TrainConfig::default().diffusion_lr)]
    diffusion_lr: f64,
    /// Images encoded once into the latent pool the diffusion stage samples.
    #[arg(long, default_value_t = TrainConfig::default().pool_size)]
    pool_size: usize,
    /// Fraction of captions replaced by the empty prompt (classifier-free guidance).
    #[arg(long, default_value_t = TrainConfig::default().caption_dropout)]
    caption_dropout: f64,
    /// Cap of the loss weight min(1/SNR, cap) that makes the epsilon loss an x0 error.
    #[arg(long, default_value_t = TrainConfig::default().x0_weight_cap)]
    x0_weight_cap: f64,
    /// Share of training timesteps drawn uniformly; the rest in proportion to their loss
    /// weight (1 = uniform).
    #[arg(long, default_value_t = TrainConfig::default().timestep_uniform_share)]
    timestep_uniform_share: f64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// CPU threads for libtorch (its default when absent: one per core).
    #[arg(long)]
    threads: Option<i32>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    args.device.check_available().map_err(anyhow::Error::msg)?;
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    if !(0.0..1.0).contains(&args.caption_dropout) {
        anyhow::bail!(
            "--caption-dropout must be in [0, 1), got {}",
            args.caption_dropout
        );
    }
    if args.x0_weight_cap.is_nan() || args.x0_weight_cap <= 0.0 {
        anyhow::bail!(
            "--x0-weight-cap must be positive, got {}",
            args.x0_weight_cap
        );
    }
    if !(0.0..=1.0).contains(&args.timestep_uniform_share) {
        anyhow::bail!(
            "--timestep-uniform-share must be in [0, 1], got {}",
            args.timestep_uniform_share
        );
    }
    for (name, value) in [
        ("--vae-batch", args.vae_batch),
        ("--diffusion-batch", args.diffusion_batch),
        ("--pool-size", args.pool_size),
    ] {
        if value == 0 {
            anyhow::bail!("{name} must be at least 1");
        }
    }
    let config = TrainConfig {
        seed: args.seed,
        vae_steps: args.vae_steps,
        vae_batch: args.vae_batch,
        vae_lr: args.vae_lr,
        diffusion_steps: args.diffusion_steps,
        diffusion_batch: args.diffusion_batch,
        diffusion_lr: args.diffusion_lr,
        pool_size: args.pool_size,
        caption_dropout: args.caption_dropout,
        x0_weight_cap: args.x0_weight_cap,
        timestep_uniform_share: args.timestep_uniform_share,
        ..TrainConfig::default()
    };
    let checkpoints = args.checkpoints.unwrap_or_else(|| {
        let mut name = args.out.as_os_str().to_owned();
        name.push("-checkpoints");
        PathBuf::from(name)
    });
    let paths = RunPaths {
        out: args.out.clone(),
        checkpoints,
        tokenizer: args.tokenizer,
    };
    let started = std::time::Instant::now();
    let options = RunOptions {
        resume: args.resume,
        stop_after: args.stop_after,
    };
    let report =
        sd_training::train(&config, &paths, args.device.0, options).context("training failed")?;
    if !report.finished {
        println!(
            "stopped after {} steps; continue with --resume",
            args.stop_after.unwrap_or_default()
        );
        return Ok(());
    }
    let last = |l: &[f32]| {
        let tail = &l[l.len().saturating_sub(100)..];
        tail.iter().sum::<f32>() / tail.len().max(1) as f32
    };
    println!(
        "trained in {:.0} s this run (VAE {:.0} s, diffusion {:.0} s in all); final loss VAE {:.5}, \
         diffusion {:.5}; scaling_factor {:.5}",
        started.elapsed().as_secs_f64(),
        report.vae_seconds,
        report.diffusion_seconds,
        last(&report.vae_losses),
        last(&report.diffusion_losses),
        report.scaling_factor,
    );
    println!(
        "wrote {} (loss curve: {})",
        paths.out.display(),
        paths.out.join("loss.png").display()
    );
    Ok(())
}

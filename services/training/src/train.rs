//! `sd train`: the training process Stable Diffusion uses, at the scale of the shapes dataset.
//!
//! 1. **VAE**: the autoencoder learns to reconstruct the dataset's images through a 4-channel
//!    latent (reconstruction loss plus a small KL term towards N(0, I)); its latents' standard
//!    deviation gives `scaling_factor`, as for SD.
//! 2. **Diffusion**: the images are encoded once into a pool of latent distributions; each
//!    step samples latents, adds noise at random timesteps under the model's schedule (forward
//!    diffusion) and trains the U-Net to predict that noise (epsilon loss, weighted so that
//!    the noisiest timesteps, where the layout is decided, count; timesteps are drawn partly
//!    in proportion to that weight, see `NoiseSchedule::timestep_sampler`), conditioned through
//!    cross-attention on the CLIP text transformer's hidden states, which train jointly. A
//!    fraction of captions is replaced by the empty prompt so the model also learns the
//!    unconditional prediction that classifier-free guidance needs.
//!
//! Every random choice is a function of (seed, stage, step), so a run is reproducible, and a
//! run resumed from its last checkpoint sees the same data and noise as one that never
//! stopped (only the optimiser's moment estimates restart: libtorch does not expose them).

use crate::architecture::Architecture;
use crate::ema::Ema;
use crate::export::{self, Components};
use crate::plot::{self, Curve};
use crate::schedule::NoiseSchedule;
use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sd_models::autoencoder_kl::AutoencoderKL;
use sd_models::clip::{ClipTextConfig, ClipTextModel};
use sd_models::tokenizer::ClipTokenizer;
use sd_models::unet_2d_condition::UNet2DConditionModel;
use sd_shapes::dataset::ShapesDataset;
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn, nn::OptimizerConfig, nn::VarStore};

/// Everything that determines a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub seed: u64,
    pub vae_steps: usize,
    pub vae_batch: usize,
    pub vae_lr: f64,
    pub diffusion_steps: usize,
    pub diffusion_batch: usize,
    pub diffusion_lr: f64,
    /// Images encoded into the latent pool the diffusion stage samples from.
    pub pool_size: usize,
    /// Fraction of captions replaced by the empty prompt (for classifier-free guidance).
    pub caption_dropout: f64,
    /// Cap of the x0-space weighting of the epsilon loss (see `NoiseSchedule::x0_weights`).
    pub x0_weight_cap: f64,
    /// Share of uniformly drawn timesteps; the rest are drawn in proportion to their loss
    /// weight (see `NoiseSchedule::timestep_sampler`). 1 is plain uniform sampling.
    pub timestep_uniform_share: f64,
    /// Upper bound of the EMA decay of the exported U-Net and text encoder weights.
    pub ema_decay: f64,
    #[serde(skip)]
    pub arch: Architecture,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            vae_steps: 800,
            vae_batch: 16,
            vae_lr: 1e-3,
            diffusion_steps: 10_000,
            diffusion_batch: 32,
            diffusion_lr: 1e-3,
            pool_size: 8192,
            caption_dropout: 0.1,
            x0_weight_cap: 20.0,
            timestep_uniform_share: 0.5,
            ema_decay: 0.999,
            arch: Architecture::default(),
        }
    }
}

/// Where a run reads and writes.
#[derive(Debug, Clone)]
pub struct RunPaths {
    /// The diffusers folder written at the end.
    pub out: PathBuf,
    /// Checkpoints and the resumable state (`state.json`).
    pub checkpoints: PathBuf,
    /// A folder with CLIP's `vocab.json` and `merges.txt`.
    pub tokenizer: PathBuf,
}

/// How a run starts and ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Continue from the checkpoint folder's state when there is one.
    pub resume: bool,
    /// Stop (after checkpointing) once this many steps ran in this invocation, as an
    /// interruption would; `--resume` continues. Nothing is exported then.
    pub stop_after: Option<usize>,
}

/// What a run reports; `finished` is false when it stopped early (see
/// [`RunOptions::stop_after`]).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct TrainReport {
    pub finished: bool,
    pub vae_seconds: f64,
    pub diffusion_seconds: f64,
    pub scaling_factor: f64,
    pub vae_losses: Vec<f32>,
    pub diffusion_losses: Vec<f32>,
}

/// The resumable state, saved with every checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    config: TrainConfig,
    stage: Stage,
    /// Steps completed in the current stage.
    step: usize,
    report: TrainReport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stage {
    Vae,
    Diffusion,
    Done,
}

/// How often (in steps) the state is checkpointed.
const CHECKPOINT_EVERY: usize = 250;
/// Gradient-norm clip for every stage.
const GRAD_CLIP: f64 = 1.0;
/// Weight of the KL term relative to the summed squared reconstruction error (LDM's kl-f4).
const KL_WEIGHT: f64 = 1e-6;
/// Linear learning-rate warm-up, in steps.
const WARMUP: usize = 100;

/// Trains from scratch, or continues the run in `paths.checkpoints` when `options.resume` is
/// set and a state is there, then writes the diffusers folder and `loss.png` into
/// `paths.out`.
pub fn train(
    config: &TrainConfig,
    paths: &RunPaths,
    device: Device,
    options: RunOptions,
) -> anyhow::Result<TrainReport> {
    let mut budget = Budget(options.stop_after);
    std::fs::create_dir_all(&paths.checkpoints)
        .with_context(|| format!("creating {}", paths.checkpoints.display()))?;
    let state_path = paths.checkpoints.join("state.json");
    let mut state = if options.resume && state_path.is_file() {
        let state: State = serde_json::from_str(&std::fs::read_to_string(&state_path)?)
            .with_context(|| format!("reading {}", state_path.display()))?;
        if state.config != *config {
            bail!(
                "{} was written by a run with other settings ({:?}); start afresh without \
                 --resume or use another checkpoint folder",
                state_path.display(),
                state.config
            );
        }
        eprintln!("resuming: {:?} stage, step {}", state.stage, state.step);
        state
    } else {
        State {
            config: config.clone(),
            stage: Stage::Vae,
            step: 0,
            report: TrainReport::default(),
        }
    };
    // Every stage of the tokenizer folder as the exported model will have it.
    let staging = paths.checkpoints.join("tokenizer");
    export::write_tokenizer(&staging, &paths.tokenizer)?;
    let tokenizer = ClipTokenizer::from_dir(&staging)?;
    let arch = &config.arch;
    let dataset = ShapesDataset::new(config.seed, arch.resolution);

    tch::manual_seed(seed_for(config.seed, 0, 0));
    let vae = AutoencoderKL::init(serde_json::from_value(arch.vae_config(1.0))?, device)?;
    let vae_ckpt = paths.checkpoints.join("vae.safetensors");
    if state.stage != Stage::Vae || state.step > 0 {
        restore(vae.var_store(), &vae_ckpt)?;
    }
    if state.stage == Stage::Vae {
        train_vae(
            &vae,
            &dataset,
            config,
            &mut state,
            &paths.checkpoints,
            &mut budget,
        )?;
        if state.step < config.vae_steps {
            return Ok(stopped(state));
        }
        state.stage = Stage::Diffusion;
        state.step = 0;
        save_state(&state, &paths.checkpoints)?;
    }

    let pool = LatentPool::encode(&vae, &dataset, &tokenizer, config.pool_size, device)?;
    state.report.scaling_factor = pool.scaling_factor;
    let text_config: ClipTextConfig = serde_json::from_value(arch.text_encoder_config())?;
    let unet_config = || serde_json::from_value(arch.unet_config());
    tch::manual_seed(seed_for(config.seed, 1, 0));
    let text = ClipTextModel::init(text_config.clone(), device)?;
    let unet = UNet2DConditionModel::init(unet_config()?, device)?;
    let ema_text = ClipTextModel::init(text_config, device)?;
    let ema_unet = UNet2DConditionModel::init(unet_config()?, device)?;
    if state.step > 0 || state.stage == Stage::Done {
        for (vs, name) in [
            (text.var_store(), "text_encoder"),
            (unet.var_store(), "unet"),
            (ema_text.var_store(), "ema_text_encoder"),
            (ema_unet.var_store(), "ema_unet"),
        ] {
            restore(vs, &paths.checkpoints.join(format!("{name}.safetensors")))?;
        }
    }
    if state.stage == Stage::Diffusion {
        let models = DiffusionModels {
            text: &text,
            unet: &unet,
            ema_text: &ema_text,
            ema_unet: &ema_unet,
        };
        train_diffusion(
            &models,
            &pool,
            config,
            &mut state,
            &paths.checkpoints,
            &mut budget,
        )?;
        if state.step < config.diffusion_steps {
            return Ok(stopped(state));
        }
        state.stage = Stage::Done;
        save_state(&state, &paths.checkpoints)?;
    }

    let parts = Components {
        vae: vae.var_store(),
        unet: ema_unet.var_store(),
        text_encoder: ema_text.var_store(),
        scaling_factor: pool.scaling_factor,
    };
    export::write_model(&paths.out, arch, &parts, &paths.tokenizer)?;
    let report = &state.report;
    let curves = plot::loss_curves(&[
        Curve {
            losses: &report.vae_losses,
            colour: [30, 110, 200],
        },
        Curve {
            losses: &report.diffusion_losses,
            colour: [210, 80, 30],
        },
    ]);
    let png = paths.out.join("loss.png");
    curves
        .save(&png)
        .with_context(|| format!("writing {}", png.display()))?;
    state.report.finished = true;
    Ok(state.report)
}

/// Steps this invocation may still run.
struct Budget(Option<usize>);

impl Budget {
    fn spent(&self) -> bool {
        self.0 == Some(0)
    }

    /// Takes one step from the budget; false when it is spent.
    fn take(&mut self) -> bool {
        match &mut self.0 {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }
}

fn stopped(state: State) -> TrainReport {
    eprintln!(
        "stopped after the step budget: {:?} stage, step {}; continue with --resume",
        state.stage, state.step
    );
    state.report
}

/// A per-(seed, stage, step) seed for libtorch's generator.
fn seed_for(seed: u64, stage: u64, step: usize) -> i64 {
    // SplitMix64 finaliser over the three numbers: distinct streams, no visible pattern.
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(stage.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(step as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// Warm-up then cosine decay to a tenth of `base` at `total` steps.
fn learning_rate(base: f64, step: usize, total: usize) -> f64 {
    let warm = ((step + 1) as f64 / WARMUP as f64).min(1.0);
    let progress = step as f64 / total.max(1) as f64;
    base * warm * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
}

/// Images `[B, 3, H, W]` in [-1, 1] for dataset samples `indices`.
fn image_batch(dataset: &ShapesDataset, indices: impl Iterator<Item = u64>) -> Tensor {
    let images: Vec<Tensor> = indices
        .map(|i| {
            let img = dataset.sample(i).image;
            let (w, h) = img.dimensions();
            Tensor::from_slice(img.as_raw()).view([i64::from(h), i64::from(w), 3])
        })
        .collect();
    Tensor::stack(&images, 0)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 127.5
        - 1.0
}

fn train_vae(
    vae: &AutoencoderKL,
    dataset: &ShapesDataset,
    config: &TrainConfig,
    state: &mut State,
    checkpoints: &Path,
    budget: &mut Budget,
) -> anyhow::Result<()> {
    let device = vae.var_store().device();
    let mut opt = nn::Adam::default().build(vae.var_store(), config.vae_lr)?;
    let total = config.vae_steps;
    let bar = progress("vae", total, state.step);
    let started = Instant::now();
    let seconds_before = state.report.vae_seconds;
    let batch = config.vae_batch;
    while state.step < total && budget.take() {
        let step = state.step;
        tch::manual_seed(seed_for(config.seed, 2, step));
        let first = (step * batch) as u64;
        let x = image_batch(dataset, first..first + batch as u64).to_device(device);
        let posterior = vae.encode_train(&x)?;
        let z = posterior.sample(&posterior.mean.randn_like())?;
        let recon = vae.decode_train(&z)?;
        let mse = (&recon - &x).square().sum(Kind::Float);
        let kl = (posterior.mean.square() + posterior.std.square() - 1.0 - &posterior.logvar)
            .sum(Kind::Float)
            * 0.5;
        let loss = (mse + kl * KL_WEIGHT) / x.numel() as f64;
        opt.set_lr(learning_rate(config.vae_lr, step, total));
        opt.zero_grad();
        loss.backward();
        opt.clip_grad_norm(GRAD_CLIP);
        opt.step();
        let value = loss.double_value(&[]) as f32;
        if !value.is_finite() {
            bail!("the VAE loss became {value} at step {step}");
        }
        state.report.vae_losses.push(value);
        state.step += 1;
        report_progress(&bar, &state.report.vae_losses, state.step);
        if state.step.is_multiple_of(CHECKPOINT_EVERY) || state.step == total || budget.spent() {
            state.report.vae_seconds = seconds_before + started.elapsed().as_secs_f64();
            save(vae.var_store(), &checkpoints.join("vae.safetensors"))?;
            save_state(state, checkpoints)?;
        }
    }
    bar.finish();
    Ok(())
}

/// The training images as latent distributions (so the encoder runs once per image, not
/// once per step) with their captions' token ids.
struct LatentPool {
    mean: Tensor,
    std: Tensor,
    ids: Tensor,
    empty_ids: Tensor,
    scaling_factor: f64,
}

impl LatentPool {
    fn encode(
        vae: &AutoencoderKL,
        dataset: &ShapesDataset,
        tokenizer: &ClipTokenizer,
        size: usize,
        device: Device,
    ) -> anyhow::Result<Self> {
        let bar = progress("encode", size, 0);
        let (mut means, mut stds, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        // Pool images come from a range no VAE batch used, as fresh data would.
        let offset = 1u64 << 40;
        for start in (0..size).step_by(64) {
            let end = (start + 64).min(size);
            let range = offset + start as u64..offset + end as u64;
            let x = image_batch(dataset, range.clone()).to_device(device);
            let posterior = vae.encode(&x)?;
            means.push(posterior.mean);
            stds.push(posterior.std);
            for i in range {
                let caption = dataset.sample(i).caption;
                ids.push(Tensor::from_slice(&tokenizer.encode(&caption)?.ids));
            }
            bar.set_position(end as u64);
        }
        bar.finish();
        let mean = Tensor::cat(&means, 0);
        let std = Tensor::cat(&stds, 0);
        tch::manual_seed(0);
        let sampled = &mean + &std * mean.randn_like();
        let scaling_factor = 1.0 / sampled.std(true).double_value(&[]);
        Ok(Self {
            mean,
            std,
            ids: Tensor::stack(&ids, 0).to_device(device),
            empty_ids: Tensor::from_slice(&tokenizer.encode("")?.ids).to_device(device),
            scaling_factor,
        })
    }

    fn len(&self) -> i64 {
        self.mean.size()[0]
    }
}

struct DiffusionModels<'a> {
    text: &'a ClipTextModel,
    unet: &'a UNet2DConditionModel,
    ema_text: &'a ClipTextModel,
    ema_unet: &'a UNet2DConditionModel,
}

fn train_diffusion(
    models: &DiffusionModels<'_>,
    pool: &LatentPool,
    config: &TrainConfig,
    state: &mut State,
    checkpoints: &Path,
    budget: &mut Budget,
) -> anyhow::Result<()> {
    let device = models.unet.device();
    let schedule = NoiseSchedule::scaled_linear(0.00085, 0.012, 1000, device);
    let sampler = schedule.timestep_sampler(config.x0_weight_cap, config.timestep_uniform_share);
    let adamw = nn::AdamW {
        wd: 0.01,
        ..Default::default()
    };
    let mut opt_unet = adamw.build(models.unet.var_store(), config.diffusion_lr)?;
    let mut opt_text = adamw.build(models.text.var_store(), config.diffusion_lr)?;
    let mut ema_unet = Ema::new(
        models.ema_unet.var_store(),
        models.unet.var_store(),
        config.ema_decay,
    )?;
    let mut ema_text = Ema::new(
        models.ema_text.var_store(),
        models.text.var_store(),
        config.ema_decay,
    )?;
    if state.step > 0 {
        // Resuming: the EMA shadows were restored from the checkpoint; `Ema::new` copied the
        // live weights over them, so restore them again.
        restore(
            models.ema_unet.var_store(),
            &checkpoints.join("ema_unet.safetensors"),
        )?;
        restore(
            models.ema_text.var_store(),
            &checkpoints.join("ema_text_encoder.safetensors"),
        )?;
    }
    let total = config.diffusion_steps;
    let bar = progress("diffusion", total, state.step);
    let started = Instant::now();
    let seconds_before = state.report.diffusion_seconds;
    let b = config.diffusion_batch as i64;
    while state.step < total && budget.take() {
        let step = state.step;
        tch::manual_seed(seed_for(config.seed, 3, step));
        let idx = Tensor::randint(pool.len(), [b], (Kind::Int64, device));
        let mean = pool.mean.index_select(0, &idx);
        let std = pool.std.index_select(0, &idx);
        let latents = (&mean + &std * mean.randn_like()) * pool.scaling_factor;
        let drop = Tensor::rand([b, 1], (Kind::Float, device)).lt(config.caption_dropout);
        let ids = pool
            .ids
            .index_select(0, &idx)
            .where_self(&drop.logical_not(), &pool.empty_ids.unsqueeze(0));
        let (timesteps, weights) = sampler.sample(b);
        let noise = latents.randn_like();
        let noisy = schedule.add_noise(&latents, &noise, &timesteps);
        let context = models.text.forward_train(&ids)?;
        let predicted = models.unet.forward_train(&noisy, &timesteps, &context)?;
        let per_sample =
            (predicted - noise)
                .square()
                .mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
        let loss = (per_sample * weights).mean(Kind::Float);
        let lr = learning_rate(config.diffusion_lr, step, total);
        opt_unet.set_lr(lr);
        opt_text.set_lr(lr);
        opt_unet.zero_grad();
        opt_text.zero_grad();
        loss.backward();
        opt_unet.clip_grad_norm(GRAD_CLIP);
        opt_text.clip_grad_norm(GRAD_CLIP);
        opt_unet.step();
        opt_text.step();
        ema_unet.update(step);
        ema_text.update(step);
        let value = loss.double_value(&[]) as f32;
        if !value.is_finite() {
            bail!("the diffusion loss became {value} at step {step}");
        }
        state.report.diffusion_losses.push(value);
        state.step += 1;
        report_progress(&bar, &state.report.diffusion_losses, state.step);
        if state.step.is_multiple_of(CHECKPOINT_EVERY) || state.step == total || budget.spent() {
            state.report.diffusion_seconds = seconds_before + started.elapsed().as_secs_f64();
            for (vs, name) in [
                (models.text.var_store(), "text_encoder"),
                (models.unet.var_store(), "unet"),
                (models.ema_text.var_store(), "ema_text_encoder"),
                (models.ema_unet.var_store(), "ema_unet"),
            ] {
                save(vs, &checkpoints.join(format!("{name}.safetensors")))?;
            }
            save_state(state, checkpoints)?;
        }
    }
    bar.finish();
    Ok(())
}

fn progress(stage: &str, total: usize, done: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{stage:>9} [{{bar:30}}] {{pos}}/{{len}} {{msg}} {{elapsed_precise}} (eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(done as u64);
    bar
}

/// Shows the mean loss of the last 50 steps; off a terminal, prints it every 100 steps.
fn report_progress(bar: &ProgressBar, losses: &[f32], step: usize) {
    let recent = &losses[losses.len().saturating_sub(50)..];
    let mean = recent.iter().sum::<f32>() / recent.len().max(1) as f32;
    bar.set_message(format!("loss {mean:.5}"));
    bar.set_position(step as u64);
    if !std::io::stderr().is_terminal() && step.is_multiple_of(100) {
        eprintln!(
            "step {step}/{}: loss {mean:.5}",
            bar.length().unwrap_or_default()
        );
    }
}

fn save(vs: &VarStore, path: &Path) -> anyhow::Result<()> {
    vs.save(path)
        .with_context(|| format!("writing checkpoint {}", path.display()))
}

/// Copies a checkpoint's tensors into `vs`, by name; every variable must be there.
fn restore(vs: &VarStore, path: &Path) -> anyhow::Result<()> {
    let saved: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .with_context(|| format!("reading checkpoint {}", path.display()))?
        .into_iter()
        .collect();
    tch::no_grad(|| -> anyhow::Result<()> {
        for (name, var) in vs.variables() {
            let value = saved
                .get(&name)
                .with_context(|| format!("{} has no tensor {name}", path.display()))?;
            var.shallow_clone().f_copy_(value)?;
        }
        Ok(())
    })
}

fn save_state(state: &State, checkpoints: &Path) -> anyhow::Result<()> {
    let path = checkpoints.join("state.json");
    let tmp = checkpoints.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_string(state)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

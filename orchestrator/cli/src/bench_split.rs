//! `sd bench split`: what the gRPC split costs per denoising step, against calling the same
//! U-Net in-process.
//!
//! One process holds two copies of the U-Net: one called directly (as a monolithic pipeline
//! would: latents in, guided prediction out, the text context already on the device), and one
//! behind the denoiser stage's gRPC server on loopback, reached through the orchestrator's own
//! stage client (replica picking, trace propagation, the conditioning cache: the context is
//! sent with the first step only), with the steps on one `DenoiseSteps` stream as a generation
//! sends them, or as unary Denoise calls with `--unary` (what a client in another language
//! that calls Denoise pays). The two paths take turns in runs of consecutive steps, so
//! drift in the machine's speed hits both alike while each path sees what a generation sees:
//! its next step follows the last one at once, not after a whole step of the other path
//! (which would leave the denoiser's threads idle for a U-Net step before every request, a
//! wait no generation has). Each path's own U-Net time is subtracted from its step time, which
//! leaves what the path adds around the model; the split's cost is the gRPC path's addition
//! minus the in-process one's. Subtracting the measured compute keeps the U-Net's run-to-run
//! noise out of the figure, so a CPU run gives the overhead a GPU host would see, up to the
//! host-to-device copies of the latent (64 KiB for SD 1.5 at 512x512). With `--denoiser URL`
//! the gRPC path goes to a running denoiser stage instead (another process or host), which
//! times the split as deployed.

use anyhow::Context;
use sd_denoiser::{
    cache::{CacheConfig, ContextCache},
    model::{Model, Step},
};
use sd_models::{
    device::{DTypeSpec, DeviceSpec},
    unet_2d_condition::UNet2DConditionModel,
};
use sd_orchestrator::{
    stages::{self, Stage, Timeouts},
    steps::StepStream,
};
use sd_proto::stage::{
    DenoiseRequest, DenoiserServiceInfoRequest, DenoiserServiceInfoResponse, Tensor as WireTensor,
};
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};
use tch::{Device, Kind, Tensor};

#[derive(Debug, clap::Args)]
pub struct SplitArgs {
    /// Model folder (diffusers layout; `unet/` and `scheduler/` are read).
    #[arg(long, env = "SD_MODEL")]
    model: PathBuf,
    /// Image side in pixels (the latent is this over the VAE factor; SD 1.5's is 512).
    #[arg(long, default_value_t = 512)]
    size: u32,
    /// Text context length in tokens.
    #[arg(long, default_value_t = 77)]
    tokens: i64,
    /// Classifier-free guidance scale (guided steps run uncond and cond rows together).
    #[arg(long, default_value_t = 7.5)]
    guidance: f32,
    /// Untimed step pairs first.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Timed step pairs (one in-process step and one gRPC step each).
    #[arg(long, default_value_t = 20)]
    iters: u32,
    /// Consecutive steps each path takes before the other takes over, as a generation calls
    /// the denoiser step after step. 1 alternates every step, which leaves the denoiser idle
    /// for a whole in-process step before each request.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    run: u32,
    /// Milliseconds the denoiser started here waits to batch a step with others (0: a lone
    /// step runs at once; the stage's default is 5).
    #[arg(long, default_value_t = 0)]
    batch_wait_ms: u64,
    /// Time a running denoiser stage at this URL (another process, another host: the split as
    /// deployed) instead of starting one in this process. It must serve the same U-Net as
    /// `--model` (checked by revision); `--batch-wait-ms` is then its own.
    #[arg(long)]
    denoiser: Option<String>,
    /// Send each step as a unary Denoise call instead of on a step stream.
    #[arg(long)]
    unary: bool,
    /// GPU step times (ms) to express the overhead against; the defaults are the guided SD 1.5
    /// U-Net step on an H100 in `shared/GPU.md`: eager, and with CUDA graphs.
    #[arg(long, value_delimiter = ',', default_value = "25.0,7.6")]
    gpu_step_ms: Vec<f64>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// f32, f16 or bf16 (half precision needs CUDA).
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    dtype: DTypeSpec,
}

/// One timed step: its wall time and the U-Net's share of it (and the denoiser's queue wait).
#[derive(Debug, Clone, Copy)]
struct Sample {
    total: f64,
    unet: f64,
    queue: f64,
}

impl Sample {
    fn around(&self) -> f64 {
        self.total - self.unet
    }
}

pub async fn run(a: SplitArgs) -> anyhow::Result<()> {
    a.device.check_available().map_err(anyhow::Error::msg)?;
    a.dtype.check_device(a.device).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(a.iters > 0, "--iters must be at least 1");
    let f = crate::bench::vae_factor(&a.model)?;
    anyhow::ensure!(
        a.size.is_multiple_of(f),
        "--size must be a multiple of the VAE factor {f}"
    );
    let unet_dir = a.model.join("unet");
    let unet = UNet2DConditionModel::load(&unet_dir, a.device.0, a.dtype.0)
        .with_context(|| format!("loading {}", unet_dir.display()))?;
    let c = unet.config();
    let side = i64::from(a.size / f);
    let shape = [1, c.in_channels as i64, side, side];
    let width = c.cross_attention_dim as i64;
    let local = Model {
        unet,
        device: a.device.0,
        cache: Arc::new(ContextCache::new(CacheConfig {
            max_bytes: 0,
            ttl: Duration::ZERO,
        })),
    };

    tch::manual_seed(0);
    let cpu = (Kind::Float, Device::Cpu);
    let latent: Vec<f32> = Vec::try_from(Tensor::randn([shape.iter().product::<i64>()], cpu))?;
    let context = Tensor::randn([2, a.tokens, width], cpu);
    let context_values: Vec<f32> = Vec::try_from(context.flatten(0, -1))?;
    // The in-process pipeline keeps its context on the device for the whole generation.
    let device_context = context
        .to_kind(local.unet.kind())
        .to_device(a.device.0)
        .contiguous();

    let (denoiser, _server) = match &a.denoiser {
        Some(url) => (connect_remote(url, &a.model).await?, None),
        None => {
            let (client, server) = start_denoiser(&a).await?;
            (client, Some(server))
        }
    };
    let context_id = format!("bench-split-{}", std::process::id());
    let request = |t: f32, with_context: bool| DenoiseRequest {
        sample: Some(WireTensor::from_f32(&shape, &latent)),
        timesteps: Some(WireTensor::from_f32(&[1], &[t])),
        encoder_hidden_states: with_context
            .then(|| WireTensor::from_f32(&[2, a.tokens, width], &context_values)),
        guidance_scale: vec![a.guidance],
        guidance_rescale: vec![],
        context_id: context_id.clone(),
    };

    let in_process = |t: f32| -> anyhow::Result<Sample> {
        let started = Instant::now();
        let step = Step {
            sample: Tensor::from_slice(&latent).view(shape),
            timesteps: Tensor::from_slice(&[t]),
            context: device_context.shallow_clone(),
            guidance: Some(Tensor::from_slice(&[a.guidance])),
            rescale: None,
            cache_as: None,
        };
        let unet_started = Instant::now();
        let out = local.denoise(std::slice::from_ref(&step))?;
        let unet = unet_started.elapsed();
        let values: Vec<f32> = Vec::try_from(out[0].flatten(0, -1))?;
        anyhow::ensure!(values.len() == latent.len(), "in-process output size");
        Ok(Sample {
            total: started.elapsed().as_secs_f64(),
            unet: unet.as_secs_f64(),
            queue: 0.0,
        })
    };
    let numel = latent.len();
    let steps = StepStream::new(None);
    let over_grpc = |t: f32, with_context: bool| {
        let step = request(t, with_context);
        let denoiser = denoiser.clone();
        let steps = &steps;
        async move {
            let started = Instant::now();
            let (response, _) = if a.unary {
                denoiser
                    .call("denoise", None, |ch, timeout| {
                        let step = step.clone();
                        async move {
                            stages::denoiser(ch)
                                .denoise(stages::request(step, timeout))
                                .await
                        }
                    })
                    .await?
            } else {
                denoiser
                    .call_on("denoise", None, None, |replica, ch, timeout| {
                        steps.step(replica, ch, &step, None, timeout)
                    })
                    .await?
            };
            let values = response
                .model_output
                .context("denoiser: response without model_output")?
                .to_f32_vec("model_output")?;
            anyhow::ensure!(values.len() == numel, "gRPC output size");
            anyhow::ensure!(
                response.context_cached,
                "the denoiser did not cache the context"
            );
            Ok::<_, anyhow::Error>(Sample {
                total: started.elapsed().as_secs_f64(),
                unet: response.compute_seconds,
                queue: response.queue_wait_seconds,
            })
        }
    };

    // The first gRPC step carries the context; every later one names it by id.
    over_grpc(999.0, true).await?;
    let (mut local_runs, mut grpc_runs) = (Vec::new(), Vec::new());
    let timestep = |i: u32| 999.0 - (i % 50) as f32 * 20.0;
    let steps = a.warmup + a.iters;
    for first in (0..steps).step_by(a.run as usize) {
        let run = first..(first + a.run).min(steps);
        let local: Vec<Sample> = run
            .clone()
            .map(|i| in_process(timestep(i)))
            .collect::<anyhow::Result<_>>()?;
        for (i, l) in run.zip(local) {
            let g = over_grpc(timestep(i), false).await?;
            if i >= a.warmup {
                local_runs.push(l);
                grpc_runs.push(g);
            }
        }
    }
    report(&a, &shape, width, &local_runs, &grpc_runs);

    // What an empty call costs, back to back and after the threads sat idle for as long as
    // this U-Net's step and each GPU step: the difference is the host's cost of waking parked
    // threads, which the compute forces on every step of the split (how long they sleep can
    // decide how deeply, hence the GPU step times).
    let unet_idle =
        Duration::from_secs_f64(Stats::of(grpc_runs.iter().map(|s| s.unet).collect()).median);
    let busy = empty_calls(&denoiser, Duration::ZERO).await?;
    println!(
        "empty call (Info) round trip: back to back median {:.3} ms (p10 {:.3}, p90 {:.3})",
        busy.median, busy.p10, busy.p90,
    );
    let gpu_idles = a
        .gpu_step_ms
        .iter()
        .map(|ms| Duration::from_secs_f64(ms / 1000.0));
    for idle in std::iter::once(unet_idle).chain(gpu_idles) {
        let rested = empty_calls(&denoiser, idle).await?;
        println!(
            "  after {:.1} ms idle: median {:.3} ms (p10 {:.3}, p90 {:.3})",
            idle.as_secs_f64() * 1000.0,
            rested.median,
            rested.p10,
            rested.p90
        );
    }
    Ok(())
}

/// One Info call: a round trip with nothing to compute.
async fn info(denoiser: &Stage) -> Result<DenoiserServiceInfoResponse, tonic::Status> {
    denoiser
        .call("info", None, |ch, timeout| async move {
            stages::denoiser(ch)
                .info(stages::request(DenoiserServiceInfoRequest {}, timeout))
                .await
        })
        .await
        .map(|(info, _)| info)
}

/// Times 50 Info calls through the stage client, each after `idle`.
async fn empty_calls(denoiser: &Stage, idle: Duration) -> anyhow::Result<Stats> {
    let mut times = Vec::new();
    for _ in 0..50 {
        if !idle.is_zero() {
            tokio::time::sleep(idle).await;
        }
        let started = Instant::now();
        info(denoiser).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Stats::of(times))
}

/// Serves the denoiser stage on a loopback port and returns the orchestrator's client for it
/// once the model is loaded (and the server task, which stops with the process).
async fn start_denoiser(
    a: &SplitArgs,
) -> anyhow::Result<(Arc<Stage>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stage = sd_runtime::StageArgs {
        model: a.model.clone(),
        model_id: None,
        device: a.device,
        dtype: a.dtype,
        max_queue: 64,
    };
    let batch = sd_denoiser::BatchArgs {
        max_batch: 16,
        batch_wait_ms: a.batch_wait_ms,
        ..Default::default()
    };
    let server = tokio::spawn(sd_denoiser::run(
        stage,
        batch,
        listener,
        std::future::pending(),
    ));
    let client = stage_client(&url).await?;
    let started = Instant::now();
    loop {
        match info(&client).await {
            Ok(_) => return Ok((client, server)),
            Err(e) if started.elapsed() > Duration::from_secs(600) => {
                anyhow::bail!("the denoiser did not come up: {e}")
            }
            Err(_) if server.is_finished() => {
                return Err(server
                    .await?
                    .err()
                    .unwrap_or_else(|| anyhow::anyhow!("the denoiser stopped before serving")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The orchestrator's stage client for one denoiser at `url`.
async fn stage_client(url: &str) -> anyhow::Result<Arc<Stage>> {
    Ok(Stage::connect(
        "denoiser",
        url,
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(600),
            resolve_interval: Duration::from_secs(3600),
        },
    )
    .await?)
}

/// A client for the running denoiser at `url`, once it is seen to serve `model`'s U-Net.
async fn connect_remote(url: &str, model: &std::path::Path) -> anyhow::Result<Arc<Stage>> {
    let client = stage_client(url).await?;
    let info = info(&client)
        .await
        .with_context(|| format!("--denoiser {url}"))?;
    let theirs = info.model.map(|m| m.revision).unwrap_or_default();
    let ours = sd_runtime::revision(&model.join("unet"));
    anyhow::ensure!(
        theirs == ours,
        "--denoiser {url} serves U-Net revision {theirs:?}, but --model {} is revision {ours:?}: \
         the two paths must run the same U-Net",
        model.display()
    );
    Ok(client)
}

fn report(a: &SplitArgs, shape: &[i64; 4], width: i64, local: &[Sample], grpc: &[Sample]) {
    let ms = |xs: Vec<f64>| Stats::of(xs.into_iter().map(|x| x * 1000.0).collect());
    println!(
        "machine: {} ({} threads for libtorch), {} {}",
        crate::bench::cpu_model(),
        tch::get_num_threads(),
        a.device,
        a.dtype
    );
    let denoiser = match &a.denoiser {
        Some(url) => format!("the denoiser at {url}"),
        None => format!(
            "a denoiser in this process on loopback, batch wait {} ms",
            a.batch_wait_ms
        ),
    };
    println!(
        "guided step: latent {shape:?} f32 ({} KiB each way), context [2, {}, {width}] cached \
         on the denoiser after the first step; {} step pairs after {} warm-up, in runs of {} \
         steps per path; {denoiser}; {}",
        shape.iter().product::<i64>() * 4 / 1024,
        a.tokens,
        a.iters,
        a.warmup,
        a.run,
        if a.unary {
            "each step a unary Denoise call"
        } else {
            "the steps on one DenoiseSteps stream"
        },
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "ms per step", "median", "p10", "p90"
    );
    let of = |xs: &[Sample], f: fn(&Sample) -> f64| ms(xs.iter().map(f).collect());
    let rows = [
        ("in-process: step", of(local, |s| s.total)),
        ("in-process: U-Net", of(local, |s| s.unet)),
        ("in-process: around the U-Net", of(local, Sample::around)),
        ("gRPC: step", of(grpc, |s| s.total)),
        ("gRPC: U-Net (denoiser's compute)", of(grpc, |s| s.unet)),
        ("gRPC: denoiser queue", of(grpc, |s| s.queue)),
        ("gRPC: around the U-Net", of(grpc, Sample::around)),
    ];
    for (name, s) in &rows {
        println!("{name:<34} {:>9.3} {:>9.3} {:>9.3}", s.median, s.p10, s.p90);
    }
    let split = ms(local
        .iter()
        .zip(grpc)
        .map(|(l, g)| g.around() - l.around())
        .collect());
    println!(
        "split cost per step (gRPC around - in-process around, per pair): median {:.3} ms \
         (p10 {:.3}, p90 {:.3})",
        split.median, split.p10, split.p90
    );
    for step in &a.gpu_step_ms {
        println!(
            "  = {:.2}% of a {step} ms GPU step",
            100.0 * split.median / step
        );
    }
}

/// Median and 10th/90th percentiles (nearest rank).
struct Stats {
    median: f64,
    p10: f64,
    p90: f64,
}

impl Stats {
    fn of(mut xs: Vec<f64>) -> Self {
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
        Self {
            median: at(0.5),
            p10: at(0.1),
            p90: at(0.9),
        }
    }
}

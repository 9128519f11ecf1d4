//! `sd bench serve`: the whole service under load. Starts the stages and the orchestrator in
//! this process (gRPC over loopback, exactly as `--local`), then runs generations at each
//! concurrency level, with the denoiser's step batching on and off and its conditioning cache
//! on and off, and reports throughput, latency, per-stage time, the per-step cost of the gRPC
//! split (round trip minus the denoiser's own queue and compute time) and the Denoise request
//! bytes sent per step.

use crate::local::Cluster;
use sd_proto::v1::{
    GenerateRequest, StageTimings, image_generation_service_client::ImageGenerationServiceClient,
};
use std::{path::PathBuf, sync::Arc, time::Instant};
use tokio::sync::Semaphore;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Model folder (diffusers layout).
    #[arg(long, env = "SD_MODEL")]
    model: PathBuf,
    /// Concurrency levels: generations in flight at once.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Generations per level (at least the concurrency).
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Denoising steps per generation.
    #[arg(long, default_value_t = 10)]
    steps: u32,
    /// Image width and height (the model's native size when absent).
    #[arg(long)]
    size: Option<u32>,
    /// Denoiser batch limit when batching is on (U-Net rows).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    dtype: String,
    /// Batching settings to run: `on` (denoiser --max-batch, text encoder and VAE their
    /// default, 5 ms wait), `off` (1 row per forward in every stage, no wait).
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    batching: Vec<Toggle>,
    /// Conditioning cache settings to run: `on` (the denoiser's default budget), `off`
    /// (budget 0: every step carries the text context).
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    context_cache: Vec<Toggle>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Toggle {
    On,
    Off,
}

/// What one level measured.
struct Level {
    concurrency: usize,
    seconds: f64,
    images: usize,
    latency: f64,
    timings: StageTimings,
}

pub async fn run(a: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.steps > 0, "--steps must be at least 1");
    println!(
        "machine: {} ({} threads for libtorch)",
        crate::bench::cpu_model(),
        tch::get_num_threads()
    );
    println!(
        "model: {}  steps: {}  requests per level: {}",
        a.model.display(),
        a.steps,
        a.requests
    );
    let mut runs = Vec::new();
    for &batching in &a.batching {
        for &cache in &a.context_cache {
            runs.push((batching, cache));
        }
    }
    for (batching, cache) in runs {
        let (label, max_batch, wait_ms) = match batching {
            Toggle::On => ("on", a.max_batch, 5),
            Toggle::Off => ("off", 1, 0),
        };
        let batch = sd_denoiser::BatchArgs {
            max_batch,
            batch_wait_ms: wait_ms,
            context_cache_bytes: match cache {
                Toggle::On => sd_denoiser::DEFAULT_CONTEXT_CACHE_BYTES,
                Toggle::Off => 0,
            },
            ..Default::default()
        };
        // The text encoder and VAE batch (or not) with the denoiser.
        let stage_batch = sd_runtime::BatchArgs {
            max_batch: if max_batch > 1 {
                sd_runtime::BatchArgs::default().max_batch
            } else {
                1
            },
            batch_wait_ms: wait_ms,
        };
        let cluster =
            Cluster::start_with(&a.model, &a.device, &a.dtype, batch.clone(), stage_batch).await?;
        let channel = tonic::transport::Endpoint::from_shared(cluster.orchestrator_url())?
            .connect()
            .await?;
        let client = ImageGenerationServiceClient::new(channel)
            .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
        // Warm-up generation (first-call allocations), not counted.
        client.clone().generate(request(&a, 0)).await?;
        println!(
            "\nbatching {label} (max batch {max_batch} rows, wait {wait_ms} ms), context cache {}",
            match cache {
                Toggle::On => format!("on ({} MiB)", batch.context_cache_bytes >> 20),
                Toggle::Off => "off".into(),
            }
        );
        println!(
            "{:>5} {:>10} {:>11} {:>10} {:>10} {:>10} {:>10} {:>12} {:>11} {:>7}",
            "conc",
            "images/s",
            "latency s",
            "encode s",
            "denoise s",
            "decode s",
            "queue s",
            "grpc ms/step",
            "req B/step",
            "misses"
        );
        for &c in &a.concurrency {
            let before = sd_orchestrator::steps::denoise_traffic();
            let level = level(&a, &client, c).await?;
            let after = sd_orchestrator::steps::denoise_traffic();
            let t = &level.timings;
            let n = level.images as f64;
            let steps = f64::from(a.steps) * n;
            let overhead =
                (t.denoise_seconds - t.denoiser_queue_seconds - t.denoiser_compute_seconds) / steps
                    * 1e3;
            let bytes_per_step = (after.request_bytes - before.request_bytes) as f64 / steps;
            println!(
                "{:>5} {:>10.3} {:>11.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>12.2} {:>11.0} {:>7}",
                level.concurrency,
                n / level.seconds,
                level.latency / n,
                t.encode_seconds / n,
                t.denoise_seconds / n,
                t.decode_seconds / n,
                t.denoiser_queue_seconds / n,
                overhead,
                bytes_per_step,
                after.context_misses - before.context_misses,
            );
        }
        cluster.stop().await;
    }
    Ok(())
}

fn request(a: &ServeArgs, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red circle on a blue background".into(),
        negative_prompt: "blurry".into(),
        width: a.size,
        height: a.size,
        steps: Some(a.steps),
        seed: Some(seed),
        ..Default::default()
    }
}

/// Runs `a.requests` generations with `c` in flight; sums their timings.
async fn level(
    a: &ServeArgs,
    client: &ImageGenerationServiceClient<tonic::transport::Channel>,
    c: usize,
) -> anyhow::Result<Level> {
    let permits = Arc::new(Semaphore::new(c.max(1)));
    let total = a.requests.max(c);
    let started = Instant::now();
    let mut runs = Vec::with_capacity(total);
    for i in 0..total {
        let permit = permits.clone().acquire_owned().await?;
        let mut client = client.clone();
        let req = request(a, 1 + i as u64);
        runs.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = client.generate(req).await;
            drop(permit);
            r.map(|r| (r.into_inner(), t0.elapsed().as_secs_f64()))
        }));
    }
    let mut sum = StageTimings::default();
    let (mut latency, mut images) = (0.0, 0);
    for run in runs {
        let (response, seconds) = run.await??;
        latency += seconds;
        images += response.images.len();
        let t = response.timings.unwrap_or_default();
        sum.encode_seconds += t.encode_seconds;
        sum.denoise_seconds += t.denoise_seconds;
        sum.decode_seconds += t.decode_seconds;
        sum.total_seconds += t.total_seconds;
        sum.denoiser_queue_seconds += t.denoiser_queue_seconds;
        sum.denoiser_compute_seconds += t.denoiser_compute_seconds;
    }
    Ok(Level {
        concurrency: c,
        seconds: started.elapsed().as_secs_f64(),
        images,
        latency,
        timings: sum,
    })
}

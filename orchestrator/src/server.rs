//! The orchestrator process: flags, stage connections, health and the public service.

use crate::{
    pipeline::Pipeline,
    request::Limits,
    service::ImageGeneration,
    stages::{Stage, Timeouts},
};
use sd_proto::{service_names, v1::image_generation_service_server::ImageGenerationServiceServer};
use sd_server::Health;
use std::{future::Future, sync::Arc, time::Duration};
use tokio::net::TcpListener;

/// Command line of `sd-orchestrator`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "sd-orchestrator",
    version,
    about = "Public image-generation API over the model stages (gRPC)"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "SD_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub orchestrator: OrchestratorArgs,
    #[command(flatten)]
    pub log: sd_server::LogArgs,
}

/// Everything but the listen address and logging, so `sd generate --local` can reuse it.
#[derive(Debug, Clone, clap::Args)]
pub struct OrchestratorArgs {
    /// Text-encoder stage: comma-separated `http://host:port` endpoints, or one name that
    /// resolves to several (a Kubernetes headless Service).
    #[arg(
        long,
        env = "SD_TEXT_ENCODER",
        default_value = "http://127.0.0.1:50061"
    )]
    pub text_encoder: String,
    /// Denoiser (U-Net) stage endpoints, as for --text-encoder.
    #[arg(long, env = "SD_DENOISER", default_value = "http://127.0.0.1:50062")]
    pub denoiser: String,
    /// VAE stage endpoints, as for --text-encoder.
    #[arg(long, env = "SD_VAE", default_value = "http://127.0.0.1:50063")]
    pub vae: String,
    /// Seconds to wait for a connection to a stage before calling it unavailable.
    #[arg(long, env = "SD_CONNECT_TIMEOUT", default_value_t = 3.0)]
    pub connect_timeout: f64,
    /// Seconds one stage call (one denoising step, one decode) may take.
    #[arg(long, env = "SD_STAGE_TIMEOUT", default_value_t = 300.0)]
    pub stage_timeout: f64,
    /// Seconds between re-resolutions of stage names and endpoint files.
    #[arg(long, env = "SD_RESOLVE_INTERVAL", default_value_t = 10.0)]
    pub resolve_interval: f64,
    /// Generations run at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_MAX_CONCURRENT_GENERATIONS", default_value_t = 32)]
    pub max_concurrent_generations: usize,
    #[command(flatten)]
    pub limits: Limits,
}

impl OrchestratorArgs {
    fn timeouts(&self) -> anyhow::Result<Timeouts> {
        let secs = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(anyhow::anyhow!(
                    "--{name}: {v} is not a positive number of seconds"
                ))
            }
        };
        Ok(Timeouts {
            connect: secs("connect-timeout", self.connect_timeout)?,
            request: secs("stage-timeout", self.stage_timeout)?,
            resolve_interval: secs("resolve-interval", self.resolve_interval)?,
        })
    }
}

/// Serves the public API on `listener` until `shutdown` resolves. Health turns SERVING once
/// every stage has answered its Info and the stages agree with each other (and the replicas of
/// each stage on the model revision); it stays NOT_SERVING while they disagree.
pub async fn run(
    args: OrchestratorArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let timeouts = args.timeouts()?;
    let pipeline = Arc::new(Pipeline::new(
        Stage::connect("text-encoder", &args.text_encoder, timeouts).await?,
        Stage::connect("denoiser", &args.denoiser, timeouts).await?,
        Stage::connect("vae", &args.vae, timeouts).await?,
    ));
    let maintainers: Vec<_> = [&pipeline.text_encoder, &pipeline.denoiser, &pipeline.vae]
        .into_iter()
        .map(|stage| tokio::spawn(stage.clone().maintain()))
        .collect();
    let (health, health_service) = Health::new(service_names::IMAGE_GENERATION).await;
    let watcher = tokio::spawn(wait_for_stages(pipeline.clone(), health.clone()));
    let service = ImageGenerationServiceServer::new(ImageGeneration::new(
        pipeline,
        args.limits,
        args.max_concurrent_generations,
    ))
    .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
    let router =
        sd_server::router(service_names::IMAGE_GENERATION, health_service)?.add_service(service);
    let served = sd_server::serve(router, listener, health, shutdown).await;
    watcher.abort();
    for task in maintainers {
        task.abort();
    }
    served
}

/// Polls the stages until they are ready and compatible, then reports SERVING. Stages or
/// replicas that disagree (FAILED_PRECONDITION) are logged as errors: the service refuses to
/// serve until they are fixed.
async fn wait_for_stages(pipeline: Arc<Pipeline>, health: Health) {
    let mut last_error = String::new();
    loop {
        match pipeline.models().await {
            Ok(_) => {
                health.set_serving().await;
                tracing::info!("all stages ready: serving");
                return;
            }
            Err(status) => {
                if status.message() != last_error {
                    if status.code() == tonic::Code::FailedPrecondition {
                        tracing::error!("refusing to serve: {}", status.message());
                    } else {
                        tracing::info!("waiting for stages: {}", status.message());
                    }
                    last_error = status.message().to_string();
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

//! The denoiser stage: the U-Net noise predictor behind `sd.stage.v1.DenoiserService`.
//!
//! Each Denoise call is one step for a batch of samples, each at its own timestep, and carries
//! its text context, so any replica can serve any step. Classifier-free guidance is fused:
//! the unconditional and conditional halves run as one U-Net batch and the guided prediction
//! is returned (half the bytes back, one round trip). Concurrent calls are batched into one
//! U-Net forward ([`sd_runtime::batcher`], bucketed by [`model::Step`]'s key). DenoiseSteps
//! serves the same steps as messages on one stream, one after another: a caller that sends
//! many steps in a row (the orchestrator's generations) saves a call's per-step cost.
//!
//! A call may name its context with a `context_id`; the context is then kept on the device in
//! a bounded conditioning cache ([`cache`]) and later steps of the generation send the id
//! alone. A replica that does not hold an id answers FAILED_PRECONDITION with
//! `sd-context-miss` and the caller re-sends the context, so any replica still serves any step.

pub mod cache;
pub mod model;

use cache::{CacheConfig, ContextCache};
use model::{Model, Step};
use sd_models::unet_2d_condition::UNet2DConditionModel;
use sd_proto::{
    context_cache, service_names,
    stage::{
        DataType, DenoiseRequest, DenoiseResponse, DenoiseStepsRequest, DenoiseStepsResponse,
        DenoiserServiceInfoRequest, DenoiserServiceInfoResponse,
        denoiser_service_server::{DenoiserService, DenoiserServiceServer},
    },
};
use sd_runtime::{
    StageArgs,
    batcher::{BatchConfig, Batcher},
    stage::serve_stage,
    status, wire,
};
use sd_server::Health;
use std::{
    future::Future,
    sync::{Arc, OnceLock},
};
use tch::Tensor;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::Instrument;

const STAGE: &str = "denoiser";
/// Largest batch (samples, before the CFG doubling) one call may carry.
pub const MAX_BATCH: i64 = 64;

/// Command line of `sd-denoiser`.
#[derive(Debug, clap::Parser)]
#[command(name = "sd-denoiser", version, about = "U-Net denoiser stage (gRPC)")]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "SD_LISTEN", default_value = "0.0.0.0:50062")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub stage: StageArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub log: sd_server::LogArgs,
}

/// Default byte budget of the conditioning cache: 256 MiB holds ~1100 SD 1.5 guided contexts
/// in f16 (2x77x768x2 bytes = 231 KiB each), ~550 in f32.
pub const DEFAULT_CONTEXT_CACHE_BYTES: u64 = 256 * 1024 * 1024;
/// Default time-to-live of a cached context, counted from its last use.
pub const DEFAULT_CONTEXT_CACHE_TTL_SECS: u64 = 300;

/// Step batching and conditioning cache flags.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Most U-Net rows per forward (a guided sample counts twice); 1 disables batching.
    #[arg(long, env = "SD_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// Milliseconds the first step of a batch waits for steps of other generations.
    #[arg(long, env = "SD_BATCH_WAIT_MS", default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// Byte budget of the conditioning cache (text contexts kept on the device by
    /// `context_id`, least recently used evicted first); 0 disables it.
    #[arg(long, env = "SD_CONTEXT_CACHE_BYTES", default_value_t = DEFAULT_CONTEXT_CACHE_BYTES)]
    pub context_cache_bytes: u64,
    /// Seconds a cached context may go unused before it is dropped.
    #[arg(long, env = "SD_CONTEXT_CACHE_TTL_SECS", default_value_t = DEFAULT_CONTEXT_CACHE_TTL_SECS)]
    pub context_cache_ttl_secs: u64,
}

impl Default for BatchArgs {
    fn default() -> Self {
        Self {
            max_batch: 16,
            batch_wait_ms: 5,
            context_cache_bytes: DEFAULT_CONTEXT_CACHE_BYTES,
            context_cache_ttl_secs: DEFAULT_CONTEXT_CACHE_TTL_SECS,
        }
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct Denoiser {
    batcher: Batcher<Step, Tensor, Status>,
    metrics: sd_server::telemetry::metrics::Stage,
    info: Arc<OnceLock<DenoiserServiceInfoResponse>>,
    cache: Arc<ContextCache>,
}

/// Bytes per element of the model's dtype (what a cached context occupies per element).
fn model_element_bytes(info: &DenoiserServiceInfoResponse) -> u64 {
    let dtype = info.model.as_ref().map(|m| m.dtype).unwrap_or_default();
    match DataType::try_from(dtype) {
        Ok(DataType::Float16 | DataType::Bfloat16) => 2,
        _ => 4,
    }
}

impl Denoiser {
    /// Checks every tensor against the model's shapes before any libtorch call, and resolves
    /// the context: the one sent, or the one cached under `context_id`. Also says whether the
    /// context is (or will be, once the step runs) cached under the call's id.
    fn validate(
        &self,
        req: &DenoiseRequest,
        info: &DenoiserServiceInfoResponse,
    ) -> Result<(Step, bool), Status> {
        let sample = req
            .sample
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("sample: missing"))?;
        let ch = i64::from(info.in_channels);
        sample
            .validate_shape(
                "sample",
                "[B, C, H, W]",
                &[
                    ("batch", None),
                    ("channels", Some(ch)),
                    ("height", None),
                    ("width", None),
                ],
            )
            .map_err(status::tensor)?;
        sample
            .require_dtype(
                "sample",
                &[DataType::Float32, DataType::Float16, DataType::Bfloat16],
            )
            .map_err(status::tensor)?;
        let b = sample.shape[0];
        if b > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "sample: batch {b} above the maximum {MAX_BATCH}"
            )));
        }
        let timesteps = req
            .timesteps
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("timesteps: missing"))?;
        timesteps
            .validate_shape("timesteps", "[B]", &[("batch", Some(b))])
            .map_err(status::tensor)?;
        let t_values = timesteps.to_f32_vec("timesteps").map_err(status::tensor)?;
        if let Some(t) = t_values.iter().find(|t| !t.is_finite() || **t < 0.0) {
            return Err(Status::invalid_argument(format!(
                "timesteps: {t} is not a finite, non-negative timestep"
            )));
        }
        let guided = !req.guidance_scale.is_empty();
        if guided && req.guidance_scale.len() as i64 != b {
            return Err(Status::invalid_argument(format!(
                "guidance_scale: {} values for a batch of {b}",
                req.guidance_scale.len()
            )));
        }
        if !req.guidance_rescale.is_empty() {
            if !guided || req.guidance_rescale.len() as i64 != b {
                return Err(Status::invalid_argument(format!(
                    "guidance_rescale: {} values, expected one per sample ({b}) and guidance_scale set",
                    req.guidance_rescale.len()
                )));
            }
            if let Some(r) = req
                .guidance_rescale
                .iter()
                .find(|r| !(0.0..=1.0).contains(*r))
            {
                return Err(Status::invalid_argument(format!(
                    "guidance_rescale: {r} is outside [0, 1]"
                )));
            }
        }
        if let Some(g) = req.guidance_scale.iter().find(|g| !g.is_finite()) {
            return Err(Status::invalid_argument(format!(
                "guidance_scale: {g} is not finite"
            )));
        }
        let rows = if guided { 2 * b } else { b };
        let width = i64::from(info.cross_attention_dim);
        let id = req.context_id.as_str();
        if !id.is_empty() {
            context_cache::validate_id(id).map_err(Status::invalid_argument)?;
        }
        let (context, cache_as, cached) = match &req.encoder_hidden_states {
            Some(context) => {
                let context = self.validate_context(context, guided, rows, width)?;
                let bytes = context.numel() as u64 * model_element_bytes(info);
                let cache_as = (!id.is_empty() && self.cache.admits(bytes)).then(|| id.to_string());
                let cached = cache_as.is_some();
                (context, cache_as, cached)
            }
            None if id.is_empty() => {
                return Err(Status::invalid_argument(
                    "encoder_hidden_states: missing (and no context_id naming a cached context)",
                ));
            }
            None => {
                let Some(context) = self.cache.get(id) else {
                    let s = self.cache.stats();
                    tracing::info!(
                        context_id = id,
                        hits = s.hits,
                        misses = s.misses,
                        evictions = s.evictions,
                        expirations = s.expirations,
                        entries = s.entries,
                        bytes = s.bytes,
                        "context cache miss: the caller re-sends the context"
                    );
                    return Err(context_cache::miss(id));
                };
                let size = context.size();
                if size.len() != 3 || size[0] != rows || size[2] != width {
                    return Err(Status::invalid_argument(format!(
                        "context_id {id:?}: the cached context has shape {size:?}, this call                          needs [{rows}, T, {width}]"
                    )));
                }
                (context, None, true)
            }
        };
        Ok((
            Step {
                sample: wire::to_tch(sample, "sample").map_err(status::tensor)?,
                timesteps: Tensor::from_slice(&t_values),
                context,
                guidance: guided.then(|| Tensor::from_slice(&req.guidance_scale)),
                rescale: (!req.guidance_rescale.is_empty())
                    .then(|| Tensor::from_slice(&req.guidance_rescale)),
                cache_as,
            },
            cached,
        ))
    }

    /// Checks a context sent on the wire and copies it into a CPU tensor.
    fn validate_context(
        &self,
        context: &sd_proto::stage::Tensor,
        guided: bool,
        rows: i64,
        width: i64,
    ) -> Result<Tensor, Status> {
        context
            .validate_shape(
                "encoder_hidden_states",
                if guided {
                    "[2B, T, D] (unconditional rows first)"
                } else {
                    "[B, T, D]"
                },
                &[
                    ("rows", Some(rows)),
                    ("tokens", None),
                    ("width", Some(width)),
                ],
            )
            .map_err(status::tensor)?;
        context
            .require_dtype(
                "encoder_hidden_states",
                &[DataType::Float32, DataType::Float16, DataType::Bfloat16],
            )
            .map_err(status::tensor)?;
        wire::to_tch(context, "encoder_hidden_states").map_err(status::tensor)
    }
}

#[tonic::async_trait]
impl DenoiserService for Denoiser {
    async fn info(
        &self,
        _: Request<DenoiserServiceInfoRequest>,
    ) -> Result<Response<DenoiserServiceInfoResponse>, Status> {
        let info = self.info.get().ok_or_else(|| status::warming_up(STAGE))?;
        Ok(Response::new(info.clone()))
    }

    #[tracing::instrument(skip_all, fields(batch_rows))]
    async fn denoise(
        &self,
        request: Request<DenoiseRequest>,
    ) -> Result<Response<DenoiseResponse>, Status> {
        self.step(request.get_ref()).await.map(Response::new)
    }

    type DenoiseStepsStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<DenoiseStepsResponse, Status>> + Send + 'static>,
    >;

    /// Serves the stream's steps one after another, each exactly as a Denoise call (its own
    /// span, batching with every other step). A failed step ends the stream with its status;
    /// a caller that goes away drops the step it had queued.
    async fn denoise_steps(
        &self,
        request: Request<tonic::Streaming<DenoiseStepsRequest>>,
    ) -> Result<Response<Self::DenoiseStepsStream>, Status> {
        // Held until the stream ends, so the call's span lasts as long as the stream and
        // parents every step's span.
        let call = tracing::Span::current();
        let stream = Some((self.clone(), request.into_inner(), call));
        let answers = futures_util::stream::unfold(stream, |stream| async move {
            let (this, mut steps, call) = stream?;
            let (step, trace_context) = match steps.message().await {
                Ok(Some(DenoiseStepsRequest {
                    step: Some(step),
                    trace_context,
                })) => (step, trace_context),
                Ok(Some(DenoiseStepsRequest { step: None, .. })) => {
                    let missing = Status::invalid_argument("step: missing");
                    return Some((Err(missing), None));
                }
                Ok(None) => return None,
                Err(status) => return Some((Err(status), None)),
            };
            // Traced as the Denoise call it stands for, under the orchestrator's step.
            let span = tracing::info_span!(
                parent: &call,
                "denoise",
                otel.name = "sd.stage.v1.DenoiserService/Denoise",
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = "sd.stage.v1.DenoiserService",
                rpc.method = "Denoise",
                batch_rows = tracing::field::Empty
            );
            sd_server::telemetry::set_parent_from(&span, &trace_context);
            let answer = this
                .step(&step)
                .instrument(span)
                .await
                .map(|step| DenoiseStepsResponse { step: Some(step) });
            let rest = answer.is_ok().then_some((this, steps, call));
            Some((answer, rest))
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

impl Denoiser {
    /// One step, for either RPC; its span records the batch it joined.
    async fn step(&self, request: &DenoiseRequest) -> Result<DenoiseResponse, Status> {
        let info = self.info.get().ok_or_else(|| status::warming_up(STAGE))?;
        let (step, context_cached) = self.validate(request, info)?;
        let _inflight = self.metrics.inflight();
        let out = self.batcher.submit(step).await.map_err(|e| {
            let status = status::batch(e);
            self.metrics.error(status.code());
            status
        })?;
        tracing::Span::current().record("batch_rows", out.batch_rows);
        let model_output =
            wire::from_tch(&out.value).map_err(|e| status::model(STAGE, e.into()))?;
        Ok(DenoiseResponse {
            model_output: Some(model_output),
            batch_rows: out.batch_rows as u32,
            batch_calls: out.batch_calls as u32,
            queue_wait_seconds: out.queue_wait.as_secs_f64(),
            compute_seconds: out.compute.as_secs_f64(),
            context_cached,
        })
    }
}

/// Runs the stage on `listener` until `shutdown` resolves. Fails at start-up when the model
/// folder cannot be loaded (the error names the file).
pub async fn run(
    args: StageArgs,
    batch: BatchArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let scheduler_path = args.model.join("scheduler").join("scheduler_config.json");
    let scheduler_config_json = std::fs::read_to_string(&scheduler_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", scheduler_path.display()))?;
    let scheduler: serde_json::Value = serde_json::from_str(&scheduler_config_json)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", scheduler_path.display()))?;
    let prediction_type = scheduler
        .get("prediction_type")
        .and_then(|v| v.as_str())
        .unwrap_or("epsilon")
        .to_string();
    let (health, health_service) = Health::new(service_names::DENOISER).await;
    let info = Arc::new(OnceLock::new());
    let ready = info.clone();
    let load_args = args.clone();
    let config = BatchConfig {
        max_rows: batch.max_batch.max(1),
        max_wait: std::time::Duration::from_millis(batch.batch_wait_ms),
        max_pending: args.max_queue.max(1),
    };
    let metrics = sd_server::telemetry::metrics::Stage::new(STAGE);
    let cache = Arc::new(ContextCache::new(CacheConfig {
        max_bytes: batch.context_cache_bytes,
        ttl: std::time::Duration::from_secs(batch.context_cache_ttl_secs),
    }));
    let model_cache = cache.clone();
    // Weak: the instruments outlive this stage when several run in one process (`sd bench`).
    let observed = Arc::downgrade(&cache);
    sd_server::telemetry::metrics::observe_context_cache(move || {
        observed.upgrade().map(|cache| cache.stats())
    });
    let load = move || {
        let unet = UNet2DConditionModel::load(
            &load_args.model.join("unet"),
            load_args.device.0,
            load_args.dtype.0,
        )?;
        let model = Model {
            unet,
            device: load_args.device.0,
            cache: model_cache,
        };
        model.warm_up()?;
        let c = model.unet.config();
        let _ = ready.set(DenoiserServiceInfoResponse {
            model: Some(load_args.model_info("unet")),
            in_channels: c.in_channels as u32,
            out_channels: c.out_channels as u32,
            cross_attention_dim: c.cross_attention_dim as u32,
            sample_size: c.sample_size as u32,
            scheduler_config_json,
            prediction_type,
            latent_multiple: c.downsample_factor() as u32,
            context_cache_bytes: batch.context_cache_bytes,
        });
        Ok::<_, sd_models::ModelError>(model)
    };
    let (batcher, loaded) = Batcher::spawn(
        STAGE,
        config,
        metrics.clone(),
        load,
        |model: &Model, steps: Vec<Step>| {
            model.denoise(&steps).map_err(|e| status::model(STAGE, e))
        },
    );
    let service = DenoiserServiceServer::new(Denoiser {
        batcher,
        metrics,
        info,
        cache,
    })
    .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
    let router = sd_server::router(service_names::DENOISER, health_service)?.add_service(service);
    serve_stage(STAGE, router, listener, health, shutdown, loaded).await
}

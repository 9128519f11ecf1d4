//! The denoiser stage: the U-Net noise predictor behind `sd.stage.v1.DenoiserService`.
//!
//! Each Denoise call is one step for a batch of samples, each at its own timestep, and carries
//! its text context, so any replica can serve any step. Classifier-free guidance is fused:
//! the unconditional and conditional halves run as one U-Net batch and the guided prediction
//! is returned (half the bytes back, one round trip).

use sd_models::{ModelError, unet_2d_condition::UNet2DConditionModel};
use sd_proto::{
    service_names,
    stage::{
        DataType, DenoiseRequest, DenoiseResponse, DenoiserServiceInfoRequest,
        DenoiserServiceInfoResponse,
        denoiser_service_server::{DenoiserService, DenoiserServiceServer},
    },
};
use sd_runtime::{StageArgs, stage::serve_stage, status, wire, worker::Worker};
use sd_server::Health;
use std::{
    future::Future,
    sync::{Arc, OnceLock},
};
use tch::{Device, Kind, Tensor};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

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
    pub log: sd_server::LogArgs,
}

struct Model {
    unet: UNet2DConditionModel,
    device: Device,
}

/// One validated step: CPU tensors as they came off the wire.
struct Step {
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    guidance: Option<Tensor>,
    rescale: Option<Tensor>,
}

impl Model {
    fn load(args: &StageArgs) -> Result<Self, ModelError> {
        let unet =
            UNet2DConditionModel::load(&args.model.join("unet"), args.device.0, args.dtype.0)?;
        let model = Self {
            unet,
            device: args.device.0,
        };
        let c = model.unet.config();
        let (ch, size, width) = (
            c.in_channels as i64,
            c.sample_size as i64,
            c.cross_attention_dim as i64,
        );
        let opts = (Kind::Float, Device::Cpu);
        let _warm_up = model.denoise(Step {
            sample: Tensor::zeros([1, ch, size, size], opts),
            timesteps: Tensor::zeros([1], opts),
            context: Tensor::zeros([2, 77, width], opts),
            guidance: Some(Tensor::ones([1], opts)),
            rescale: None,
        })?; // warm-up forward
        Ok(model)
    }

    /// Runs the U-Net; with guidance, on the doubled batch and combines the halves:
    /// `uncond + scale * (cond - uncond)` (diffusers' StableDiffusionPipeline.__call__).
    fn denoise(&self, step: Step) -> Result<Tensor, ModelError> {
        tch::no_grad(|| {
            let sample = step.sample.to_device(self.device);
            let timesteps = step.timesteps.to_device(self.device);
            let context = step.context.to_device(self.device);
            let out = match step.guidance {
                None => self.unet.forward(&sample, &timesteps, &context)?,
                Some(scale) => {
                    let both = Tensor::cat(&[&sample, &sample], 0);
                    let t = Tensor::cat(&[&timesteps, &timesteps], 0);
                    let pred = self.unet.forward(&both, &t, &context)?.to_kind(Kind::Float);
                    let halves = pred.chunk(2, 0);
                    let (uncond, cond) = (&halves[0], &halves[1]);
                    let scale = scale.to_device(self.device).view([-1, 1, 1, 1]);
                    let guided = uncond + scale * (cond - uncond);
                    match step.rescale {
                        None => guided,
                        Some(rescale) => {
                            rescale_noise_cfg(&guided, cond, &rescale.to_device(self.device))
                        }
                    }
                }
            };
            Ok(out.to_kind(Kind::Float))
        })
    }
}

/// Pulls the guided prediction's standard deviation back towards the conditional one's:
/// diffusers' `rescale_noise_cfg` (Lin et al. 2023, eq. 15-16), per sample, with torch's
/// default unbiased standard deviation over all but the batch dimension.
fn rescale_noise_cfg(guided: &Tensor, cond: &Tensor, rescale: &Tensor) -> Tensor {
    let dims: &[i64] = &[1, 2, 3];
    let std_cond = cond.std_dim(dims, true, true);
    let std_guided = guided.std_dim(dims, true, true);
    let rescaled = guided * (std_cond / std_guided);
    let phi = rescale.view([-1, 1, 1, 1]);
    &phi * rescaled + (1.0 - &phi) * guided
}

/// The gRPC service.
pub struct Denoiser {
    worker: Worker<Model>,
    info: Arc<OnceLock<DenoiserServiceInfoResponse>>,
}

impl Denoiser {
    /// Checks every tensor against the model's shapes before any libtorch call.
    fn validate(
        &self,
        req: &DenoiseRequest,
        info: &DenoiserServiceInfoResponse,
    ) -> Result<Step, Status> {
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
        let context = req
            .encoder_hidden_states
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("encoder_hidden_states: missing"))?;
        let rows = if guided { 2 * b } else { b };
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
                    ("width", Some(i64::from(info.cross_attention_dim))),
                ],
            )
            .map_err(status::tensor)?;
        context
            .require_dtype(
                "encoder_hidden_states",
                &[DataType::Float32, DataType::Float16, DataType::Bfloat16],
            )
            .map_err(status::tensor)?;
        Ok(Step {
            sample: wire::to_tch(sample, "sample").map_err(status::tensor)?,
            timesteps: Tensor::from_slice(&t_values),
            context: wire::to_tch(context, "encoder_hidden_states").map_err(status::tensor)?,
            guidance: guided.then(|| Tensor::from_slice(&req.guidance_scale)),
            rescale: (!req.guidance_rescale.is_empty())
                .then(|| Tensor::from_slice(&req.guidance_rescale)),
        })
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

    #[tracing::instrument(skip_all)]
    async fn denoise(
        &self,
        request: Request<DenoiseRequest>,
    ) -> Result<Response<DenoiseResponse>, Status> {
        let info = self.info.get().ok_or_else(|| status::warming_up(STAGE))?;
        let step = self.validate(request.get_ref(), info)?;
        let out = self
            .worker
            .run(move |m| m.denoise(step))
            .await
            .map_err(status::worker)?
            .map_err(|e| status::model(STAGE, e))?;
        let model_output = wire::from_tch(&out).map_err(|e| status::model(STAGE, e.into()))?;
        Ok(Response::new(DenoiseResponse {
            model_output: Some(model_output),
        }))
    }
}

/// Runs the stage on `listener` until `shutdown` resolves. Fails at start-up when the model
/// folder cannot be loaded (the error names the file).
pub async fn run(
    args: StageArgs,
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
    let (worker, loaded) = Worker::spawn(STAGE, args.max_queue, move || {
        let model = Model::load(&load_args)?;
        let c = model.unet.config();
        let _ = ready.set(DenoiserServiceInfoResponse {
            model: Some(load_args.model_info("unet")),
            in_channels: c.in_channels as u32,
            out_channels: c.out_channels as u32,
            cross_attention_dim: c.cross_attention_dim as u32,
            sample_size: c.sample_size as u32,
            scheduler_config_json,
            prediction_type,
        });
        Ok(model)
    });
    let service = DenoiserServiceServer::new(Denoiser { worker, info })
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
    let router = sd_server::builder()
        .add_service(health_service)
        .add_service(sd_server::reflection(&[service_names::DENOISER])?)
        .add_service(service);
    serve_stage(STAGE, router, listener, health, shutdown, loaded).await
}

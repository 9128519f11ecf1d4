//! The VAE stage: `AutoencoderKL`'s decoder behind `sd.stage.v1.VaeService`. Latents in,
//! 8-bit images out (PNG or raw RGB), never float pixels: a 512x512 image is 768 KiB as RGB8
//! and 3 MiB as f32.
//!
//! Concurrent Decode calls whose latents share a size and element type run as one decoder
//! forward ([`sd_runtime::batcher`]); each call gets its own images back. Image encoding runs
//! off the model thread.

use image::{ExtendedColorType, ImageEncoder, codecs::png::PngEncoder};
use sd_models::{ModelError, autoencoder_kl::AutoencoderKL};
use sd_proto::{
    service_names,
    stage::{
        DataType, DecodeRequest, DecodeResponse, DecodedImage, ImageEncoding,
        VaeServiceInfoRequest, VaeServiceInfoResponse,
        vae_service_server::{VaeService, VaeServiceServer},
    },
};
use sd_runtime::{
    BatchArgs, StageArgs,
    batcher::{Batchable, Batcher},
    stage::serve_stage,
    status, wire,
};
use sd_server::Health;
use std::{
    future::Future,
    sync::{Arc, OnceLock},
};
use tch::{Device, Kind, Tensor};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

const STAGE: &str = "vae";
/// Most latents one Decode call may carry.
pub const MAX_BATCH: i64 = 16;
/// Largest latent side accepted (512 latent pixels = 4096 image pixels for SD's VAE).
pub const MAX_LATENT_SIDE: i64 = 512;

/// Command line of `sd-vae`.
#[derive(Debug, clap::Parser)]
#[command(name = "sd-vae", version, about = "VAE decoder stage (gRPC)")]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "SD_LISTEN", default_value = "0.0.0.0:50063")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub stage: StageArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub log: sd_server::LogArgs,
}

struct Model {
    vae: AutoencoderKL,
    device: Device,
}

impl Model {
    fn load(args: &StageArgs) -> Result<Self, ModelError> {
        let vae = AutoencoderKL::load(&args.model.join("vae"), args.device.0, args.dtype.0)?;
        let model = Self {
            vae,
            device: args.device.0,
        };
        let ch = model.vae.config().latent_channels as i64;
        let _warm_up = model.decode(Tensor::zeros([1, ch, 8, 8], (Kind::Float, Device::Cpu)))?; // warm-up
        Ok(model)
    }

    /// Undoes the latent scaling from the config, decodes, and quantises to 8-bit RGB
    /// `[B, H, W, 3]` the way diffusers' VaeImageProcessor does (`(x / 2 + 0.5).clamp(0, 1)`,
    /// then `round(x * 255)`).
    fn decode(&self, latents: Tensor) -> Result<Tensor, ModelError> {
        tch::no_grad(|| {
            let c = self.vae.config();
            let mut z = latents.to_device(self.device).to_kind(Kind::Float) / c.scaling_factor;
            if let Some(shift) = c.shift_factor {
                z += shift;
            }
            let images = self.vae.decode(&z)?.to_kind(Kind::Float);
            let rgb = ((images / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
                .round()
                .to_kind(Kind::Uint8)
                .permute([0, 2, 3, 1])
                .contiguous()
                .to_device(Device::Cpu);
            Ok(rgb)
        })
    }
}

/// One Decode call's latents `[B, C, h, w]` (CPU, as they came off the wire).
struct DecodeJob(Tensor);

impl Batchable for DecodeJob {
    /// Latent height and width, and element type.
    type Key = (i64, i64, Kind);

    fn key(&self) -> Option<Self::Key> {
        let s = self.0.size();
        Some((s[2], s[3], self.0.kind()))
    }

    fn rows(&self) -> usize {
        self.0.size()[0] as usize
    }
}

impl Model {
    /// Decodes the calls' latents as one batch and returns each call's `[B, H, W, 3]` u8.
    fn decode_jobs(&self, jobs: Vec<DecodeJob>) -> Result<Vec<Tensor>, Status> {
        let counts: Vec<i64> = jobs.iter().map(|j| j.0.size()[0]).collect();
        let latents: Vec<Tensor> = jobs.into_iter().map(|j| j.0).collect();
        let all = if latents.len() == 1 {
            latents[0].shallow_clone()
        } else {
            Tensor::f_cat(&latents, 0).map_err(|e| status::model(STAGE, e.into()))?
        };
        let rgb = self.decode(all).map_err(|e| status::model(STAGE, e))?;
        rgb.f_split_with_sizes(&counts, 0)
            .map_err(|e| status::model(STAGE, e.into()))
    }
}

/// The gRPC service.
pub struct Vae {
    batcher: Batcher<DecodeJob, Tensor, Status>,
    info: Arc<OnceLock<VaeServiceInfoResponse>>,
}

#[tonic::async_trait]
impl VaeService for Vae {
    async fn info(
        &self,
        _: Request<VaeServiceInfoRequest>,
    ) -> Result<Response<VaeServiceInfoResponse>, Status> {
        let info = self.info.get().ok_or_else(|| status::warming_up(STAGE))?;
        Ok(Response::new(info.clone()))
    }

    #[tracing::instrument(skip_all, fields(batch_rows))]
    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        let info = self.info.get().ok_or_else(|| status::warming_up(STAGE))?;
        let DecodeRequest { latents, encoding } = request.into_inner();
        let encoding = match ImageEncoding::try_from(encoding) {
            Ok(ImageEncoding::Unspecified) | Ok(ImageEncoding::Png) => ImageEncoding::Png,
            Ok(ImageEncoding::Rgb8) => ImageEncoding::Rgb8,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "encoding: unknown value {encoding}"
                )));
            }
        };
        let latents = latents.ok_or_else(|| Status::invalid_argument("latents: missing"))?;
        let ch = i64::from(info.latent_channels);
        latents
            .validate_shape(
                "latents",
                "[B, C, h, w]",
                &[
                    ("batch", None),
                    ("channels", Some(ch)),
                    ("height", None),
                    ("width", None),
                ],
            )
            .map_err(status::tensor)?;
        latents
            .require_dtype(
                "latents",
                &[DataType::Float32, DataType::Float16, DataType::Bfloat16],
            )
            .map_err(status::tensor)?;
        let s = &latents.shape;
        if s[0] > MAX_BATCH || s[2] > MAX_LATENT_SIDE || s[3] > MAX_LATENT_SIDE {
            return Err(Status::invalid_argument(format!(
                "latents: shape {s:?} above the limits (batch {MAX_BATCH}, side {MAX_LATENT_SIDE})"
            )));
        }
        let latents = wire::to_tch(&latents, "latents").map_err(status::tensor)?;
        let out = self
            .batcher
            .submit(DecodeJob(latents))
            .await
            .map_err(status::batch)?;
        tracing::Span::current().record("batch_rows", out.batch_rows);
        let (rows, calls) = (out.batch_rows as u32, out.batch_calls as u32);
        let rgb = out.value;
        let images = tokio::task::spawn_blocking(move || encode_images(&rgb, encoding))
            .await
            .map_err(|e| Status::internal(format!("{STAGE}: image encoding task failed: {e}")))??;
        Ok(Response::new(DecodeResponse {
            images,
            batch_rows: rows,
            batch_calls: calls,
        }))
    }
}

/// Splits `[B, H, W, 3]` u8 into images in the requested encoding.
fn encode_images(rgb: &Tensor, encoding: ImageEncoding) -> Result<Vec<DecodedImage>, Status> {
    let size = rgb.size();
    let (b, h, w) = (size[0], size[1] as u32, size[2] as u32);
    let per_image = (h * w * 3) as usize;
    let total = per_image * b as usize;
    let mut bytes = vec![0u8; total];
    rgb.f_copy_data_u8(&mut bytes, total)
        .map_err(|e| Status::internal(format!("{STAGE}: {e}")))?;
    bytes
        .chunks_exact(per_image)
        .map(|pixels| {
            let data = match encoding {
                ImageEncoding::Rgb8 => pixels.to_vec(),
                _ => {
                    let mut png = Vec::new();
                    PngEncoder::new(&mut png)
                        .write_image(pixels, w, h, ExtendedColorType::Rgb8)
                        .map_err(|e| Status::internal(format!("{STAGE}: PNG encoding: {e}")))?;
                    png
                }
            };
            Ok(DecodedImage {
                data: data.into(),
                encoding: encoding as i32,
                width: w,
                height: h,
            })
        })
        .collect()
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
    let (health, health_service) = Health::new(service_names::VAE).await;
    let info = Arc::new(OnceLock::new());
    let ready = info.clone();
    let load_args = args.clone();
    let load = move || {
        let model = Model::load(&load_args)?;
        let c = model.vae.config();
        let _ = ready.set(VaeServiceInfoResponse {
            model: Some(load_args.model_info("vae")),
            latent_channels: c.latent_channels as u32,
            scaling_factor: c.scaling_factor as f32,
            shift_factor: c.shift_factor.map(|s| s as f32),
            downsample_factor: model.vae.downsample_factor() as u32,
        });
        Ok::<_, ModelError>(model)
    };
    let (batcher, loaded) = Batcher::spawn(
        STAGE,
        batch.config(args.max_queue),
        sd_server::telemetry::metrics::Stage::new(STAGE),
        load,
        |m: &Model, jobs| m.decode_jobs(jobs),
    );
    let service = VaeServiceServer::new(Vae { batcher, info })
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
    let router = sd_server::router(service_names::VAE, health_service)?.add_service(service);
    serve_stage(STAGE, router, listener, health, shutdown, loaded).await
}

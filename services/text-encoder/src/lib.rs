//! The text-encoder stage: CLIP tokenizer + CLIP text transformer behind
//! `sd.stage.v1.TextEncoderService`. Prompts in, last hidden states out; long prompts and
//! emphasis weights on request ([`prompts`]).

pub mod prompts;

use prompts::{Batch, Options};
use sd_models::{ModelError, clip::ClipTextModel, prompt_weighting, tokenizer::ClipTokenizer};
use sd_proto::{
    service_names,
    stage::{
        EncodeRequest, EncodeResponse, ModelInfo, TextEncoderServiceInfoRequest,
        TextEncoderServiceInfoResponse,
        text_encoder_service_server::{TextEncoderService, TextEncoderServiceServer},
    },
};
use sd_runtime::{StageArgs, stage::serve_stage, status, wire, worker::Worker};
use sd_server::Health;
use std::{
    future::Future,
    sync::{Arc, OnceLock},
};
use tch::{Device, Tensor};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

const STAGE: &str = "text-encoder";
/// Most prompts one Encode call may carry.
pub const MAX_PROMPTS: usize = 64;
/// Longest prompt accepted, in bytes (the public API's limit is lower).
pub const MAX_PROMPT_BYTES: usize = 16 * 1024;

/// Command line of `sd-text-encoder`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "sd-text-encoder",
    version,
    about = "CLIP text-encoder stage (gRPC)"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "SD_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub stage: StageArgs,
    #[command(flatten)]
    pub log: sd_server::LogArgs,
}

struct Model {
    tokenizer: ClipTokenizer,
    clip: ClipTextModel,
    device: Device,
}

impl Model {
    fn load(args: &StageArgs) -> Result<Self, ModelError> {
        let tokenizer = ClipTokenizer::from_dir(&args.model.join("tokenizer"))?;
        let clip = ClipTextModel::load(
            &args.model.join("text_encoder"),
            args.device.0,
            args.dtype.0,
        )?;
        let model = Self {
            tokenizer,
            clip,
            device: args.device.0,
        };
        let _warm_up = model.encode(&[String::new()], &[], Options::default())?;
        Ok(model)
    }

    /// Tokenizes and encodes `prompts` into `[prompts, chunks * max_length, hidden]`; a
    /// `clip_skip` entry above 0 takes that prompt's hidden states from an earlier layer
    /// (empty: 0 for every prompt), for each of its chunks. Returns the truncated token counts.
    fn encode(
        &self,
        prompts: &[String],
        clip_skip: &[u32],
        options: Options,
    ) -> Result<(Tensor, Vec<u32>), ModelError> {
        let Batch {
            ids,
            weights,
            chunks,
            row_length,
            truncated,
        } = prompts::plan(&self.tokenizer, prompts, options)?;
        let (n, k, l) = (prompts.len() as i64, chunks as i64, row_length as i64);
        let input = Tensor::f_from_slice(&ids)?
            .f_view([n * k, l])?
            .f_to_device(self.device)?;
        let hidden = match clip_skip.first() {
            None => self.clip.forward(&input)?,
            Some(&first) if clip_skip.iter().all(|&c| c == first) => {
                self.clip.forward_hidden(&input, first as usize)?
            }
            Some(_) => {
                let rows = clip_skip
                    .iter()
                    .enumerate()
                    .map(|(i, &skip)| {
                        self.clip
                            .forward_hidden(&input.f_narrow(0, i as i64 * k, k)?, skip as usize)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Tensor::f_cat(&rows, 0)?
            }
        };
        let hidden = if options.prompt_weighting {
            prompt_weighting::apply_weights(&hidden, &weights)?
        } else {
            hidden
        };
        // Prompt-major rows: [n * k, l, d] -> [n, k * l, d] concatenates each prompt's chunks.
        let hidden = hidden.f_reshape([n, k * l, -1])?;
        Ok((hidden, truncated))
    }
}

/// The gRPC service.
pub struct TextEncoder {
    worker: Worker<Model>,
    info: Arc<OnceLock<TextEncoderServiceInfoResponse>>,
}

#[tonic::async_trait]
impl TextEncoderService for TextEncoder {
    async fn info(
        &self,
        _: Request<TextEncoderServiceInfoRequest>,
    ) -> Result<Response<TextEncoderServiceInfoResponse>, Status> {
        let info = self.info.get().ok_or_else(|| status::warming_up(STAGE))?;
        Ok(Response::new(info.clone()))
    }

    #[tracing::instrument(skip_all, fields(prompts = request.get_ref().prompts.len()))]
    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        if self.info.get().is_none() {
            return Err(status::warming_up(STAGE));
        }
        let EncodeRequest {
            prompts,
            clip_skip,
            long_prompt,
            prompt_weighting,
        } = request.into_inner();
        validate_prompts(&prompts)?;
        if !clip_skip.is_empty() && clip_skip.len() != prompts.len() {
            return Err(Status::invalid_argument(format!(
                "clip_skip: {} values for {} prompts",
                clip_skip.len(),
                prompts.len()
            )));
        }
        let options = Options {
            long_prompt,
            prompt_weighting,
        };
        let (hidden, truncated) = self
            .worker
            .run(move |m| m.encode(&prompts, &clip_skip, options))
            .await
            .map_err(status::worker)?
            .map_err(|e| status::model(STAGE, e))?;
        let hidden_states = wire::from_tch(&hidden).map_err(|e| status::model(STAGE, e.into()))?;
        Ok(Response::new(EncodeResponse {
            hidden_states: Some(hidden_states),
            truncated_tokens: truncated,
        }))
    }
}

fn validate_prompts(prompts: &[String]) -> Result<(), Status> {
    if prompts.is_empty() {
        return Err(Status::invalid_argument(
            "prompts: at least one prompt is required",
        ));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(Status::invalid_argument(format!(
            "prompts: {} prompts, at most {MAX_PROMPTS} per call",
            prompts.len()
        )));
    }
    if let Some((i, p)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() > MAX_PROMPT_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "prompts[{i}]: {} bytes, at most {MAX_PROMPT_BYTES}",
            p.len()
        )));
    }
    Ok(())
}

/// Runs the stage on `listener` until `shutdown` resolves. Fails at start-up when the model
/// folder cannot be loaded (the error names the file).
pub async fn run(
    args: StageArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let (health, health_service) = Health::new(service_names::TEXT_ENCODER).await;
    let info = Arc::new(OnceLock::new());
    let ready = info.clone();
    let load_args = args.clone();
    let (worker, loaded) = Worker::spawn(STAGE, args.max_queue, move || {
        let model = Model::load(&load_args)?;
        let config = model.clip.config();
        let _ = ready.set(TextEncoderServiceInfoResponse {
            model: Some(model_info(&load_args)),
            hidden_size: config.hidden_size as u32,
            max_length: model.tokenizer.max_length() as u32,
            vocab_size: config.vocab_size as u32,
        });
        Ok(model)
    });
    let service = TextEncoderServiceServer::new(TextEncoder { worker, info })
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
    let router =
        sd_server::router(service_names::TEXT_ENCODER, health_service)?.add_service(service);
    serve_stage(STAGE, router, listener, health, shutdown, loaded).await
}

fn model_info(args: &StageArgs) -> ModelInfo {
    args.model_info("text_encoder")
}

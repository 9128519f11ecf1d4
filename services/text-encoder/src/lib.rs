//! The text-encoder stage: CLIP tokenizer + CLIP text transformer behind
//! `sd.stage.v1.TextEncoderService`. Prompts in, last hidden states out; long prompts and
//! emphasis weights on request ([`prompts`]).
//!
//! Concurrent Encode calls with the same options run as one CLIP forward
//! ([`sd_runtime::batcher`]): each call is tokenized on its own (a bad prompt fails only its
//! call, and errors name the caller's own `prompts[i]`), the rows are stacked, and each call
//! gets its own rows back. Long-prompt calls run alone, since their chunk count depends on the
//! longest prompt of the call.

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
use sd_runtime::batcher::{Batchable, Batcher};
use sd_runtime::{BatchArgs, StageArgs, stage::serve_stage, status, wire};
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
    pub batch: BatchArgs,
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
        let batch = prompts::plan(&self.tokenizer, prompts, options)?;
        let hidden = self.forward(&batch, prompts.len(), clip_skip, options)?;
        Ok((hidden, batch.truncated))
    }

    /// Runs the planned rows of `n` prompts through CLIP: `[n, chunks * max_length, hidden]`.
    fn forward(
        &self,
        batch: &Batch,
        n: usize,
        clip_skip: &[u32],
        options: Options,
    ) -> Result<Tensor, ModelError> {
        let (n, k, l) = (n as i64, batch.chunks as i64, batch.row_length as i64);
        let input = Tensor::f_from_slice(&batch.ids)?
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
            prompt_weighting::apply_weights(&hidden, &batch.weights)?
        } else {
            hidden
        };
        // Prompt-major rows: [n * k, l, d] -> [n, k * l, d] concatenates each prompt's chunks.
        Ok(hidden.f_reshape([n, k * l, -1])?)
    }

    /// Serves a batch of calls that share a key ([`EncodeJob::key`]): plans each call on its
    /// own, runs every planned row as one forward, and cuts each call's rows back out.
    fn encode_jobs(&self, jobs: Vec<EncodeJob>) -> Result<Vec<Result<Encoded, Status>>, Status> {
        let mut results: Vec<Option<Result<Encoded, Status>>> = Vec::with_capacity(jobs.len());
        let mut planned = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.iter().enumerate() {
            match prompts::plan(&self.tokenizer, &job.prompts, job.options) {
                Ok(batch) => {
                    planned.push((i, batch));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(status::model(STAGE, e)))),
            }
        }
        let Some((first, first_batch)) = planned.first() else {
            return Ok(results.into_iter().flatten().collect());
        };
        let first = &jobs[*first];
        let layout = (first_batch.chunks, first_batch.row_length);
        if planned
            .iter()
            .any(|(_, b)| (b.chunks, b.row_length) != layout)
        {
            return Err(Status::internal(format!(
                "{STAGE}: calls of different row layouts were batched together"
            )));
        }
        let mut all = Batch {
            ids: Vec::new(),
            weights: Vec::new(),
            chunks: layout.0,
            row_length: layout.1,
            truncated: Vec::new(),
        };
        for (_, b) in &planned {
            all.ids.extend_from_slice(&b.ids);
            all.weights.extend_from_slice(&b.weights);
        }
        let n: usize = planned.iter().map(|(i, _)| jobs[*i].prompts.len()).sum();
        // The key lets only calls that all sent clip_skip, or all did not, share a batch.
        let clip_skip: Vec<u32> = planned
            .iter()
            .flat_map(|(i, _)| jobs[*i].clip_skip.iter().copied())
            .collect();
        let hidden = self
            .forward(&all, n, &clip_skip, first.options)
            .map_err(|e| status::model(STAGE, e))?;
        let mut offset = 0i64;
        for (i, batch) in planned {
            let count = jobs[i].prompts.len() as i64;
            let rows = hidden
                .f_narrow(0, offset, count)
                .map_err(|e| status::model(STAGE, e.into()))?;
            offset += count;
            results[i] = Some(Ok((rows, batch.truncated)));
        }
        Ok(results.into_iter().flatten().collect())
    }
}

/// Hidden states `[prompts, positions, hidden]` and truncated token counts of one call.
type Encoded = (Tensor, Vec<u32>);

/// One Encode call on its way to the model thread.
struct EncodeJob {
    prompts: Vec<String>,
    /// Empty (last layer for all) or one entry per prompt.
    clip_skip: Vec<u32>,
    options: Options,
}

/// What calls must agree on to share a forward.
#[derive(Debug, PartialEq, Eq)]
struct EncodeKey {
    /// `None`: the call sent no clip_skip; otherwise the one value all its prompts use.
    clip_skip: Option<u32>,
    prompt_weighting: bool,
}

impl Batchable for EncodeJob {
    type Key = EncodeKey;

    fn key(&self) -> Option<EncodeKey> {
        if self.options.long_prompt {
            return None; // the chunk count depends on the call's longest prompt
        }
        let clip_skip = match self.clip_skip.split_first() {
            None => None,
            Some((first, rest)) if rest.iter().all(|c| c == first) => Some(*first),
            Some(_) => return None, // per-prompt layers: run as sent
        };
        Some(EncodeKey {
            clip_skip,
            prompt_weighting: self.options.prompt_weighting,
        })
    }

    fn rows(&self) -> usize {
        self.prompts.len()
    }
}

/// The gRPC service.
pub struct TextEncoder {
    batcher: Batcher<EncodeJob, Result<Encoded, Status>, Status>,
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

    #[tracing::instrument(skip_all, fields(prompts = request.get_ref().prompts.len(), batch_rows))]
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
        let job = EncodeJob {
            prompts,
            clip_skip,
            options,
        };
        let out = self.batcher.submit(job).await.map_err(status::batch)?;
        tracing::Span::current().record("batch_rows", out.batch_rows);
        let (batch_rows, batch_calls) = (out.batch_rows as u32, out.batch_calls as u32);
        let (hidden, truncated) = out.value?;
        let hidden_states = wire::from_tch(&hidden).map_err(|e| status::model(STAGE, e.into()))?;
        Ok(Response::new(EncodeResponse {
            hidden_states: Some(hidden_states),
            truncated_tokens: truncated,
            batch_rows,
            batch_calls,
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
    batch: BatchArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let (health, health_service) = Health::new(service_names::TEXT_ENCODER).await;
    let info = Arc::new(OnceLock::new());
    let ready = info.clone();
    let load_args = args.clone();
    let metrics = sd_server::telemetry::metrics::Stage::new(STAGE);
    let load = move || {
        let model = Model::load(&load_args)?;
        let config = model.clip.config();
        let _ = ready.set(TextEncoderServiceInfoResponse {
            model: Some(model_info(&load_args)),
            hidden_size: config.hidden_size as u32,
            max_length: model.tokenizer.max_length() as u32,
            vocab_size: config.vocab_size as u32,
        });
        Ok::<_, ModelError>(model)
    };
    let (batcher, loaded) = Batcher::spawn(
        STAGE,
        batch.config(args.max_queue),
        metrics,
        load,
        |m: &Model, jobs| m.encode_jobs(jobs),
    );
    let service = TextEncoderServiceServer::new(TextEncoder { batcher, info })
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
    let router =
        sd_server::router(service_names::TEXT_ENCODER, health_service)?.add_service(service);
    serve_stage(STAGE, router, listener, health, shutdown, loaded).await
}

fn model_info(args: &StageArgs) -> ModelInfo {
    args.model_info("text_encoder")
}

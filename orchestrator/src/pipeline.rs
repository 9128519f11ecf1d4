//! One generation, end to end: encode the prompts, draw the initial noise from the seed, run
//! the reverse-diffusion loop against the denoiser, decode with the VAE.
//!
//! The loop follows diffusers' `StableDiffusionPipeline.__call__`: prompt embeddings with the
//! negative prompt as the unconditional half when guidance is on, latents drawn as
//! `randn([N, C, h, w], generator=Generator("cpu").manual_seed(seed)) * init_noise_sigma`, then
//! for each timestep `scale_model_input`, a (guided) model call and `scheduler.step`.
//!
//! The text context is sent with the first step only, named by a random per-generation
//! `context_id`; the denoiser replica caches it and later steps send the id alone. A replica
//! that does not hold it (restarted, evicted, expired, or another replica after a failover or
//! a balancing choice) answers with a context miss and the same step is re-sent to the same
//! replica with the context: one extra round trip, outside the failover retry budget, and the
//! same tensors, so the image does not change. The steps travel on a `DenoiseSteps` stream
//! ([`crate::steps`]).

use crate::{
    preview,
    request::Params,
    rng::TorchGenerator,
    schedulers::{self, SchedulerConfig},
    stages::{self, Identity, Stage, request},
    steps::StepStream,
};
use sd_proto::{
    stage::{
        DecodeRequest, DenoiseRequest, DenoiserServiceInfoRequest, EncodeRequest, ImageEncoding,
        ModelInfo, Tensor, TextEncoderServiceInfoRequest, VaeServiceInfoRequest,
    },
    v1::{GenerateResponse, Image, OutputFormat, Progress, StageTimings},
};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::OnceCell;
use tonic::Status;
use tracing::Instrument;

/// The three stages and what they said about their models.
pub struct Pipeline {
    pub text_encoder: Arc<Stage>,
    pub denoiser: Arc<Stage>,
    pub vae: Arc<Stage>,
    models: OnceCell<Models>,
}

/// What the stages report, checked to belong together.
#[derive(Debug, Clone)]
pub struct Models {
    pub hidden_size: u32,
    pub latent_channels: u32,
    pub downsample_factor: u32,
    /// Native latent side of the U-Net.
    pub sample_size: u32,
    /// Latent sides must be multiples of this (the U-Net's downsampling).
    pub latent_multiple: u32,
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: String,
}

impl Pipeline {
    /// A pipeline over the three stages. Each stage gets a probe reading its Info, so that its
    /// replicas get work only once they are seen to serve the model checked at start-up.
    pub fn new(text_encoder: Arc<Stage>, denoiser: Arc<Stage>, vae: Arc<Stage>) -> Self {
        text_encoder.set_probe(Arc::new(|ch, t| {
            Box::pin(async move {
                let info = stages::text_encoder(ch)
                    .info(request(TextEncoderServiceInfoRequest {}, t))
                    .await?;
                Ok(identity(&info.into_inner().model))
            })
        }));
        denoiser.set_probe(Arc::new(|ch, t| {
            Box::pin(async move {
                let info = stages::denoiser(ch)
                    .info(request(DenoiserServiceInfoRequest {}, t))
                    .await?;
                Ok(identity(&info.into_inner().model))
            })
        }));
        vae.set_probe(Arc::new(|ch, t| {
            Box::pin(async move {
                let info = stages::vae(ch)
                    .info(request(VaeServiceInfoRequest {}, t))
                    .await?;
                Ok(identity(&info.into_inner().model))
            })
        }));
        Self {
            text_encoder,
            denoiser,
            vae,
            models: OnceCell::new(),
        }
    }

    /// Reads the Info of every replica of every stage once and checks they fit together: the
    /// replicas of a stage serve the same model id and revision, the text encoder's width is
    /// the U-Net's cross-attention width, the U-Net's latent channels are the VAE's, and all
    /// stages serve the same model id. Replicas that do not answer are skipped (they are
    /// checked when they do). On success each stage's identity is established: replicas that
    /// appear later get work only once they report it. Failures (FAILED_PRECONDITION when
    /// the stages or replicas disagree) are not cached, so a stage that comes up later, or a
    /// replica that is fixed, is picked up by the next request.
    pub async fn models(&self) -> Result<&Models, Status> {
        self.models.get_or_try_init(|| self.read_models()).await
    }

    async fn read_models(&self) -> Result<Models, Status> {
        let (te, dn, vae) = tokio::join!(
            self.text_encoder.call_each("info", |ch, t| async move {
                stages::text_encoder(ch)
                    .info(request(TextEncoderServiceInfoRequest {}, t))
                    .await
            }),
            self.denoiser.call_each("info", |ch, t| async move {
                stages::denoiser(ch)
                    .info(request(DenoiserServiceInfoRequest {}, t))
                    .await
            }),
            self.vae.call_each("info", |ch, t| async move {
                stages::vae(ch)
                    .info(request(VaeServiceInfoRequest {}, t))
                    .await
            }),
        );
        let te = Answers::check(self.text_encoder.name(), te, |i| &i.model)?;
        let dn = Answers::check(self.denoiser.name(), dn, |i| &i.model)?;
        let vae = Answers::check(self.vae.name(), vae, |i| &i.model)?;
        let mismatch =
            |what: String| Status::failed_precondition(format!("stages disagree: {what}"));
        if te.info.hidden_size != dn.info.cross_attention_dim {
            return Err(mismatch(format!(
                "text-encoder hidden_size {} != denoiser cross_attention_dim {}",
                te.info.hidden_size, dn.info.cross_attention_dim
            )));
        }
        if dn.info.in_channels != vae.info.latent_channels
            || dn.info.out_channels != vae.info.latent_channels
        {
            return Err(mismatch(format!(
                "denoiser in/out channels {}/{} != vae latent_channels {}",
                dn.info.in_channels, dn.info.out_channels, vae.info.latent_channels
            )));
        }
        let ids = [
            (self.text_encoder.name(), &te.identity, &te.replicas[0]),
            (self.denoiser.name(), &dn.identity, &dn.replicas[0]),
            (self.vae.name(), &vae.identity, &vae.replicas[0]),
        ];
        if let Some((a, b)) = ids
            .iter()
            .zip(ids.iter().skip(1))
            .find(|(a, b)| a.1.model_id != b.1.model_id)
        {
            return Err(mismatch(format!(
                "{} at {} serves model {:?} but {} at {} serves model {:?}",
                a.0, a.2, a.1.model_id, b.0, b.2, b.1.model_id
            )));
        }
        let scheduler_config =
            SchedulerConfig::from_json(&dn.info.scheduler_config_json).map_err(|e| {
                Status::failed_precondition(format!(
                    "denoiser: the model's scheduler_config.json: {e}"
                ))
            })?;
        let default_scheduler = schedulers::name_for_class(scheduler_config.class_name())
            .unwrap_or(schedulers::DEFAULT)
            .to_string();
        te.establish(&self.text_encoder);
        dn.establish(&self.denoiser);
        vae.establish(&self.vae);
        Ok(Models {
            hidden_size: te.info.hidden_size,
            latent_channels: vae.info.latent_channels,
            downsample_factor: vae.info.downsample_factor.max(1),
            sample_size: dn.info.sample_size,
            latent_multiple: dn.info.latent_multiple.max(1),
            scheduler_config,
            default_scheduler,
        })
    }

    /// Runs one generation. `progress` is called after every step; returning `false` from it
    /// (the client went away) stops the generation with CANCELLED. `deadline` bounds every
    /// stage call; past it the generation ends with DEADLINE_EXCEEDED.
    #[tracing::instrument(name = "generate", skip_all, fields(seed = params.seed, steps = params.steps))]
    pub async fn generate(
        &self,
        params: &Params,
        deadline: Option<Instant>,
        mut progress: impl FnMut(Progress) -> bool,
    ) -> Result<GenerateResponse, Status> {
        let started = Instant::now();
        let models = self.models().await?;
        let native = models.sample_size * models.downsample_factor;
        let (width, height) = (
            params.width.unwrap_or(native),
            params.height.unwrap_or(native),
        );
        let f = models.downsample_factor;
        let multiple = f * models.latent_multiple;
        for (field, value) in [("width", width), ("height", height)] {
            if value % multiple != 0 {
                return Err(Status::invalid_argument(format!(
                    "{field}: {value} is not a multiple of {multiple} (this model's VAE \
                     downsamples by {f} and its U-Net by {})",
                    models.latent_multiple
                )));
            }
        }
        let scheduler_name = if params.scheduler.is_empty() {
            models.default_scheduler.as_str()
        } else {
            params.scheduler.as_str()
        };
        let overrides = crate::request::overrides(&params.scheduler_options)?;
        let mut scheduler = schedulers::build_with(
            scheduler_name,
            &models.scheduler_config,
            &overrides,
            params.steps as usize,
        )
        .map_err(|e| Status::invalid_argument(format!("scheduler: {e}")))?;

        let (context, warnings) = self.encode(params, deadline).await?;
        let encoded = Instant::now();
        let n = params.num_images as i64;
        let channels = models.latent_channels as i64;
        let shape = [n, channels, (height / f) as i64, (width / f) as i64];
        let numel = shape.iter().product::<i64>() as usize;
        // diffusers' prepare_latents: one draw of shape [N, C, h, w] from the seeded generator.
        let mut rng = TorchGenerator::new(params.seed);
        let sigma = scheduler.init_noise_sigma();
        let mut latents: Vec<f32> = rng.randn(numel).into_iter().map(|x| x * sigma).collect();

        let guided = params.uses_guidance();
        let guidance = if guided {
            vec![params.guidance_scale; n as usize]
        } else {
            vec![]
        };
        let rescale = if guided && params.guidance_rescale > 0.0 {
            vec![params.guidance_rescale; n as usize]
        } else {
            vec![]
        };
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len() as u32;
        let (mut queue_wait, mut compute) = (0.0, 0.0);
        // Names this generation's context in the denoisers' conditioning caches.
        let context_id = format!("{:032x}", rand::random::<u128>());
        // Whether the replica that served the last step said it cached the context, and which
        // replica that was: later steps prefer it while it is no busier than the others, so
        // they find the context there instead of costing a miss on another replica.
        let mut cached = false;
        let mut last_replica: Option<String> = None;
        let steps = StepStream::new(deadline);
        for (i, &t) in timesteps.iter().enumerate() {
            let input = scheduler.scale_model_input(&latents, i);
            let step = DenoiseRequest {
                sample: Some(Tensor::from_f32(&shape, &input)),
                timesteps: Some(Tensor::from_f32(&[n], &vec![t; n as usize])),
                encoder_hidden_states: Some(context.clone()),
                guidance_scale: guidance.clone(),
                guidance_rescale: rescale.clone(),
                context_id: context_id.clone(),
            };
            let bare = cached.then(|| DenoiseRequest {
                encoder_hidden_states: None,
                ..step.clone()
            });
            let span = tracing::info_span!(
                "denoise_step",
                step = i,
                timestep = t,
                replica = tracing::field::Empty,
                batch_rows = tracing::field::Empty
            );
            let (response, replica) = self
                .denoiser
                .call_on(
                    "denoise",
                    deadline,
                    last_replica.as_deref(),
                    |replica, ch, timeout| steps.step(replica, ch, &step, bare.as_ref(), timeout),
                )
                .instrument(span.clone())
                .await?;
            span.record("replica", replica.as_str());
            last_replica = Some(replica);
            span.record("batch_rows", response.batch_rows);
            cached = response.context_cached;
            queue_wait += response.queue_wait_seconds;
            compute += response.compute_seconds;
            let output = response
                .model_output
                .ok_or_else(|| Status::internal("denoiser: response without model_output"))?;
            output
                .validate_shape(
                    "model_output",
                    "[B, C, h, w]",
                    &shape.map(|d| ("dim", Some(d))),
                )
                .map_err(|e| Status::internal(format!("denoiser returned a bad tensor: {e}")))?;
            let output = output
                .to_f32_vec("model_output")
                .map_err(|e| Status::internal(e.to_string()))?;
            latents = scheduler
                .step(&output, i, &latents, &mut rng)
                .map_err(|e| Status::internal(format!("scheduler step {i}: {e}")))?;
            let step_no = i as u32 + 1;
            let preview = (params.preview_every > 0
                && (step_no.is_multiple_of(params.preview_every) || step_no == total))
                .then(|| preview::latents_to_png(&latents, &shape))
                .flatten();
            let event = Progress {
                step: step_no,
                total_steps: total,
                elapsed_seconds: started.elapsed().as_secs_f64(),
                preview,
            };
            if !progress(event) {
                return Err(Status::cancelled("generation cancelled by the client"));
            }
        }
        let denoised = Instant::now();

        let decode = DecodeRequest {
            latents: Some(Tensor::from_f32(&shape, &latents)),
            encoding: ImageEncoding::Png as i32,
        };
        let (decoded, _) = self
            .vae
            .call("decode", deadline, |ch, timeout| {
                let decode = decode.clone();
                async move { stages::vae(ch).decode(request(decode, timeout)).await }
            })
            .instrument(tracing::info_span!("decode"))
            .await?;
        let images = decoded
            .images
            .into_iter()
            .map(|img| Image {
                data: img.data,
                format: OutputFormat::Png as i32,
                width: img.width,
                height: img.height,
            })
            .collect();
        let secs = |d: Duration| d.as_secs_f64();
        Ok(GenerateResponse {
            images,
            seed: params.seed,
            warnings,
            scheduler: scheduler_name.to_string(),
            steps: total,
            timings: Some(StageTimings {
                encode_seconds: secs(encoded - started),
                denoise_seconds: secs(denoised - encoded),
                decode_seconds: secs(denoised.elapsed()),
                total_seconds: secs(started.elapsed()),
                denoiser_queue_seconds: queue_wait,
                denoiser_compute_seconds: compute,
            }),
        })
    }

    /// Encodes the prompt (and the negative prompt when guidance is on) and lays the hidden
    /// states out as the denoiser expects: `[N unconditional rows, N conditional rows]`.
    #[tracing::instrument(name = "encode", skip_all)]
    async fn encode(
        &self,
        params: &Params,
        deadline: Option<Instant>,
    ) -> Result<(Tensor, Vec<String>), Status> {
        let guided = params.uses_guidance();
        let prompts = if guided {
            vec![params.negative_prompt.clone(), params.prompt.clone()]
        } else {
            vec![params.prompt.clone()]
        };
        // diffusers' encode_prompt applies clip_skip to the prompt only.
        let clip_skip = if guided {
            vec![0, params.clip_skip]
        } else {
            vec![params.clip_skip]
        };
        let encode = EncodeRequest {
            prompts: prompts.clone(),
            clip_skip,
            long_prompt: params.long_prompt,
            prompt_weighting: params.prompt_weighting,
        };
        let (response, _) = self
            .text_encoder
            .call("encode", deadline, |ch, timeout| {
                let encode = encode.clone();
                async move {
                    stages::text_encoder(ch)
                        .encode(request(encode, timeout))
                        .await
                }
            })
            .await?;
        let hidden = response
            .hidden_states
            .ok_or_else(|| Status::internal("text-encoder: response without hidden_states"))?;
        hidden
            .validate_shape(
                "hidden_states",
                "[prompts, T, D]",
                &[
                    ("prompts", Some(prompts.len() as i64)),
                    ("tokens", None),
                    ("width", None),
                ],
            )
            .map_err(|e| Status::internal(format!("text-encoder returned a bad tensor: {e}")))?;
        let mut warnings = Vec::new();
        let names = if guided {
            ["negative_prompt", "prompt"].as_slice()
        } else {
            ["prompt"].as_slice()
        };
        for (name, dropped) in names.iter().zip(&response.truncated_tokens) {
            if *dropped > 0 {
                warnings.push(format!(
                    "{name}: {dropped} token(s) beyond the text encoder's context were dropped \
                     (set long_prompt to keep them)"
                ));
            }
        }
        Ok((repeat_rows(&hidden, params.num_images as usize), warnings))
    }
}

/// What a stage's `ModelInfo` says it serves.
fn identity(model: &Option<ModelInfo>) -> Identity {
    model
        .as_ref()
        .map(|m| Identity {
            model_id: m.model_id.clone(),
            revision: m.revision.clone(),
        })
        .unwrap_or_default()
}

/// The Info answers of one stage's replicas, checked to report the same identity.
struct Answers<T> {
    /// The first answer (the others report the same model and revision).
    info: T,
    identity: Identity,
    /// Addresses of the replicas that answered, the first one's first.
    replicas: Vec<String>,
    /// Replicas that did not answer, and why.
    silent: Vec<(String, Status)>,
}

impl<T> Answers<T> {
    /// Sorts `outcomes` (from [`Stage::call_each`]) into answers and silences. Replicas
    /// reporting different identities are FAILED_PRECONDITION naming two of them; no answer
    /// at all is the first replica's error.
    fn check(
        stage: &str,
        outcomes: Vec<(String, Result<T, Status>)>,
        model: impl Fn(&T) -> &Option<ModelInfo>,
    ) -> Result<Self, Status> {
        let mut answered = Vec::new();
        let mut silent = Vec::new();
        for (address, outcome) in outcomes {
            match outcome {
                Ok(info) => answered.push((address, identity(model(&info)), info)),
                Err(status) => silent.push((address, status)),
            }
        }
        let seen: Vec<(String, Identity)> = answered
            .iter()
            .map(|(address, identity, _)| (address.clone(), identity.clone()))
            .collect();
        if let Some(message) = disagreement(stage, &seen) {
            return Err(Status::failed_precondition(message));
        }
        let mut answered = answered.into_iter();
        let Some((first, identity, info)) = answered.next() else {
            return Err(match silent.into_iter().next() {
                Some((_, status)) => status,
                None => Status::unavailable(format!(
                    "{stage} stage unavailable (info): no replica known"
                )),
            });
        };
        let replicas = std::iter::once(first)
            .chain(answered.map(|(address, _, _)| address))
            .collect();
        Ok(Self {
            info,
            identity,
            replicas,
            silent,
        })
    }

    /// Fixes `stage`'s identity to the one its replicas reported and puts them in rotation;
    /// logs the replicas that did not answer (they are probed until they do).
    fn establish(&self, stage: &Stage) {
        for (address, status) in &self.silent {
            tracing::warn!(
                stage = stage.name(),
                replica = %address,
                "no Info at start-up, kept out of rotation until it answers: {}",
                status.message()
            );
        }
        tracing::info!(
            stage = stage.name(),
            "{} replica(s) serve {}",
            self.replicas.len(),
            self.identity
        );
        stage.establish(self.identity.clone(), &self.replicas);
    }
}

/// The first replica of `stage` and one reporting another identity, as an error message;
/// `None` when all of `seen` agree.
fn disagreement(stage: &str, seen: &[(String, Identity)]) -> Option<String> {
    let (first, want) = seen.first()?;
    let (other, got) = seen.iter().find(|(_, i)| i != want)?;
    Some(format!(
        "{stage} replicas disagree: {first} serves {want} but {other} serves {got}"
    ))
}

/// Repeats each row (first dimension) of `t` `n` times, keeping row order: rows [a, b] become
/// [a x n, b x n], which is the unconditional-then-conditional layout for `n` images.
fn repeat_rows(t: &Tensor, n: usize) -> Tensor {
    let rows = t.shape[0] as usize;
    let row_bytes = t.data.len() / rows.max(1);
    let mut data = Vec::with_capacity(t.data.len() * n);
    for row in t.data.chunks_exact(row_bytes) {
        for _ in 0..n {
            data.extend_from_slice(row);
        }
    }
    let mut shape = t.shape.clone();
    shape[0] *= n as i64;
    Tensor {
        dtype: t.dtype,
        shape,
        data: data.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(model_id: &str, revision: &str) -> Option<ModelInfo> {
        Some(ModelInfo {
            model_id: model_id.into(),
            revision: revision.into(),
            ..Default::default()
        })
    }

    #[test]
    fn replicas_must_agree_on_model_and_revision() {
        let ok = |a: &str, m| (a.to_string(), Ok(m));
        let answers = Answers::check(
            "denoiser",
            vec![
                ("http://a:1".to_string(), Err(Status::unavailable("down"))),
                ok("http://b:2", info("sd", "0123")),
                ok("http://c:3", info("sd", "0123")),
            ],
            |m| m,
        )
        .unwrap();
        assert_eq!(answers.replicas, ["http://b:2", "http://c:3"]);
        assert_eq!(answers.silent.len(), 1);
        assert_eq!(answers.identity.to_string(), "sd revision 0123");

        let err = Answers::check(
            "denoiser",
            vec![
                ok("http://b:2", info("sd", "0123")),
                ok("http://c:3", info("sd", "0123")),
                ok("http://d:4", info("sd", "4567")),
            ],
            |m| m,
        )
        .err()
        .unwrap();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            err.message(),
            "denoiser replicas disagree: http://b:2 serves sd revision 0123 but http://d:4 \
             serves sd revision 4567"
        );
        let err = Answers::check(
            "vae",
            vec![ok("http://b:2", info("a", "1")), ok("http://c:3", None)],
            |m| m,
        )
        .err()
        .unwrap();
        assert!(err.message().contains("(no model id)"), "{}", err.message());

        // Nobody answered: the first replica's error.
        let err = Answers::<Option<ModelInfo>>::check(
            "vae",
            vec![("http://a:1".to_string(), Err(Status::unavailable("down")))],
            |m| m,
        )
        .err()
        .unwrap();
        assert_eq!(
            (err.code(), err.message()),
            (tonic::Code::Unavailable, "down")
        );
        let err = Answers::<Option<ModelInfo>>::check("vae", vec![], |m| m)
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn repeat_rows_keeps_uncond_then_cond_order() {
        let t = Tensor::from_f32(&[2, 1, 2], &[1.0, 2.0, 3.0, 4.0]);
        let r = repeat_rows(&t, 3);
        assert_eq!(r.shape, vec![6, 1, 2]);
        assert_eq!(
            r.to_f32_vec("x").unwrap(),
            vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0]
        );
    }
}

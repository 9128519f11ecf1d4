//! One generation, end to end: encode the prompts, draw the initial noise from the seed, run
//! the reverse-diffusion loop against the denoiser, decode with the VAE.
//!
//! The loop follows diffusers' `StableDiffusionPipeline.__call__`: prompt embeddings with the
//! negative prompt as the unconditional half when guidance is on, latents drawn as
//! `randn([N, C, h, w], generator=Generator("cpu").manual_seed(seed)) * init_noise_sigma`, then
//! for each timestep `scale_model_input`, a (guided) model call and `scheduler.step`.

use crate::{
    request::Params,
    rng::TorchGenerator,
    schedulers::{self, SchedulerConfig},
    stages::{self, Stage},
};
use sd_proto::{
    stage::{
        DecodeRequest, DenoiseRequest, DenoiserServiceInfoRequest, EncodeRequest, ImageEncoding,
        Tensor, TextEncoderServiceInfoRequest, VaeServiceInfoRequest,
    },
    v1::{GenerateResponse, Image, OutputFormat, Progress},
};
use tokio::sync::OnceCell;
use tonic::Status;

/// The three stages and what they said about their models.
pub struct Pipeline {
    pub text_encoder: Stage,
    pub denoiser: Stage,
    pub vae: Stage,
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
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: String,
}

impl Pipeline {
    pub fn new(text_encoder: Stage, denoiser: Stage, vae: Stage) -> Self {
        Self {
            text_encoder,
            denoiser,
            vae,
            models: OnceCell::new(),
        }
    }

    /// Reads every stage's Info once and checks they fit together: the text encoder's width is
    /// the U-Net's cross-attention width, the U-Net's latent channels are the VAE's, and all
    /// stages serve the same model id. Failures are not cached, so a stage that comes up later
    /// is picked up by the next request.
    pub async fn models(&self) -> Result<&Models, Status> {
        self.models.get_or_try_init(|| self.read_models()).await
    }

    async fn read_models(&self) -> Result<Models, Status> {
        let te = self
            .text_encoder
            .call("info", |ch| async move {
                stages::text_encoder(ch)
                    .info(TextEncoderServiceInfoRequest {})
                    .await
            })
            .await?;
        let dn = self
            .denoiser
            .call("info", |ch| async move {
                stages::denoiser(ch)
                    .info(DenoiserServiceInfoRequest {})
                    .await
            })
            .await?;
        let vae = self
            .vae
            .call("info", |ch| async move {
                stages::vae(ch).info(VaeServiceInfoRequest {}).await
            })
            .await?;
        let mismatch =
            |what: String| Status::failed_precondition(format!("stages disagree: {what}"));
        if te.hidden_size != dn.cross_attention_dim {
            return Err(mismatch(format!(
                "text-encoder hidden_size {} != denoiser cross_attention_dim {}",
                te.hidden_size, dn.cross_attention_dim
            )));
        }
        if dn.in_channels != vae.latent_channels || dn.out_channels != vae.latent_channels {
            return Err(mismatch(format!(
                "denoiser in/out channels {}/{} != vae latent_channels {}",
                dn.in_channels, dn.out_channels, vae.latent_channels
            )));
        }
        let ids = [
            (
                "text-encoder",
                te.model.as_ref().map(|m| m.model_id.as_str()).unwrap_or(""),
            ),
            (
                "denoiser",
                dn.model.as_ref().map(|m| m.model_id.as_str()).unwrap_or(""),
            ),
            (
                "vae",
                vae.model
                    .as_ref()
                    .map(|m| m.model_id.as_str())
                    .unwrap_or(""),
            ),
        ];
        if ids.iter().any(|(_, id)| *id != ids[0].1) {
            return Err(mismatch(format!("model ids {ids:?}")));
        }
        let scheduler_config =
            SchedulerConfig::from_json(&dn.scheduler_config_json).map_err(|e| {
                Status::failed_precondition(format!(
                    "denoiser: the model's scheduler_config.json: {e}"
                ))
            })?;
        let default_scheduler = schedulers::name_for_class(scheduler_config.class_name())
            .unwrap_or(schedulers::DEFAULT)
            .to_string();
        Ok(Models {
            hidden_size: te.hidden_size,
            latent_channels: vae.latent_channels,
            downsample_factor: vae.downsample_factor.max(1),
            sample_size: dn.sample_size,
            scheduler_config,
            default_scheduler,
        })
    }

    /// Runs one generation. `progress` is called after every step; returning `false` from it
    /// (the client went away) stops the generation with CANCELLED.
    pub async fn generate(
        &self,
        params: &Params,
        mut progress: impl FnMut(Progress) -> bool,
    ) -> Result<GenerateResponse, Status> {
        let models = self.models().await?;
        let native = models.sample_size * models.downsample_factor;
        let (width, height) = (
            params.width.unwrap_or(native),
            params.height.unwrap_or(native),
        );
        let f = models.downsample_factor;
        if width % f != 0 || height % f != 0 {
            return Err(Status::invalid_argument(format!(
                "width/height: {width}x{height} is not a multiple of the VAE's factor {f}"
            )));
        }
        let scheduler_name = if params.scheduler.is_empty() {
            models.default_scheduler.as_str()
        } else {
            params.scheduler.as_str()
        };
        let mut scheduler = schedulers::build(
            scheduler_name,
            &models.scheduler_config,
            params.steps as usize,
        )
        .map_err(|e| Status::invalid_argument(format!("scheduler: {e}")))?;

        let (context, warnings) = self.encode(params).await?;
        let n = params.num_images as i64;
        let shape = [
            n,
            models.latent_channels as i64,
            (height / f) as i64,
            (width / f) as i64,
        ];
        let numel = shape.iter().product::<i64>() as usize;
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
        for (i, &t) in timesteps.iter().enumerate() {
            let input = scheduler.scale_model_input(&latents, i);
            let request = DenoiseRequest {
                sample: Some(Tensor::from_f32(&shape, &input)),
                timesteps: Some(Tensor::from_f32(&[n], &vec![t; n as usize])),
                encoder_hidden_states: Some(context.clone()),
                guidance_scale: guidance.clone(),
                guidance_rescale: rescale.clone(),
            };
            let response = self
                .denoiser
                .call("denoise", |ch| {
                    let request = request.clone();
                    async move { stages::denoiser(ch).denoise(request).await }
                })
                .await?;
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
            if !progress(Progress {
                step: i as u32 + 1,
                total_steps: total,
            }) {
                return Err(Status::cancelled("generation cancelled by the client"));
            }
        }

        let decoded = self
            .vae
            .call("decode", |ch| {
                let request = DecodeRequest {
                    latents: Some(Tensor::from_f32(&shape, &latents)),
                    encoding: ImageEncoding::Png as i32,
                };
                async move { stages::vae(ch).decode(request).await }
            })
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
        Ok(GenerateResponse {
            images,
            seed: params.seed,
            warnings,
            scheduler: scheduler_name.to_string(),
            steps: total,
        })
    }

    /// Encodes the prompt (and the negative prompt when guidance is on) and lays the hidden
    /// states out as the denoiser expects: `[N unconditional rows, N conditional rows]`.
    async fn encode(&self, params: &Params) -> Result<(Tensor, Vec<String>), Status> {
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
        let response = self
            .text_encoder
            .call("encode", |ch| {
                let request = EncodeRequest {
                    prompts: prompts.clone(),
                    clip_skip: clip_skip.clone(),
                    long_prompt: params.long_prompt,
                    prompt_weighting: params.prompt_weighting,
                };
                async move { stages::text_encoder(ch).encode(request).await }
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
                    "{name}: {dropped} token(s) beyond the text encoder's context were dropped"
                ));
            }
        }
        Ok((repeat_rows(&hidden, params.num_images as usize), warnings))
    }
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

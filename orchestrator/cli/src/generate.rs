//! `sd generate`: one request to an orchestrator, or to every stage started in-process.

use crate::local;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use sd_proto::v1::{
    GenerateRequest, GenerateResponse, GenerateStreamRequest, OutputFormat, SchedulerOptions,
    generate_stream_response::Event, image_generation_service_client::ImageGenerationServiceClient,
};
use std::path::{Path, PathBuf};
use tokio_stream::StreamExt;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// What the image should show.
    #[arg(long)]
    prompt: String,
    /// What the image should not show.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Seed of the initial noise (random when absent; the seed used is printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Denoising steps (server default when absent).
    #[arg(long)]
    steps: Option<u32>,
    /// Sampling schedule by name, e.g. ddim (the model's default when absent).
    #[arg(long, default_value = "")]
    scheduler: String,
    /// Classifier-free guidance scale (7.5 when absent).
    #[arg(long)]
    guidance: Option<f32>,
    /// Image width in pixels, a multiple of 8 (the model's native size when absent).
    #[arg(long)]
    width: Option<u32>,
    /// Image height in pixels, a multiple of 8 (the model's native size when absent).
    #[arg(long)]
    height: Option<u32>,
    /// Number of images; more than one are written as NAME-0.png, NAME-1.png, ...
    #[arg(long, default_value_t = 1)]
    num_images: u32,
    /// Use the text encoder's hidden states this many layers before the last.
    #[arg(long)]
    clip_skip: Option<u32>,
    /// Encode prompts beyond the text encoder's context in chunks instead of truncating.
    #[arg(long)]
    long_prompt: bool,
    /// Honour `(word:1.3)`, `(word)` and `[word]` emphasis in the prompts.
    #[arg(long)]
    prompt_weighting: bool,
    /// Guidance rescale in [0, 1] (diffusers' `guidance_rescale`).
    #[arg(long)]
    guidance_rescale: Option<f32>,
    /// Karras noise levels (sigma-based schedulers).
    #[arg(long)]
    karras: bool,
    /// Timestep spacing override: leading, linspace or trailing.
    #[arg(long, default_value = "")]
    timestep_spacing: String,
    /// Other scheduler config overrides, `NAME=VALUE` (e.g. `rescale_betas_zero_snr=true`,
    /// `prediction_type=v_prediction`, `eta=0.5`); repeatable.
    #[arg(long = "scheduler-option", value_name = "NAME=VALUE")]
    scheduler_option: Vec<String>,
    /// Where to write the PNG.
    #[arg(long, short)]
    output: PathBuf,
    /// Orchestrator to send the request to.
    #[arg(
        long,
        env = "SD_ORCHESTRATOR",
        default_value = "http://127.0.0.1:50051",
        conflicts_with = "local"
    )]
    orchestrator: String,
    /// Run every stage inside this process instead of calling an orchestrator.
    #[arg(long)]
    local: bool,
    /// Model folder (diffusers layout) for --local; the project's own shapes model (trained
    /// by `sd train`, shipped in the repository) when absent.
    #[arg(long, env = "SD_MODEL")]
    model: Option<PathBuf>,
    /// Device for --local: cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    device: String,
    /// Element type for --local: f32, f16 or bf16 (half precision needs CUDA).
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    dtype: String,
}

pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: args.guidance,
        seed: args.seed,
        scheduler: args.scheduler.clone(),
        num_images: Some(args.num_images),
        output_format: OutputFormat::Png as i32,
        clip_skip: args.clip_skip,
        long_prompt: args.long_prompt,
        prompt_weighting: args.prompt_weighting,
        guidance_rescale: args.guidance_rescale,
        scheduler_options: Some(scheduler_options(&args)?),
        preview_every: 0,
    };
    let (address, cluster) = if args.local {
        let model = args
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from(sd_training::DEFAULT_MODEL_DIR));
        let cluster = local::Cluster::start(&model, &args.device, &args.dtype).await?;
        (cluster.orchestrator_url(), Some(cluster))
    } else {
        (args.orchestrator.clone(), None)
    };
    let outcome = request_images(&address, request).await;
    if let Some(cluster) = cluster {
        cluster.stop().await;
    }
    let response = outcome?;
    for warning in &response.warnings {
        eprintln!("warning: {warning}");
    }
    let paths = write_images(&args.output, &response)?;
    if let Some(t) = &response.timings {
        println!(
            "generated in {:.3} s: encode {:.3} s, denoise {:.3} s, decode {:.3} s",
            t.total_seconds, t.encode_seconds, t.denoise_seconds, t.decode_seconds
        );
    }
    for (path, image) in paths.iter().zip(&response.images) {
        println!(
            "wrote {} ({}x{}, seed {}, {} steps, {})",
            path.display(),
            image.width,
            image.height,
            response.seed,
            response.steps,
            response.scheduler
        );
    }
    Ok(())
}

/// The scheduler overrides given on the command line as the API's message.
fn scheduler_options(args: &GenerateArgs) -> anyhow::Result<SchedulerOptions> {
    let mut options = SchedulerOptions {
        karras_sigmas: args.karras.then_some(true),
        timestep_spacing: args.timestep_spacing.clone(),
        ..Default::default()
    };
    for item in &args.scheduler_option {
        let (name, value) = item
            .split_once('=')
            .with_context(|| format!("--scheduler-option {item:?}: expected NAME=VALUE"))?;
        let bad = || anyhow::anyhow!("--scheduler-option {name}: cannot parse {value:?}");
        let flag = || value.parse::<bool>().map_err(|_| bad());
        match name {
            "timestep_spacing" => options.timestep_spacing = value.into(),
            "prediction_type" => options.prediction_type = value.into(),
            "beta_schedule" => options.beta_schedule = value.into(),
            "steps_offset" => options.steps_offset = Some(value.parse().map_err(|_| bad())?),
            "eta" => options.eta = Some(value.parse().map_err(|_| bad())?),
            "use_karras_sigmas" | "karras_sigmas" => options.karras_sigmas = Some(flag()?),
            "rescale_betas_zero_snr" => options.rescale_betas_zero_snr = Some(flag()?),
            "clip_sample" => options.clip_sample = Some(flag()?),
            "set_alpha_to_one" => options.set_alpha_to_one = Some(flag()?),
            other => anyhow::bail!(
                "--scheduler-option {other}: unknown; valid: timestep_spacing, prediction_type, \
                 beta_schedule, steps_offset, eta, use_karras_sigmas, rescale_betas_zero_snr, \
                 clip_sample, set_alpha_to_one"
            ),
        }
    }
    Ok(options)
}

/// Streams the generation, showing a progress bar on a terminal.
async fn request_images(
    address: &str,
    request: GenerateRequest,
) -> anyhow::Result<GenerateResponse> {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .with_context(|| format!("--orchestrator {address:?}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the orchestrator at {address}"))?;
    let mut client = ImageGenerationServiceClient::new(channel)
        .max_decoding_message_size(sd_proto::MAX_MESSAGE_BYTES);
    let mut stream = client
        .generate_stream(GenerateStreamRequest {
            request: Some(request),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    while let Some(event) = stream.next().await {
        match event.map_err(status_error)?.event {
            Some(Event::Progress(p)) => {
                bar.set_length(u64::from(p.total_steps));
                bar.set_position(u64::from(p.step));
            }
            Some(Event::Result(response)) => {
                bar.finish_and_clear();
                return Ok(response);
            }
            None => {}
        }
    }
    anyhow::bail!("the orchestrator closed the stream without a result")
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// Writes the images: `output` itself for one, `stem-i.ext` for several.
fn write_images(output: &Path, response: &GenerateResponse) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let many = response.images.len() > 1;
    let mut paths = Vec::new();
    for (i, image) in response.images.iter().enumerate() {
        let path = if many {
            let stem = output
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let ext = output
                .extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or("png".into());
            output.with_file_name(format!("{stem}-{i}.{ext}"))
        } else {
            output.to_path_buf()
        };
        std::fs::write(&path, &image.data)
            .with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

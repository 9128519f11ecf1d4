//! Validation of public requests into [`Params`]. Every field of `GenerateRequest` is
//! destructured, so a field added to the proto fails to compile here until it is handled.
//! Each refusal is INVALID_ARGUMENT naming the field.

use crate::schedulers::SchedulerOverrides;
use sd_proto::v1::{GenerateRequest, OutputFormat, SchedulerOptions};
use tonic::Status;

/// Server-side bounds and defaults for requests.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Largest image width accepted, in pixels.
    #[arg(long, env = "SD_MAX_WIDTH", default_value_t = 2048)]
    pub max_width: u32,
    /// Largest image height accepted, in pixels.
    #[arg(long, env = "SD_MAX_HEIGHT", default_value_t = 2048)]
    pub max_height: u32,
    /// Most denoising steps a request may ask for.
    #[arg(long, env = "SD_MAX_STEPS", default_value_t = 150)]
    pub max_steps: u32,
    /// Most images one request may ask for.
    #[arg(long, env = "SD_MAX_IMAGES", default_value_t = 8)]
    pub max_images: u32,
    /// Longest prompt (and negative prompt) accepted, in UTF-8 bytes.
    #[arg(long, env = "SD_MAX_PROMPT_BYTES", default_value_t = 4096)]
    pub max_prompt_bytes: usize,
    /// Steps when a request does not say.
    #[arg(long, env = "SD_DEFAULT_STEPS", default_value_t = 50)]
    pub default_steps: u32,
    /// Guidance scale when a request does not say.
    #[arg(long, env = "SD_DEFAULT_GUIDANCE", default_value_t = 7.5)]
    pub default_guidance: f32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_width: 2048,
            max_height: 2048,
            max_steps: 150,
            max_images: 8,
            max_prompt_bytes: 4096,
            default_steps: 50,
            default_guidance: 7.5,
        }
    }
}

/// The request's scheduler options as [`SchedulerOverrides`]. Every field of
/// `SchedulerOptions` is destructured; an unknown value is INVALID_ARGUMENT listing the valid
/// ones (whether the chosen scheduler has the option is checked when it is built).
pub fn overrides(options: &SchedulerOptions) -> Result<SchedulerOverrides, Status> {
    let SchedulerOptions {
        karras_sigmas,
        timestep_spacing,
        steps_offset,
        prediction_type,
        beta_schedule,
        rescale_betas_zero_snr,
        clip_sample,
        set_alpha_to_one,
        eta,
    } = options;
    let given: [(&str, Option<String>); 9] = [
        ("use_karras_sigmas", karras_sigmas.map(|v| v.to_string())),
        (
            "timestep_spacing",
            Some(timestep_spacing.clone()).filter(|s| !s.is_empty()),
        ),
        ("steps_offset", steps_offset.map(|v| v.to_string())),
        (
            "prediction_type",
            Some(prediction_type.clone()).filter(|s| !s.is_empty()),
        ),
        (
            "beta_schedule",
            Some(beta_schedule.clone()).filter(|s| !s.is_empty()),
        ),
        (
            "rescale_betas_zero_snr",
            rescale_betas_zero_snr.map(|v| v.to_string()),
        ),
        ("clip_sample", clip_sample.map(|v| v.to_string())),
        ("set_alpha_to_one", set_alpha_to_one.map(|v| v.to_string())),
        ("eta", eta.map(|v| v.to_string())),
    ];
    let mut overrides = SchedulerOverrides::default();
    for (option, value) in given {
        if let Some(value) = value {
            overrides.set(option, &value).map_err(|e| {
                Status::invalid_argument(format!("scheduler_options.{option}: {e}"))
            })?;
        }
    }
    Ok(overrides)
}

/// Upper bound on `clip_skip` checked here; the text encoder checks it against its own depth.
pub const MAX_CLIP_SKIP: u32 = 64;

/// A validated request. Width and height stay optional until the model's native size is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub steps: u32,
    pub guidance_scale: f32,
    pub seed: u64,
    /// Empty: the model's default scheduler.
    pub scheduler: String,
    pub num_images: u32,
    pub output_format: OutputFormat,
    /// Layers skipped at the end of the text encoder (0: none).
    pub clip_skip: u32,
    /// Chunked encoding of prompts beyond the text encoder's context.
    pub long_prompt: bool,
    /// Emphasis syntax in the prompts.
    pub prompt_weighting: bool,
    /// `rescale_noise_cfg` factor in [0, 1] (0: off).
    pub guidance_rescale: f32,
    /// Overrides of the model's scheduler configuration.
    pub scheduler_options: SchedulerOptions,
    /// Streamed previews every this many steps (0: none).
    pub preview_every: u32,
}

impl Params {
    /// Classifier-free guidance runs when the scale is above 1, as in diffusers
    /// (`do_classifier_free_guidance`); at 1 it would only double the work.
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }
}

/// Checks `request` against `limits`; `random_seed` supplies the seed when none is given.
pub fn validate(
    request: GenerateRequest,
    limits: &Limits,
    random_seed: impl FnOnce() -> u64,
) -> Result<Params, Status> {
    let GenerateRequest {
        prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance_scale,
        seed,
        scheduler,
        num_images,
        output_format,
        clip_skip,
        long_prompt,
        prompt_weighting,
        guidance_rescale,
        scheduler_options,
        preview_every,
    } = request;
    let bad = |field: &str, why: String| Status::invalid_argument(format!("{field}: {why}"));
    for (field, text) in [("prompt", &prompt), ("negative_prompt", &negative_prompt)] {
        if text.len() > limits.max_prompt_bytes {
            return Err(bad(
                field,
                format!("{} bytes, at most {}", text.len(), limits.max_prompt_bytes),
            ));
        }
    }
    for (field, value, max) in [
        ("width", width, limits.max_width),
        ("height", height, limits.max_height),
    ] {
        if let Some(v) = value {
            if v == 0 || v % 8 != 0 {
                return Err(bad(field, format!("{v} is not a positive multiple of 8")));
            }
            if v > max {
                return Err(bad(field, format!("{v} is above the maximum {max}")));
            }
        }
    }
    let steps = steps.unwrap_or(limits.default_steps);
    if steps == 0 || steps > limits.max_steps {
        return Err(bad(
            "steps",
            format!("{steps} is outside 1..={}", limits.max_steps),
        ));
    }
    let guidance_scale = guidance_scale.unwrap_or(limits.default_guidance);
    if !guidance_scale.is_finite() || guidance_scale < 0.0 {
        return Err(bad(
            "guidance_scale",
            format!("{guidance_scale} is not a finite number >= 0"),
        ));
    }
    let guidance_rescale = guidance_rescale.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&guidance_rescale) {
        return Err(bad(
            "guidance_rescale",
            format!("{guidance_rescale} is outside [0, 1]"),
        ));
    }
    let clip_skip = clip_skip.unwrap_or(0);
    if clip_skip > MAX_CLIP_SKIP {
        return Err(bad(
            "clip_skip",
            format!("{clip_skip} is above {MAX_CLIP_SKIP}"),
        ));
    }
    let num_images = num_images.unwrap_or(1);
    if num_images == 0 || num_images > limits.max_images {
        return Err(bad(
            "num_images",
            format!("{num_images} is outside 1..={}", limits.max_images),
        ));
    }
    let output_format = match OutputFormat::try_from(output_format) {
        Ok(OutputFormat::Unspecified) | Ok(OutputFormat::Png) => OutputFormat::Png,
        Err(_) => {
            return Err(bad(
                "output_format",
                format!("unknown value {output_format}"),
            ));
        }
    };
    let scheduler = scheduler.trim().to_ascii_lowercase();
    if !scheduler.is_empty() && !crate::schedulers::NAMES.contains(&scheduler.as_str()) {
        return Err(bad(
            "scheduler",
            format!(
                "unknown scheduler {scheduler:?}; valid: {}",
                crate::schedulers::NAMES.join(", ")
            ),
        ));
    }
    Ok(Params {
        prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance_scale,
        seed: seed.unwrap_or_else(random_seed),
        scheduler,
        num_images,
        output_format,
        clip_skip,
        long_prompt,
        prompt_weighting,
        guidance_rescale,
        scheduler_options: {
            let options = scheduler_options.unwrap_or_default();
            overrides(&options)?;
            options
        },
        preview_every,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn ok(req: GenerateRequest) -> Params {
        validate(req, &Limits::default(), || 7).unwrap()
    }

    fn refused(req: GenerateRequest, field: &str) {
        let err = validate(req, &Limits::default(), || 7).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{}",
            err.message()
        );
    }

    fn req() -> GenerateRequest {
        GenerateRequest {
            prompt: "a red circle".into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_apply_and_random_seed_is_used() {
        let p = ok(req());
        assert_eq!(
            (p.steps, p.guidance_scale, p.num_images, p.seed),
            (50, 7.5, 1, 7)
        );
        assert_eq!((p.width, p.height), (None, None));
        assert_eq!(
            ok(GenerateRequest {
                seed: Some(42),
                ..req()
            })
            .seed,
            42
        );
        assert!(ok(req()).uses_guidance());
        assert!(
            !ok(GenerateRequest {
                guidance_scale: Some(1.0),
                ..req()
            })
            .uses_guidance()
        );
    }

    #[test]
    fn sizes_must_be_positive_multiples_of_8_within_limits() {
        refused(
            GenerateRequest {
                width: Some(65),
                ..req()
            },
            "width",
        );
        refused(
            GenerateRequest {
                width: Some(0),
                ..req()
            },
            "width",
        );
        refused(
            GenerateRequest {
                height: Some(4096),
                ..req()
            },
            "height",
        );
        assert_eq!(
            ok(GenerateRequest {
                height: Some(512),
                ..req()
            })
            .height,
            Some(512)
        );
    }

    #[test]
    fn steps_guidance_images_scheduler_prompt() {
        refused(
            GenerateRequest {
                steps: Some(0),
                ..req()
            },
            "steps",
        );
        refused(
            GenerateRequest {
                steps: Some(151),
                ..req()
            },
            "steps",
        );
        refused(
            GenerateRequest {
                guidance_scale: Some(f32::NAN),
                ..req()
            },
            "guidance_scale",
        );
        refused(
            GenerateRequest {
                guidance_scale: Some(-1.0),
                ..req()
            },
            "guidance_scale",
        );
        refused(
            GenerateRequest {
                guidance_scale: Some(f32::INFINITY),
                ..req()
            },
            "guidance_scale",
        );
        refused(
            GenerateRequest {
                num_images: Some(0),
                ..req()
            },
            "num_images",
        );
        refused(
            GenerateRequest {
                num_images: Some(9),
                ..req()
            },
            "num_images",
        );
        refused(
            GenerateRequest {
                scheduler: "warp".into(),
                ..req()
            },
            "scheduler",
        );
        refused(
            GenerateRequest {
                prompt: "x".repeat(4097),
                ..req()
            },
            "prompt",
        );
        refused(
            GenerateRequest {
                negative_prompt: "x".repeat(4097),
                ..req()
            },
            "negative_prompt",
        );
        refused(
            GenerateRequest {
                output_format: 9,
                ..req()
            },
            "output_format",
        );
        assert_eq!(
            ok(GenerateRequest {
                scheduler: " DDIM ".into(),
                ..req()
            })
            .scheduler,
            "ddim"
        );
    }
}

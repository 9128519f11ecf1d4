//! The U-Net with fused classifier-free guidance, run on one assembled batch.
//!
//! A batch holds steps from several generations ([`Step`]). Each guided step contributes its
//! samples twice (unconditional rows, then conditional rows, matching its context's layout),
//! an unguided step once; all rows run as one U-Net forward, each with its own timestep, and
//! every step's guided prediction is cut back out of the result.

use crate::cache::ContextCache;
use sd_models::{ModelError, unet_2d_condition::UNet2DConditionModel};
use sd_runtime::batcher::Batchable;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// One validated denoising step of one request: CPU tensors as they came off the wire, except
/// a context found in the conditioning cache, which is already on the model's device.
pub struct Step {
    /// `[b, C, H, W]`.
    pub sample: Tensor,
    /// `[b]`, float.
    pub timesteps: Tensor,
    /// `[2b, T, D]` with guidance (unconditional rows first), `[b, T, D]` without.
    pub context: Tensor,
    /// `[b]` guidance scales, or none for an unguided step.
    pub guidance: Option<Tensor>,
    /// `[b]` guidance-rescale factors (needs guidance).
    pub rescale: Option<Tensor>,
    /// Cache the context under this id once it is on the device (the call sent the context
    /// with a `context_id`).
    pub cache_as: Option<String>,
}

/// Steps that can share a forward: same latent size and context length.
pub type BucketKey = (i64, i64, i64);

impl Batchable for Step {
    type Key = BucketKey;

    fn key(&self) -> Option<BucketKey> {
        let s = self.sample.size();
        Some((s[2], s[3], self.context.size()[1]))
    }

    /// U-Net rows: a guided sample is two (unconditional and conditional).
    fn rows(&self) -> usize {
        let b = self.sample.size()[0] as usize;
        if self.guidance.is_some() { 2 * b } else { b }
    }
}

/// The loaded U-Net on its device, and the conditioning cache it fills.
pub struct Model {
    pub unet: UNet2DConditionModel,
    pub device: Device,
    pub cache: Arc<ContextCache>,
}

impl Model {
    /// Runs `steps` (all with the same [`BucketKey`]) as one forward; returns each step's
    /// (guided) prediction as a CPU f32 tensor, in order.
    pub fn denoise(&self, steps: &[Step]) -> Result<Vec<Tensor>, ModelError> {
        tch::no_grad(|| {
            let mut samples = Vec::new();
            let mut timesteps = Vec::new();
            for step in steps {
                samples.push(step.sample.shallow_clone());
                timesteps.push(step.timesteps.shallow_clone());
                if step.guidance.is_some() {
                    samples.push(step.sample.shallow_clone());
                    timesteps.push(step.timesteps.shallow_clone());
                }
            }
            let kind = self.unet.kind();
            let sample = Tensor::f_cat(&samples, 0)?
                .f_to_device(self.device)?
                .f_to_kind(kind)?;
            let timesteps = Tensor::f_cat(&timesteps, 0)?.f_to_device(self.device)?;
            // Each context on the device in the model's dtype (a cached one already is): the
            // copies a call asked to cache are kept, so its later steps skip this.
            let mut contexts = Vec::with_capacity(steps.len());
            for step in steps {
                let context = step
                    .context
                    .f_to_kind(kind)?
                    .f_to_device(self.device)?
                    .f_contiguous()?;
                if let Some(id) = &step.cache_as {
                    self.cache.insert(id, context.shallow_clone());
                }
                contexts.push(context);
            }
            let context = Tensor::f_cat(&contexts, 0)?;
            let pred = self
                .unet
                .forward(&sample, &timesteps, &context)?
                .f_to_kind(Kind::Float)?;
            let mut out = Vec::with_capacity(steps.len());
            let mut row = 0i64;
            for step in steps {
                let rows = step.rows() as i64;
                let mine = pred.f_narrow(0, row, rows)?;
                row += rows;
                out.push(guide(&mine, step)?.f_to_device(Device::Cpu)?);
            }
            Ok(out)
        })
    }

    /// One forward at the model's native size, so the first request does not pay for
    /// libtorch's lazy initialisation.
    pub fn warm_up(&self) -> Result<(), ModelError> {
        let c = self.unet.config();
        let (ch, size, width) = (
            c.in_channels as i64,
            c.sample_size as i64,
            c.cross_attention_dim as i64,
        );
        let opts = (Kind::Float, Device::Cpu);
        self.denoise(&[Step {
            sample: Tensor::zeros([1, ch, size, size], opts),
            timesteps: Tensor::zeros([1], opts),
            context: Tensor::zeros([2, 77, width], opts),
            guidance: Some(Tensor::ones([1], opts)),
            rescale: None,
            cache_as: None,
        }])?;
        Ok(())
    }
}

/// Combines a guided step's halves, `uncond + scale * (cond - uncond)` (diffusers'
/// StableDiffusionPipeline.__call__), then applies `guidance_rescale` if asked.
fn guide(pred: &Tensor, step: &Step) -> Result<Tensor, ModelError> {
    let Some(scale) = &step.guidance else {
        return Ok(pred.shallow_clone());
    };
    let halves = pred.f_chunk(2, 0)?;
    let (uncond, cond) = (&halves[0], &halves[1]);
    let scale = scale.f_to_device(pred.device())?.f_view([-1, 1, 1, 1])?;
    let guided = uncond + scale * (cond - uncond);
    Ok(match &step.rescale {
        None => guided,
        Some(rescale) => rescale_noise_cfg(&guided, cond, &rescale.f_to_device(pred.device())?),
    })
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

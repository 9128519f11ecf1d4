"""The Python reference for whole-pipeline parity: diffusers' StableDiffusionPipeline on a model
folder, with the scheduler named as the project names it, the same seed semantics
(torch.Generator("cpu").manual_seed(seed)), writing each image as PNG.

Usage: reference_pipeline.py MODEL_DIR OUT_PREFIX --prompt P [--negative-prompt N] --seed S
       --steps K --guidance G --scheduler NAME --width W --height H --num-images N
"""

import argparse

import diffusers
import torch
from diffusers import StableDiffusionPipeline

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "heun": "HeunDiscreteScheduler",
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out_prefix")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--guidance", type=float, required=True)
    p.add_argument("--scheduler", required=True, choices=sorted(SCHEDULERS))
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    a = p.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
    cls = getattr(diffusers, SCHEDULERS[a.scheduler])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if not hasattr(pipe.text_encoder, "text_model"):
        # transformers 5 flattened CLIPTextModel (no `.text_model`), but diffusers 0.42.1's
        # clip_skip path still reads `text_encoder.text_model.final_layer_norm`: give it a view
        # onto the same layer norm (a plain object, not a submodule, so nothing is registered).
        import types

        object.__setattr__(
            pipe.text_encoder, "text_model", types.SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
        )
    generator = torch.Generator("cpu").manual_seed(a.seed)
    images = pipe(
        a.prompt,
        negative_prompt=a.negative_prompt,
        num_inference_steps=a.steps,
        guidance_scale=a.guidance,
        generator=generator,
        width=a.width,
        height=a.height,
        num_images_per_prompt=a.num_images,
        clip_skip=a.clip_skip,
        guidance_rescale=a.guidance_rescale,
        output_type="pil",
    ).images
    for i, image in enumerate(images):
        image.save(f"{a.out_prefix}-{i}.png")


if __name__ == "__main__":
    main()

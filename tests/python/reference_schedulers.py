"""Reference sampling loops for `orchestrator/tests/scheduler_parity.rs`, run with diffusers.

Each case builds a diffusers scheduler from a config dict, calls `set_timesteps(steps)`, and
runs the pipeline's loop with a deterministic fake U-Net:

    latents = torch.randn(shape, generator=g) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps = 0.5 * x + 0.1 * sin(0.001 * t + 0.37 * i)      (float32, i = flat element index)
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample

The same generator seeds the latents and any per-step noise, as in diffusers' pipelines.
Outputs timesteps, alphas_cumprod, per-step model inputs' first values and the final latents.

Usage: reference_schedulers.py OUT.json
"""

import inspect
import json
import math
import sys

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)

SD1 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "num_train_timesteps": 1000,
    "trained_betas": None,
}
SD2_V = {**SD1, "prediction_type": "v_prediction", "timestep_spacing": "leading"}
ZERO_SNR = {
    **SD1,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
}
# diffusers' own defaults: linear betas, clip_sample, set_alpha_to_one.
DEFAULTS_LINSPACE = {"timestep_spacing": "linspace"}
COSINE_SAMPLE = {
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "sample",
    "clip_sample": True,
    "clip_sample_range": 1.5,
}

# x0-prediction with clipping, on SD's betas (the cosine schedule's σ_max ≈ 2e4 makes the
# sigma samplers' float32 rounding swamp the comparison).
SAMPLE_CLIP = {**SD1, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5}
LOG_LINEAR = {**SD1, "interpolation_type": "log_linear"}

CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
    "heun": HeunDiscreteScheduler,
}

CASES = []
for steps in (1, 2, 10, 50):
    CASES += [
        ("sd1_ddim", "ddim", SD1, steps, {}),
        ("sd2_v_ddim", "ddim", SD2_V, steps, {}),
        ("zero_snr_trailing_ddim", "ddim", ZERO_SNR, steps, {}),
        ("defaults_linspace_ddim", "ddim", DEFAULTS_LINSPACE, steps, {}),
        ("cosine_sample_ddim", "ddim", COSINE_SAMPLE, steps, {}),
        ("sd1_ddim_eta", "ddim", SD1, steps, {"eta": 0.7}),
        ("sd1_euler", "euler", SD1, steps, {}),
        ("sd2_v_leading_euler", "euler", SD2_V, steps, {}),
        ("zero_snr_trailing_euler", "euler", ZERO_SNR, steps, {}),
        ("log_linear_euler", "euler", LOG_LINEAR, steps, {}),
        ("sd1_euler_ancestral", "euler_ancestral", SD1, steps, {}),
        ("sd2_v_leading_euler_ancestral", "euler_ancestral", SD2_V, steps, {}),
        ("zero_snr_trailing_euler_ancestral", "euler_ancestral", ZERO_SNR, steps, {}),
        ("sd1_dpmpp_2m", "dpmpp_2m", SD1, steps, {}),
        ("sd2_v_leading_dpmpp_2m", "dpmpp_2m", SD2_V, steps, {}),
        ("zero_snr_trailing_dpmpp_2m", "dpmpp_2m", ZERO_SNR, steps, {}),
        ("cosine_sample_dpmpp_2m", "dpmpp_2m", COSINE_SAMPLE, steps, {}),
        ("sd1_pndm", "pndm", {**SD1, "skip_prk_steps": True}, steps, {}),
        ("sd2_v_pndm", "pndm", {**SD2_V, "skip_prk_steps": True}, steps, {}),
        ("linspace_pndm", "pndm", {**SD1, "skip_prk_steps": True, "timestep_spacing": "linspace"}, steps, {}),
        # PNDM and Heun have no rescale_betas_zero_snr: from_config drops it.
        ("zero_snr_config_pndm", "pndm", {**ZERO_SNR, "skip_prk_steps": True}, steps, {}),
        ("sd1_heun", "heun", SD1, steps, {}),
        ("sd2_v_leading_heun", "heun", SD2_V, steps, {}),
        ("sample_clip_heun", "heun", SAMPLE_CLIP, steps, {}),
        ("zero_snr_config_heun", "heun", ZERO_SNR, steps, {}),
    ]

SHAPE = (1, 4, 8, 8)
SEED = 1234


def fake_unet(x: torch.Tensor, t: float) -> torch.Tensor:
    idx = np.arange(x.numel(), dtype=np.float64)
    wave = np.sin(0.001 * float(t) + 0.37 * idx).astype(np.float32).reshape(x.shape)
    return torch.tensor(0.5, dtype=torch.float32) * x + torch.tensor(0.1) * torch.from_numpy(wave)


def bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().numpy().view(np.uint32).reshape(-1).tolist()


def run(name, kind, config, steps, kwargs):
    # from_config, like loading a model folder: keys the class does not know are ignored.
    scheduler = CLASSES[kind].from_config(config)
    scheduler.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(SEED)
    latents = torch.randn(SHAPE, generator=g, dtype=torch.float32) * scheduler.init_noise_sigma
    first_inputs = []
    if "generator" in inspect.signature(scheduler.step).parameters:
        kwargs = {**kwargs, "generator": g}
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        first_inputs.append(float(x.reshape(-1)[0]))
        eps = fake_unet(x, float(t))
        latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
    return {
        "name": name,
        "scheduler": kind,
        "config": config,
        "steps": steps,
        "options": {k: v for k, v in kwargs.items() if k != "generator"},
        "seed": SEED,
        "numel": math.prod(SHAPE),
        "timesteps": [float(t) for t in scheduler.timesteps],
        "init_noise_sigma": float(scheduler.init_noise_sigma),
        "alphas_cumprod": scheduler.alphas_cumprod.double().tolist(),
        "first_inputs": first_inputs,
        "final": bits(latents),
    }


def main() -> None:
    cases = [run(*case) for case in CASES]
    with open(sys.argv[1], "w") as f:
        json.dump({"cases": cases}, f)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Times diffusers' eager U-Net on one classifier-free-guided step, the reference for
`sd bench unet` (orchestrator/cli/src/bench.rs), which times the same step the same way.

Usage: bench_unet.py MODEL_DIR [--height 256] [--width 256] [--guidance 7.5] [--warmup 1]
       [--iters 5] [--seed 0]

MODEL_DIR/unet is created when missing: diffusers' default `UNet2DConditionModel()` config is
Stable Diffusion 1.5's (320/640/1280/1280 channels, 8 heads, 2 layers per block) except
cross_attention_dim (1280 by default, 768 in SD 1.5) and sample_size (null, 64), which are
set; random weights from --seed, saved as safetensors. Random weights time the same as
trained ones.

One step: the latent `[1, 4, H/f, W/f]` (f from MODEL_DIR/vae/config.json, 8 without one)
doubled to the uncond+cond batch of 2, per-sample timesteps `[2]`, a `[2, 77, D]` text
context, then `uncond + g * (cond - uncond)`, under `torch.no_grad()` as
StableDiffusionPipeline.__call__ runs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

SD15_CROSS_ATTENTION_DIM = 768  # SD 1.5's CLIP ViT-L/14 width; diffusers' default is 1280
SD15_SAMPLE_SIZE = 64  # 512 px / 8; diffusers' default is null, which sd-models refuses


def ensure_unet(model_dir: Path, seed: int) -> Path:
    unet_dir = model_dir / "unet"
    if (unet_dir / "config.json").exists():
        return unet_dir
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SD15_SAMPLE_SIZE, cross_attention_dim=SD15_CROSS_ATTENTION_DIM
    ).eval()
    tmp = model_dir / "unet.tmp"
    unet.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(unet_dir)
    print(f"created {unet_dir} (random SD1.5-size U-Net, seed {seed})")
    return unet_dir


def vae_factor(model_dir: Path) -> int:
    config = model_dir / "vae" / "config.json"
    if not config.exists():
        return 8
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    a.model_dir.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(str(ensure_unet(a.model_dir, a.seed))).eval()
    c = unet.config
    f = vae_factor(a.model_dir)
    if a.height % f or a.width % f:
        p.error(f"--height/--width must be multiples of the VAE factor {f}")
    g = torch.Generator("cpu").manual_seed(a.seed)
    latents = torch.randn(1, c.in_channels, a.height // f, a.width // f, generator=g)
    context = torch.randn(2, 77, c.cross_attention_dim, generator=g)
    timesteps = torch.tensor([500, 500])

    def step() -> torch.Tensor:
        both = torch.cat([latents, latents])
        pred = unet(both, timesteps, encoder_hidden_states=context).sample
        uncond, cond = pred.chunk(2)
        return uncond + a.guidance * (cond - uncond)

    times = []
    with torch.no_grad():
        for _ in range(a.warmup):
            step()
        for _ in range(a.iters):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1000.0)
    print(
        f"diffusers {c.block_out_channels} unet, {a.width}x{a.height} "
        f"(latent {a.width // f}x{a.height // f}), batch 2 (cfg), f32 cpu, "
        f"{a.iters} iters after {a.warmup} warm-up"
    )
    print(f"machine: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"ms/step: mean {statistics.mean(times):.1f} median {statistics.median(times):.1f} "
        f"min {min(times):.1f} max {max(times):.1f}"
    )


if __name__ == "__main__":
    main()

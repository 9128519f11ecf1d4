"""Reference outputs of diffusers' AutoencoderKL for the Rust parity tests.

Usage: reference_vae.py OUT_DIR

Builds a tiny random-weight VAE (seeded), saves it with save_pretrained(OUT_DIR/vae,
safe_serialization=True), and writes to OUT_DIR/io.safetensors: latents and their decoding
(decoded), images and their encoding (mean, logvar), and the 8-bit RGB that
VaeImageProcessor.postprocess makes of `rgb_input` (rgb8, [B, H, W, 3] uint8).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from safetensors.torch import save_file


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_grad_enabled(False)
    torch.manual_seed(4321)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()
    # Perturb every parameter so norms' affine weights are not all 1 / 0.
    for p in vae.parameters():
        p.add_(0.05 * torch.randn_like(p))
    vae.save_pretrained(out_dir / "vae", safe_serialization=True)

    latents = torch.randn(2, 4, 4, 6)
    decoded = vae.decode(latents).sample
    images = torch.rand(2, 3, 32, 24) * 2 - 1
    dist = vae.encode(images).latent_dist
    # Values past [-1, 1] (clamped) and in between, to check rounding and clamping.
    rgb_input = torch.randn(2, 3, 8, 8) * 0.7
    pil = VaeImageProcessor(vae_scale_factor=8).postprocess(rgb_input, output_type="pil")
    rgb8 = torch.from_numpy(np.stack([np.array(im) for im in pil]))
    save_file(
        {"latents": latents, "decoded": decoded.contiguous(), "images": images,
         "mean": dist.mean.contiguous(), "logvar": dist.logvar.contiguous(),
         "rgb_input": rgb_input, "rgb8": rgb8.contiguous()},
        str(out_dir / "io.safetensors"),
    )


if __name__ == "__main__":
    main()

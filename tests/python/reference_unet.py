"""Reference outputs of diffusers' UNet2DConditionModel for the Rust parity tests.

Usage: reference_unet.py OUT_DIR

For each case below, builds a tiny random-weight U-Net (seeded), saves it with
save_pretrained(OUT_DIR/<case>/unet, safe_serialization=True), runs it in f32 on CPU on seeded
inputs (one distinct timestep per sample) and writes the inputs and the output to
OUT_DIR/<case>/io.safetensors (keys: sample, timesteps, encoder_hidden_states, out).
"""

import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    cross_attention_dim=32,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)

CASES = {
    # SD 1.x-like: attention_head_dim as one int (= 8 heads), 1x1 conv projections.
    "sd1": dict(TINY, layers_per_block=2, attention_head_dim=8),
    # SD 2.x-like: per-block head counts, linear projections, upcast attention, and a
    # 154-token context (two 77-token chunks, as long-prompt pipelines send).
    "sd2": dict(TINY, layers_per_block=1, attention_head_dim=[2, 4], use_linear_projection=True,
                upcast_attention=True),
    # Three blocks, two with cross-attention, two transformer layers per block, center_input_sample.
    "three": dict(TINY, block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=[2, 4, 4],
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  transformer_layers_per_block=2, center_input_sample=True),
}

INPUTS = {
    "sd1": dict(batch=3, height=8, width=8, tokens=77, timesteps=[999.0, 500.5, 1.0]),
    "sd2": dict(batch=2, height=8, width=16, tokens=154, timesteps=[981.0, 21.0]),
    "three": dict(batch=3, height=16, width=8, tokens=77, timesteps=[0.0, 250.0, 999.0]),
}


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_grad_enabled(False)
    for seed, (name, config) in enumerate(CASES.items()):
        torch.manual_seed(1234 + seed)
        unet = UNet2DConditionModel(**config).eval()
        # Random init leaves norms at weight 1 / bias 0; perturb every parameter so the
        # affine parts of GroupNorm and LayerNorm are exercised too.
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        case_dir = out_dir / name
        unet.save_pretrained(case_dir / "unet", safe_serialization=True)
        spec = INPUTS[name]
        sample = torch.randn(spec["batch"], 4, spec["height"], spec["width"])
        timesteps = torch.tensor(spec["timesteps"], dtype=torch.float32)
        context = torch.randn(spec["batch"], spec["tokens"], config["cross_attention_dim"])
        out = unet(sample, timesteps, encoder_hidden_states=context).sample
        save_file(
            {"sample": sample, "timesteps": timesteps, "encoder_hidden_states": context,
             "out": out.contiguous()},
            str(case_dir / "io.safetensors"),
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Build a tiny, random-weight Stable Diffusion folder in diffusers layout.

The services load real diffusers folders; tests and `make demo` need one that builds in
seconds on a CPU and has the same structure as SD 1.x / 2.x: the real CLIP vocabulary (see
clip_vocab.py), a 2-layer CLIP text encoder, a 2-level U-Net with cross-attention, and a VAE
with four resolution levels so latents are 8x smaller than images, as in real SD.

Usage: make_tiny_model.py OUT_DIR [--flavor sd1|sd2|asym] [--seed N] [--vocab-cache DIR]

sd1: quick_gelu CLIP, pad token `<|endoftext|>`, epsilon prediction, conv projections in the
     U-Net's transformers, one attention head size (8).
sd2: gelu CLIP, pad token `!`, v-prediction, linear projections, per-block head dims [4, 8].
asym: shapes nothing may take for granted: gelu CLIP of width 48 (so cross_attention_dim 48),
     a 3-level U-Net (32, 48, 64) with two resnets per block, attention in the first two down
     and last two up blocks, per-block head counts and transformer depths, 16 norm groups; a
     VAE with three levels (latents 4x smaller than images, not 8x) and 16 norm groups.

Deterministic from --seed: torch.manual_seed(seed + k) before building the k-th component, so
one component's size change does not reshuffle the others' weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from clip_vocab import ensure_vocab  # noqa: E402

DEFAULT_VOCAB_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "clip-vocab"
HIDDEN = 32  # CLIP hidden size == U-Net cross_attention_dim
ASYM_HIDDEN = 48  # the same, for the asym flavor


def build_tokenizer(vocab_dir: Path, flavor: str) -> CLIPTokenizer:
    # SD 2.x's OpenCLIP tokenizer pads with "!" (id 0), SD 1.x's with <|endoftext|>.
    pad = "!" if flavor == "sd2" else "<|endoftext|>"
    return CLIPTokenizer.from_pretrained(
        str(vocab_dir),
        pad_token=pad,
        model_max_length=77,
    )


def build_text_encoder(flavor: str) -> CLIPTextModel:
    if flavor == "asym":
        return build_asym_text_encoder()
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if flavor == "sd2" else "quick_gelu",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
        projection_dim=HIDDEN,
    )
    return CLIPTextModel(config).eval()


def build_asym_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=ASYM_HIDDEN,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=6,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=49406,
        eos_token_id=49407,
        projection_dim=ASYM_HIDDEN,
    )
    return CLIPTextModel(config).eval()


def build_unet(flavor: str) -> UNet2DConditionModel:
    if flavor == "asym":
        return build_asym_unet()
    sd2 = flavor == "sd2"
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=[4, 8] if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    ).eval()


def build_asym_unet() -> UNet2DConditionModel:
    # Up block i mirrors down block 2 - i, so the per-block lists are read reversed on the way
    # up; the mid block takes the last entry of each.
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 48, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=ASYM_HIDDEN,
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=[2, 6, 4],  # head counts (diffusers' naming quirk): widths 16, 8, 16
        use_linear_projection=False,
        norm_num_groups=16,
    ).eval()


def build_asym_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 48),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    ).eval()


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    ).eval()


def build_scheduler(flavor: str) -> DDIMScheduler:
    # Stable Diffusion's training schedule (the values in the released scheduler configs).
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type="v_prediction" if flavor == "sd2" else "epsilon",
    )


def build(out_dir: Path, flavor: str, seed: int, vocab_cache: Path) -> None:
    vocab_dir = ensure_vocab(vocab_cache)
    tokenizer = build_tokenizer(vocab_dir, flavor)
    torch.manual_seed(seed)
    text_encoder = build_text_encoder(flavor)
    torch.manual_seed(seed + 1)
    unet = build_unet(flavor)
    torch.manual_seed(seed + 2)
    vae = build_asym_vae() if flavor == "asym" else build_vae()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(flavor),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    write_legacy_tokenizer_files(out_dir / "tokenizer", vocab_dir, tokenizer)


def write_legacy_tokenizer_files(tok_dir: Path, vocab_dir: Path, tokenizer: CLIPTokenizer) -> None:
    """Adds the files released SD checkpoints carry next to the `tokenizer.json` that
    transformers 5 writes: `vocab.json`, `merges.txt` and `special_tokens_map.json`. The
    Rust tokenizer reads those (released SD 1.x/2.x folders have no `tokenizer.json`), so the
    fixture must exercise that path."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(vocab_dir / name, tok_dir / name)

    def token(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    special = {
        "bos_token": token(str(tokenizer.bos_token)),
        "eos_token": token(str(tokenizer.eos_token)),
        "pad_token": str(tokenizer.pad_token),
        "unk_token": token(str(tokenizer.unk_token)),
    }
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--flavor", choices=("sd1", "sd2", "asym"), default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-cache", type=Path, default=DEFAULT_VOCAB_CACHE)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    build(args.out_dir, args.flavor, args.seed, args.vocab_cache)
    print(args.out_dir)


if __name__ == "__main__":
    main()

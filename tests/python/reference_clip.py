#!/usr/bin/env python3
"""Reference token ids and CLIP text-encoder outputs from transformers, for the Rust parity test.

Usage: reference_clip.py MODEL_DIR PROMPTS_JSON OUT_JSON OUT_SAFETENSORS [--corpus N] [--seed S]

PROMPTS_JSON is a list of prompts. For each, OUT_JSON gets the ids transformers' CLIPTokenizer
gives the way Stable Diffusion pipelines call it (padding="max_length", truncation=True) and
how many content tokens truncation dropped; OUT_SAFETENSORS gets CLIPTextModel's
`last_hidden_state` ("last") and the clip_skip=1 state diffusers builds ("skip1":
final_layer_norm(hidden_states[-2])), fp32 on CPU.

With --corpus N, N more prompts are generated (seeded, varied scripts, whitespace, special
token literals, long runs) and tokenized only; OUT_JSON's "corpus" holds them with their ids.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

# Word pools by script; each generated prompt mixes a few of them.
POOLS = {
    "english": "a photo of the astronaut riding horse on mars highly detailed 4k trending artstation "
    "portrait painting by greg rutkowski cinematic lighting octane render don't it's we're "
    "they've i'm you'll he'd".split(),
    "latin": "café naïve résumé façade über straße señor coração ångström œuvre ÉCOLE Ça DÉJÀ".split(),
    "cyrillic": "кошка собака Москва привет мир ЁЖИК".split(),
    "greek": "καλημέρα κόσμε ΑΘΗΝΑ ψυχή".split(),
    "arabic": "مرحبا بالعالم قطة".split(),
    "hebrew": "שלום עולם".split(),
    "devanagari": "नमस्ते दुनिया बिल्ली".split(),
    "thai": "สวัสดีชาวโลก แมว".split(),
    "cjk": "猫 一只可爱的猫 山水画 東京タワー 桜の花 안녕하세요 고양이 ｆｕｌｌｗｉｄｔｈ".split(),
    "emoji": "🐱 🚀 👩‍🚀 🇯🇵 ❤️ 👍🏽 ✨✨".split(),
    "numbers": "1 42 2024 3.14 1,000,000 ½ ² ٣ ४".split(),
    "punct": ", . ! ? ... !!! (masterpiece:1.2) [blue] {red} <lora:x:0.5> --ar 16:9 @#$% ~ ` ' \" -- _ / \\ |".split(),
    "special": ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext|", "!"],
    "combining": ["e\u0301", "a\u0308", "n\u0303o", "\u1e9b\u0323", "\u212b", "\ufb01ne"],
}
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "\u00a0", "\u3000", "", " \r\n "]


def random_codepoints(rng: random.Random, n: int) -> str:
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0xA0, 0x3000), rng.randrange(0x3000, 0xD7FF), rng.randrange(0x1F300, 0x1FAFF)])
        out.append(chr(cp))
    return "".join(out)


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = sorted(POOLS)
    prompts = []
    for i in range(n):
        if i % 10 == 9:
            prompts.append(random_codepoints(rng, rng.randrange(1, 40)))
            continue
        words = rng.randrange(0, 120 if i % 7 == 0 else 20)
        chosen = rng.sample(names, rng.randrange(1, 4))
        parts = []
        for _ in range(words):
            w = rng.choice(POOLS[rng.choice(chosen)])
            parts.append(w.upper() if rng.random() < 0.1 else w)
            parts.append(rng.choice(SEPARATORS))
        prompts.append("".join(parts))
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("prompts", type=Path)
    parser.add_argument("out_json", type=Path)
    parser.add_argument("out_safetensors", type=Path)
    parser.add_argument("--corpus", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    tokenizer = CLIPTokenizer.from_pretrained(str(args.model_dir / "tokenizer"))
    max_length = tokenizer.model_max_length

    def tokenize(prompts: list[str]) -> tuple[list[list[int]], list[int]]:
        if not prompts:
            return [], []
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids
        # Content tokens past the max_length - 2 that fit beside the start and end tokens.
        full = tokenizer(prompts, add_special_tokens=False).input_ids
        return ids, [max(0, len(f) - (max_length - 2)) for f in full]

    prompts = json.loads(args.prompts.read_text())
    ids, truncated = tokenize(prompts)
    extra = corpus(args.corpus, args.seed)
    extra_ids, extra_truncated = tokenize(extra)

    model = CLIPTextModel.from_pretrained(str(args.model_dir / "text_encoder"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        input_ids = torch.tensor(ids, dtype=torch.long)
        out = model(input_ids, output_hidden_states=True)
        last = out.last_hidden_state
        # diffusers' encode_prompt with clip_skip=1.
        # transformers 5 flattened CLIPTextModel (no `.text_model`); older versions nest it.
        text_model = getattr(model, "text_model", model)
        skip1 = text_model.final_layer_norm(out.hidden_states[-2])
    save_file({"ids": input_ids, "last": last.contiguous(), "skip1": skip1.contiguous()}, str(args.out_safetensors))

    args.out_json.write_text(
        json.dumps(
            {
                "max_length": max_length,
                "pad_token_id": tokenizer.pad_token_id,
                "prompts": [{"prompt": p, "ids": i, "truncated": t} for p, i, t in zip(prompts, ids, truncated)],
                "corpus": [{"prompt": p, "ids": i, "truncated": t} for p, i, t in zip(extra, extra_ids, extra_truncated)],
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()

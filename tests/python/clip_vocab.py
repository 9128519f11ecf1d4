#!/usr/bin/env python3
"""Fetch the real CLIP BPE vocabulary and lay it out exactly like transformers' CLIP files.

Tests and the demo need CLIP's real 49,408-entry vocabulary (a toy vocabulary would hide
tokenizer bugs), but no model hub is reachable here. The vocabulary ships inside the
`open_clip_torch` wheel on PyPI as `open_clip/bpe_simple_vocab_16e6.txt.gz`, the same file
OpenAI's CLIP `SimpleTokenizer` reads, so this script downloads that wheel (without
dependencies) and rebuilds `vocab.json` + `merges.txt` the way OpenAI's tokenizer builds its
encoder, which is the layout of `openai/clip-vit-large-patch14`'s tokenizer files:

    256 byte symbols (bytes_to_unicode order), the same 256 with `</w>`,
    48,894 merges joined, `<|startoftext|>`, `<|endoftext|>`  -> 49,408 entries.

Usage: clip_vocab.py CACHE_DIR   (prints the folder holding vocab.json and merges.txt)

Idempotent and fast when cached: nothing is downloaded or rewritten when both files exist.
Writes go through a temporary name and a rename, so concurrent test processes sharing the
cache never see a half-written file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# OpenAI's SimpleTokenizer keeps merges[1 : 49152 - 256 - 2 + 1]: line 0 is a version header,
# and the vocabulary is capped at 49,408 = 256 * 2 + merges + 2 special tokens.
MERGES_END = 49152 - 256 - 2 + 1
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (same order as the reference)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("open_clip_torch-*.whl"))
    if wheels:
        return wheels[-1]
    # Download into a private folder first, then rename: pip writes in place.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, "open_clip_torch"],
            check=True,
        )
        got = sorted(Path(tmp).glob("open_clip_torch-*.whl"))
        if not got:
            raise SystemExit(f"pip download left no open_clip_torch wheel in {tmp}")
        target = cache / got[-1].name
        os.replace(got[-1], target)
        return target


def ensure_vocab(cache: Path) -> Path:
    """Makes sure `cache` holds `vocab.json` and `merges.txt`; returns `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = cache / "vocab.json", cache / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return cache

    wheel = _wheel(cache)
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read(WHEEL_MEMBER)).decode("utf-8")
    merges = [tuple(line.split()) for line in raw.split("\n")[1:MERGES_END]]

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"{wheel}:{WHEEL_MEMBER}: built {len(vocab)} entries, expected {VOCAB_SIZE}")

    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    # merges.txt first: the vocab.json check above is what callers test for completeness.
    _atomic_write(merges_path, merges_text.encode("utf-8"))
    _atomic_write(vocab_path, json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir", type=Path, help="folder for the wheel and the converted files")
    args = parser.parse_args()
    print(ensure_vocab(args.cache_dir.resolve()))


if __name__ == "__main__":
    main()

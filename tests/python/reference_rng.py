"""Reference values for `orchestrator/tests/rng_parity.rs`: draws from torch's CPU generator.

For each case, a fresh `torch.Generator("cpu").manual_seed(seed)` makes the listed successive
`torch.randn(shape, generator=g, dtype=torch.float32)` calls; each call's values are written
as their IEEE-754 bit patterns (u32), so the Rust side can compare bit for bit.

torch picks its `normal_fill` kernel by CPU dispatch level, so the output also records
`torch.backends.cpu.get_cpu_capability()`; run with `ATEN_CPU_CAPABILITY=default` to get the
scalar kernel on an AVX2 machine.

Usage: reference_rng.py OUT.json
"""

import json
import sys

import numpy as np
import torch

SEEDS = [0, 1, 42, 2**32 + 5, 2**63 - 1]

# Each entry: a sequence of shapes drawn one after another from the same generator. Sizes
# cover the scalar path (< 16 elements, with Box-Muller caching), exact multiples of 16, and
# the vectorised path's tail recomputation (numel % 16 != 0).
CALL_SEQUENCES = [
    [(1,)],
    [(7,)],
    [(15,)],
    [(16,)],
    [(17,)],
    [(31,)],
    [(100,)],
    [(1, 4, 8, 8)],
    [(2, 4, 64, 64)],
    [(1, 4, 64, 64), (1, 4, 64, 64)],
    # The cached second Box-Muller value survives a vectorised call in between.
    [(1,), (100,), (1,), (3,)],
    [(1, 4, 8, 8), (7,), (33,), (2,)],
]


def bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().numpy().view(np.uint32).reshape(-1).tolist()


def main() -> None:
    out = sys.argv[1]
    cases = []
    for seed in SEEDS:
        for calls in CALL_SEQUENCES:
            g = torch.Generator("cpu").manual_seed(seed)
            draws = [bits(torch.randn(shape, generator=g, dtype=torch.float32)) for shape in calls]
            cases.append({"seed": seed, "shapes": [list(s) for s in calls], "draws": draws})
    doc = {"capability": torch.backends.cpu.get_cpu_capability(), "cases": cases}
    with open(out, "w") as f:
        json.dump(doc, f)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Times one classifier-free-guided SD1.5-size U-Net step, ours (`sd bench unet`, libtorch via
# tch, in-process) and diffusers' eager U-Net (bench_unet.py), back to back on the same random
# weights (created on first use in MODEL_DIR/unet by bench_unet.py).
#
# Usage: tests/python/run_unet_bench.sh [MODEL_DIR] [extra args for both, e.g. --iters 10]
# Defaults: MODEL_DIR=.cache/models/sd15-unet-random, 256x256, 1 warm-up, 5 timed steps, f32 CPU.
# ROUNDS=N alternates the two N times (ours, diffusers, ours, ...), so a load spike from another
# process hits both sides alike; compare medians and minimums.
# Needs ~8 GB of RAM per run (3.4 GB of f32 weights + activations); run nothing heavy beside it.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
model="${1:-.cache/models/sd15-unet-random}"
shift || true
args=(--height 256 --width 256 --warmup 1 --iters 5 "$@")
if [ ! -f "$model/unet/config.json" ]; then # create the weights before either is timed
    .venv/bin/python tests/python/bench_unet.py "$model" --warmup 0 --iters 1
fi
cargo build -q -p sd-cli --bin sd
for round in $(seq "${ROUNDS:-1}"); do
    echo "== round $round, ours: target/debug/sd bench unet --model $model ${args[*]}"
    target/debug/sd bench unet --model "$model" "${args[@]}"
    echo "== round $round, diffusers: .venv/bin/python tests/python/bench_unet.py $model ${args[*]}"
    .venv/bin/python tests/python/bench_unet.py "$model" "${args[@]}" 2>&1 \
        | grep -v -e torchvision -e accelerate -e '^```' -e '^\.$'
done

#!/usr/bin/env bash
# The GPU measurements in one call: the guided SD 1.5 U-Net step (`sd bench unet`, beside
# diffusers' eager and compiled baselines when the bundle carries them) and the per-step cost
# of the gRPC split (`sd bench split`, the denoiser in the bench's process and in its own),
# at 512x512 on random weights at SD 1.5's U-Net config, which time the same as trained ones.
#
# On the development machine: `make gpu-bundle` fills .gpu/ (stripped release binaries, the
# diffusers wheels the GPU machine lacks, the shared baseline scripts). On the GPU machine,
# from the repository root with .gpu carried: `tests/python/gpu_bench.sh`. Results land in
# $OUT (out/gpu without it), one text file per bench.
#
# DEVICE, DTYPE, SIZE, ITERS override cuda, f16, 512, 40; `DEVICE=cpu DTYPE=f32 SIZE=128
# ITERS=2` runs the same steps on a CPU host, which is how this script is checked without a
# GPU (8 minutes on a 2-core VM, most of it creating and loading the weights). MODEL (default
# /tmp/sd15-random) is created on first use: 3.4 GB of f32 weights. COMPILE=1 adds the
# torch.compile baseline (minutes of compilation). At most 7 files land in $OUT, within what a
# GPU call brings back.
set -euo pipefail
cd "$(dirname "$0")/../.."

out="${OUT:-out/gpu}"
device="${DEVICE:-cuda}"
dtype="${DTYPE:-f16}"
size="${SIZE:-512}"
iters="${ITERS:-40}"
model="${MODEL:-/tmp/sd15-random}"
py="${PYTHON:-python3}"
bin=.gpu/bin
mkdir -p "$out"

# diffusers (for the random U-Net and the baselines) from the bundle's wheels when missing.
if ! "$py" -c 'import diffusers' 2>/dev/null; then
    pylib=/tmp/gpu-bench-pylib
    "$py" -m pip install --quiet --no-deps --no-index --target "$pylib" .gpu/whl/*.whl
    export PYTHONPATH="$pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
libtorch="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$libtorch${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The model folder: bench_unet.py's random SD 1.5 U-Net, and SD 1.5's scheduler config,
# which the denoiser stage reads for the prediction type.
"$py" - "$model" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests/python")
from bench_unet import ensure_unet
model = Path(sys.argv[1])
ensure_unet(model, seed=0)
scheduler = model / "scheduler" / "scheduler_config.json"
scheduler.parent.mkdir(parents=True, exist_ok=True)
scheduler.write_text(json.dumps({
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon",
}, indent=1))
PY

{
    echo "# $(date -u +%FT%TZ) $("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")')"
    echo "# $bin/sd bench unet --model $model --device $device --dtype $dtype --height $size --width $size --iters $iters"
    "$bin/sd" bench unet --model "$model" --device "$device" --dtype "$dtype" \
        --height "$size" --width "$size" --warmup 3 --iters "$iters" 2>>"$out/bench.log"
} | tee "$out/unet.txt"

{
    echo "# $bin/sd bench split --model $model --device $device --dtype $dtype --size $size --iters $iters"
    "$bin/sd" bench split --model "$model" --device "$device" --dtype "$dtype" \
        --size "$size" --iters "$iters" 2>>"$out/bench.log"
} | tee "$out/split.txt"

# The denoiser in its own process, as deployed; the bench waits for nothing, so this does.
denoiser_log="$out/denoiser.log"
"$bin/sd-denoiser" --listen 127.0.0.1:50999 --model "$model" --device "$device" \
    --dtype "$dtype" --batch-wait-ms 0 >"$denoiser_log" 2>&1 &
denoiser=$!
trap 'kill $denoiser 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    grep -q "denoiser ready" "$denoiser_log" && break
    kill -0 $denoiser 2>/dev/null || { cat "$denoiser_log"; exit 1; }
    sleep 1
done
{
    echo "# $bin/sd bench split --model $model --device $device --dtype $dtype --size $size --iters $iters --denoiser http://127.0.0.1:50999"
    "$bin/sd" bench split --model "$model" --device "$device" --dtype "$dtype" \
        --size "$size" --iters "$iters" --denoiser http://127.0.0.1:50999 2>>"$out/bench.log"
} | tee "$out/split-own-process.txt"
kill $denoiser

# diffusers on the same card in the same call, so the U-Net figures compare as ratios; each
# script writes its own JSON into $OUT (bench.json, compile.json).
baselines=(diffusers_baseline)
if [ "${COMPILE:-0}" = 1 ]; then baselines+=(diffusers_compile_baseline); fi
if [ "$device" != cpu ]; then
    for baseline in "${baselines[@]}"; do
        if [ -f ".gpu/bench/$baseline.py" ]; then
            OUT="$out" "$py" ".gpu/bench/$baseline.py" 2>>"$out/bench.log" || true
        fi
    done
fi

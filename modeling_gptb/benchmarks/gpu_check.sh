#!/usr/bin/env bash
# Issue 10's GPU checks in one run of at most 9 minutes (the parts' timeouts add up to 540 s, under the device's
# 600 s per command), for a CUDA machine (made for the project's H200).
# Run from the project root, with the wheels of modeling_gptb/benchmarks/fetch_wheels.sh in .whl/ where the machine
# has no package registry (see docs/gpu.md):
#   OUT=/path/for/results bash modeling_gptb/benchmarks/gpu_check.sh
# Writes under $OUT: gpu_check_decode.json (CUDA-graph decoding vs eager: same tokens, logit gap, per-token latency),
# gpu_check_train.json (tokens/s and MFU of `gptb train --preset gptb-small --recipe gpu`), gptb-bench-cuda.json/.md
# (`gptb bench --only generate`, with the CUDA-graph rows), gpu_check_art.json (the ART device engine on the GPU vs our
# CPU update, both rules, dim 768 / 1,000 categories / 20,000 updates), each part's log, nvidia-smi and a memory trace.
# Each part runs under its own timeout; a part that fails or times out leaves the others' results.
set -uo pipefail
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 3
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" > "$OUT/versions.txt" 2>&1
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -l 1 > "$OUT/memory_used.csv" 2>/dev/null &
MEMORY_TRACE=$!

status() { echo "$1: exit $2" | tee -a "$OUT/status.txt"; }

timeout 110 python3 -m modeling_gptb.benchmarks.gpu_check decode --output "$OUT" > "$OUT/decode.log" 2>&1
status decode $?

TRAIN_DIR=$(mktemp -d /tmp/gptb-gpu-train.XXXXXX)  # weights and checkpoints stay off $OUT (hundreds of MB)
timeout 230 python3 -m modeling_gptb.train --preset gptb-small --recipe gpu --output_dir "$TRAIN_DIR/out" \
  --max_steps 50 --logging_steps 10 --eval_steps 50 --save_steps 50 --eval_batches 2 --sample_tokens 8 \
  > "$OUT/train.log" 2>&1
status train $?
python3 -m modeling_gptb.benchmarks.gpu_check train-log "$OUT/train.log" --output "$OUT" > "$OUT/train_summary.log" 2>&1
status train-log $?

timeout 100 python3 -m modeling_gptb.benchmarks.gpu_check art --output "$OUT" > "$OUT/art.log" 2>&1
status art $?

timeout 100 python3 -m modeling_gptb.benchmarks --device cuda --only generate --output "$OUT" > "$OUT/bench.log" 2>&1
status bench-generate $?

kill "$MEMORY_TRACE" 2>/dev/null
rm -rf "$TRAIN_DIR"
cat "$OUT/status.txt"

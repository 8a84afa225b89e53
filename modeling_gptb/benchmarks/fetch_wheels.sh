#!/usr/bin/env bash
# Download, on a CPU machine with a package registry, the wheels a GPU machine without one lacks (made for the
# project's H200: Python 3.12, torch 2.11+cu130 and transformers 5.17 preinstalled). Run from the project root:
#   bash modeling_gptb/benchmarks/fetch_wheels.sh
# then bring .whl/ (about 23 MB, git-ignored) along to the GPU machine, where gpu_check.sh installs them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
# (the project itself is imported from the working tree through PYTHONPATH; it is not pip-installed there).
# See docs/gpu.md. Worked on the H200 on 2026-11-30 with exactly this set.
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore idna anyio \
  'hf-xet>=1.6,<2' 'tokenizers>=0.23.1,<0.24' regex 'typing_extensions>=4.16' 'h11>=0.16' 'click>=8.4.2'
du -sh .whl

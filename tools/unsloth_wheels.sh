#!/usr/bin/env bash
# Wheels for tools/unsloth_e2e.py on the GPU machine (Python 3.12, its image's torch 2.11 / transformers 5.17 / peft
# 0.21): Unsloth 2026.10.9 and what the image lacks, into .unsl/ (about 58 MiB with bitsandbytes and pydantic from
# .whl: one device call). Unsloth pins trl<=1.15 and datasets<5, so it gets a site of its own there:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/unsl-site .unsl/*.whl
#   PYTHONPATH=/tmp/unsl-site HF_HUB_OFFLINE=1 python3 tools/unsloth_e2e.py MODEL DATA OUT.json 0.05
# xformers 0.0.35 is the newest on PyPI and was built for torch 2.10: Unsloth says so and uses PyTorch attention.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.unsl/' .git/info/exclude 2>/dev/null || echo '/.unsl/' >> .git/info/exclude
rm -rf .unsl && mkdir .unsl
python3 -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 -d .unsl \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 xformers==0.0.35 trl==1.15.0 datasets==4.8.4 torchao==0.18.0 \
  tyro==1.0.17 cut_cross_entropy==25.1.1 hf_transfer==0.1.9 diffusers==0.42.1 msgspec==0.23.0 structlog==26.1.0 \
  json5==0.17.3 nest-asyncio==1.6.0 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0 dill==0.4.0 \
  multiprocess==0.70.18 importlib_metadata==10.2.0 zipp==4.1.2
cp .whl/bitsandbytes-*.whl .whl/pydantic*.whl .whl/annotated_types-*.whl .whl/typing_inspection-*.whl .unsl/
du -sh .unsl

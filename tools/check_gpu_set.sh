#!/usr/bin/env bash
# Checks, from a CPU machine with PyPI, that the `gpu` extra (pyproject.toml) resolves for the GPU machines' Python
# 3.12 on manylinux x86_64, without installing anything: pip's resolver over lorapipe's requirements with the extra's
# pins. Prints the resolved versions of the packages that matter; exit code 0 when it resolves.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
req=$(mktemp)
python3 - > "$req" <<'PY'
import re, tomllib
d = tomllib.load(open("pyproject.toml", "rb"))
gpu = d["project"]["optional-dependencies"]["gpu"]
pinned = {re.split("[=<>]", r)[0] for r in gpu}
print("\n".join([r for r in d["project"]["dependencies"] if re.split("[=<>]", r)[0] not in pinned] + gpu))
PY
plat=(); for n in $(seq 5 39); do plat+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip install --dry-run --ignore-installed --quiet --report "$req.json" --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none "${plat[@]}" --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform linux_x86_64 --only-binary=:all: --target "$(mktemp -d)" -r "$req" \
  2> >(grep -v '^WARNING: Location' >&2)
python3 - "$req.json" <<'PY'
import json, sys
got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
keys = ["vllm", "torch", "torchvision", "torchaudio", "transformers", "peft", "trl", "bitsandbytes", "datasets",
        "accelerate", "liger_kernel", "liger-kernel"]
print(f"resolves: {len(got)} packages;", ", ".join(f"{k} {got[k]}" for k in keys if k in got))
PY

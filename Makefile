# Two commands do everything: `make repro` (set up + run the pipeline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Stage commands say `python`: put the venv first on PATH so that it is the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
STAMP  := $(VENV)/.installed

.PHONY: setup repro real push lint test test-all bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

# The real-data preset (docs/results.md): `make real DATA=data/raw/covidqu.zip`. The params live
# in presets/*.yaml (one copy each, checked by `covidseg preset` before the run starts).
# `covidseg machine-preset` sizes it to the machine: presets/gpu.yaml (full resolution, wider, longer)
# under CUDA, presets/real-bf16.yaml (real.yaml x 3 runs, averaged) on a CPU with native bf16, else
# presets/real.yaml (sized for 2 AVX2 cores); `make real PRESET=presets/real.yaml` chooses by hand; FLAGS='-S k=v ...'
# adds flags after the preset's. DATA inside the checkout is recorded relative (the same in every
# clone, so teammates share the run cache); outside it, absolute (`covidseg source-path` says so).
# With a default DVC remote, what it already holds is pulled first (run records too) and reused.
PRESET ?=
FLAGS  ?=

real: $(STAMP)
	@test -n "$(DATA)" || { echo "make real needs DATA=path/to/covidqu (the Kaggle folder or .zip)"; exit 2; }
	source="$$($(BIN)/covidseg source-path '$(DATA)')" && \
	preset="$(PRESET)" && { test -n "$$preset" || preset="$$($(BIN)/covidseg machine-preset)"; } && \
	echo "make real: $$preset" && flags="$$($(BIN)/covidseg preset "$$preset")" && \
	pull="" && if $(BIN)/dvc remote default >/dev/null 2>&1; then pull=--pull; \
	  $(BIN)/dvc fetch --run-cache || echo "make real: not everything is on the remote; the rest is computed"; fi && \
	$(BIN)/dvc exp run $$pull -n real-preset -S "data.source=$$source" $$flags $(FLAGS)

# Share this checkout's outputs and every recorded run (docs/teams.md): `dvc push --run-cache`
# uploads the run records; `covidseg push-runs` uploads the outputs they name that the workspace
# push leaves out (other experiments' outputs, `cache: false` metrics and plots).
push: $(STAMP)
	$(BIN)/dvc push --run-cache
	$(BIN)/covidseg push-runs

lint: $(STAMP)
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/ruff format --check src stages tests benchmarks

# --durations: the log names the slowest tests (mark one `slow` when the default run nears 15 minutes)
test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=20

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train_step.py

clean-venv:
	rm -rf $(VENV)

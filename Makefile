# Two commands do everything: `make repro` (set up + run the pipeline) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Stage commands say `python`: put the venv first on PATH so that it is the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
STAMP  := $(VENV)/.installed

.PHONY: setup repro real test test-all bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: $(STAMP)
	$(BIN)/dvc repro

# The real-data preset (README, "Results on real data"): `make real DATA=/path/to/covidqu[.zip]`.
DATA ?= $(abspath ../shared/data/covidqu-dev)
REAL_PARAMS := -S data.source=$(abspath $(DATA)) -S train.epochs=28 -S train.lr=0.001 -S train.weight_decay=0.0001 \
	-S train.schedule=cosine -S train.warmup_epochs=1 -S train.loss=bce_dice -S train.lung_aux_weight=0.5 \
	-S train.base_channels=16 -S train.depth=5 -S train.downsample=2 -S train.augment=true \
	-S train.temperature_scaling=true -S train.flip_tta=true

real: $(STAMP)
	$(BIN)/dvc exp run -n real-preset $(REAL_PARAMS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train_step.py

clean-venv:
	rm -rf $(VENV)

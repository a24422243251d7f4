# `make demo` and `make test` each set everything up in .venv first (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
EBM    := $(VENV)/bin/ebm
STAMP  := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-unit bench clean

install: $(STAMP)

# torch is pinned here: 2.13.0 is the CPU build; a bare `torch` requirement would pull a multi-GB
# CUDA build. ray is pinned in pyproject.toml.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job on the embedded default: the built-in k-fold star images written once as a Parquet
# dataset, trained by 2 Ray Train workers on a local Ray, tracked in ./mlruns.db.
DEMO_DATA ?= data/star32
demo: $(STAMP)
	@test -f $(DEMO_DATA)/_dataset.json || $(EBM) data ingest synthetic star --size 32 --n-train 2000 \
		--n-val 300 --n-test 500 --out $(DEMO_DATA)
	$(EBM) train demo --set task.data_dir=$(DEMO_DATA) --name demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest -m unit

bench: $(STAMP)
	$(PY) bench/bench_step.py

clean:
	rm -rf runs .pytest_cache

# `make demo` and `make test` each set everything up in .venv first (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
EBM    := $(VENV)/bin/ebm
STAMP  := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-unit bench results clean

install: $(STAMP)

# -qq: pip prints errors (a failed install, a dependency conflict) and nothing else.
# torch is pinned here: 2.13.0 is the CPU build; a bare `torch` requirement would pull a multi-GB
# CUDA build. ray is pinned in pyproject.toml.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq torch==2.13.0
	$(PY) -m pip install -qq -e '.[test]'
	touch $(STAMP)

# The main job on the embedded default: the built-in k-fold star images written once as a Parquet
# dataset, trained by 2 Ray Train workers on a local Ray, tracked in ./mlruns.db, then registered
# as models:/ebm-demo@champion and used once through the registry.
DEMO_DATA ?= data/star32
demo: $(STAMP)
	@test -f $(DEMO_DATA)/_dataset.json || $(EBM) data ingest synthetic star --size 32 --n-train 2000 \
		--n-val 300 --n-test 500 --out $(DEMO_DATA)
	@name=demo-$$(date +%Y%m%d-%H%M%S) && set -x && \
	$(EBM) train demo --set task.data_dir=$(DEMO_DATA) --name $$name && \
	$(EBM) register --run-name $$name --name ebm-demo --alias champion && \
	$(EBM) predict models:/ebm-demo@champion --input $(DEMO_DATA) --limit 1 --out -
	@echo "serve it: PATH=$$PWD/$(VENV)/bin:\$$PATH MLFLOW_TRACKING_URI=sqlite:///$$PWD/mlruns.db mlflow models serve -m models:/ebm-demo@champion --env-manager local -h 127.0.0.1 -p 5001"

test: $(STAMP)
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest -m unit

bench: $(STAMP)
	$(PY) bench/bench_step.py

# docs/RESULTS.md rebuilt: its tables from the committed run export results/runs.jsonl, refreshed from
# the MLflow store first when that store is on this machine; its prose from results/RESULTS.template.md.
RESULTS_EXPERIMENT ?= paper-claims
RESULTS_STORE      ?= results/mlruns.db
results: $(STAMP)
	@if [ -f $(RESULTS_STORE) ]; then set -x; $(EBM) results $(RESULTS_EXPERIMENT) \
		--tracking-uri sqlite:///$(RESULTS_STORE) --export results/runs.jsonl; fi
	$(EBM) results $(RESULTS_EXPERIMENT) --runs results/runs.jsonl --template results/RESULTS.template.md \
		--out docs/RESULTS.md

clean:
	rm -rf runs .pytest_cache

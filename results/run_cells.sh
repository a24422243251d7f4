#!/bin/bash
# One `ebm train --local --seeds N` per cell, lowest CPU priority, one torch thread, all under one
# experiment (default "paper-claims" in the SQLite store results/mlruns.db). Two loops may share a new
# store: opening it is serialised (pipelines/tracking.py, open_client) since two clients
# creating its schema at once lost one cell here.
# Usage: results/run_cells.sh CONFIG EPOCHS M_TRAIN CELL...
#   cells: learned_K1 learned_K4 learned_K16 nce_fixed mdn_K4 mdn_K8 teacher_K4 teacher_K8
#   env:   PREFIX      group-name prefix (groups are TASK/PREFIXCELL, e.g. toy2/full_learned_K4)
#          TASK        group task part (default: CONFIG)
#          EXTRA       more --set arguments, e.g. EXTRA="--set task.data_dir=data/fashion4k"
#          SEEDS SEED0 seeds SEED0 .. SEED0+SEEDS-1 (default 5 seeds from 0)
#          EXPERIMENT STORE  MLflow experiment and SQLite store (default paper-claims, results/mlruns.db)
set -u
cd "$(dirname "$0")/.."
config=$1; epochs=$2; m=$3; shift 3
task=${TASK:-$config}
seeds=${SEEDS:-5}; seed0=${SEED0:-0}
for cell in "$@"; do
  case $cell in
    learned_K*) set_m="method.name=ebm_learned_proposal"; k=${cell#learned_K} ;;
    nce_fixed)  set_m="method.name=nce_fixed"; k=4 ;;
    mdn_K*)     set_m="method.name=mdn"; k=${cell#mdn_K} ;;
    teacher_K*) set_m="method.name=mdn_ebm_teacher"; k=${cell#teacher_K} ;;
    *) echo "unknown cell $cell" >&2; exit 2 ;;
  esac
  echo "=== $(date +%T) $task/${PREFIX:-}$cell seeds $seed0..$((seed0 + seeds - 1))"
  # shellcheck disable=SC2086  # EXTRA is a list of arguments
  OMP_NUM_THREADS=1 nice -n 19 .venv/bin/ebm train "$config" --local --seeds "$seeds" \
    --experiment "${EXPERIMENT:-paper-claims}" --tracking-uri "sqlite:///${STORE:-results/mlruns.db}" \
    --group "$task/${PREFIX:-}$cell" --set seed="$seed0" \
    --set $set_m --set proposal.K=$k --set optim.epochs=$epochs --set sampler.M_train=$m ${EXTRA:-}
  rc=$?  # before any other expansion: $(date) below would reset $?
  echo "=== $(date +%T) $task/${PREFIX:-}$cell rc=$rc"
done

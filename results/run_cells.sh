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
#          DRY_RUN=1   print the ranges of seeds each cell would train, train nothing
#          DECAY="EPOCHS LR"  after each cell's training, its runs continued to EPOCHS epochs at learning
#                      rate LR (the images' step decay, results/extend_runs.py) and the store exported to
#                      results/runs.jsonl at once (under a lock): a run is complete and committed-ready the
#                      moment it ends, not when the whole batch does (a session that ends mid-batch loses
#                      only the runs in progress)
#          LOGS        folder for the decay's training output (default results/logs)
#          EXPORT      the run export read and written (default results/runs.jsonl)
# A cell resumes: seeds whose run of the group already FINISHED (in the store, or in the committed export
# results/runs.jsonl when the store is from another machine) are not trained again, so a batch cut by a
# restart is started again with the same command; the missing seeds run as contiguous ranges, one
# `ebm train --seeds` each. With DECAY, a run known only from the export that is still short of the decay's
# length is not done: its checkpoint went with the other machine's store, so it can never be decayed and
# the seed is trained again (the export keeps the short run; the tables name it, at its own protocol).
set -u
cd "$(dirname "$0")/.."
config=$1; epochs=$2; m=$3; shift 3
task=${TASK:-$config}
seeds=${SEEDS:-5}; seed0=${SEED0:-0}
store=${STORE:-results/mlruns.db}
export_file=${EXPORT:-results/runs.jsonl}
read -r decay_epochs decay_lr <<< "${DECAY:-}"

missing() {  # missing GROUP -> "first count" per contiguous range of seeds seed0.. without a FINISHED run
  # (of this experiment and group, started at this number of epochs: a cell re-run at another length
  # trains again; a run continued since, by the step decay, is done)
  .venv/bin/python - "$store" "$1" "$seed0" "$seeds" "${EXPERIMENT:-paper-claims}" "$epochs" "$decay_epochs" "$export_file" <<'PY'
import os, sys
sys.path.insert(0, ".")
from pipelines.driver.results import GROUP_TAG, fetch_records, read_export
store, group, seed0, n, experiment, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
final = int(sys.argv[7] or epochs)       # the length a run must reach to be complete (DECAY's, else EPOCHS)
runs = read_export(sys.argv[8], experiment) if os.path.exists(sys.argv[8]) else []
here = []                                # this machine's runs: their checkpoints are here, they can be continued
if os.path.exists(store):
    here = fetch_records(f"sqlite:///{store}", experiment, missing_ok=True)
ids = {r.run_id for r in here}
# done: a FINISHED run of the seed started at this length (one continued since, by the step decay or an
# extension, still counts: it is this cell's run for that seed) that is complete or can still be completed
done = {int(r.params["seed"]) for r in runs + here if r.status == "FINISHED" and r.tags.get(GROUP_TAG) == group
        and r.started_epochs() == int(epochs) and (r.run_id in ids or int(r.params.get("optim.epochs", 0)) >= final)}
todo = [s for s in range(seed0, seed0 + n) if s not in done]
while todo:
    k = 1
    while k < len(todo) and todo[k] == todo[0] + k:
        k += 1
    print(todo[0], k)
    todo = todo[k:]
PY
}
for cell in "$@"; do
  case $cell in
    learned_K*) set_m="method.name=ebm_learned_proposal"; k=${cell#learned_K} ;;
    nce_fixed)  set_m="method.name=nce_fixed"; k=4 ;;
    mdn_K*)     set_m="method.name=mdn"; k=${cell#mdn_K} ;;
    teacher_K*) set_m="method.name=mdn_ebm_teacher"; k=${cell#teacher_K} ;;
    *) echo "unknown cell $cell" >&2; exit 2 ;;
  esac
  ranges=$(missing "$task/${PREFIX:-}$cell") || exit 1
  [[ -z $ranges ]] && { echo "=== $task/${PREFIX:-}$cell: seeds $seed0..$((seed0 + seeds - 1)) all finished in $store"; continue; }
  while read -r first count; do
    echo "=== $(date +%T) $task/${PREFIX:-}$cell seeds $first..$((first + count - 1))"
    [[ -n ${DRY_RUN:-} ]] && continue
    # shellcheck disable=SC2086  # EXTRA is a list of arguments
    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/ebm train "$config" --local --seeds "$count" \
      --experiment "${EXPERIMENT:-paper-claims}" --tracking-uri "sqlite:///$store" \
      --group "$task/${PREFIX:-}$cell" --set seed="$first" \
      --set $set_m --set proposal.K=$k --set optim.epochs=$epochs --set sampler.M_train=$m ${EXTRA:-} < /dev/null
    rc=$?  # before any other expansion: $(date) below would reset $?
    echo "=== $(date +%T) $task/${PREFIX:-}$cell rc=$rc"
    [[ $rc -ne 0 ]] && status=1
  done <<< "$ranges"
  [[ -n ${DRY_RUN:-} || -z $decay_epochs ]] && continue
  echo "=== $(date +%T) $task/${PREFIX:-}$cell: step decay to $decay_epochs epochs at lr $decay_lr"
  .venv/bin/python results/extend_runs.py --epochs "$decay_epochs" --set "optim.lr=$decay_lr" --groups "$task/${PREFIX:-}$cell" \
    --queues 1 --logs "${LOGS:-results/logs}" --tracking-uri "sqlite:///$store" --experiment "${EXPERIMENT:-paper-claims}" \
    || status=1
  # the two queues of a batch export into one file: one at a time
  flock "$export_file.lock" .venv/bin/ebm results "${EXPERIMENT:-paper-claims}" --tracking-uri "sqlite:///$store" \
    --export "$export_file" > /dev/null || status=1
  echo "=== $(date +%T) $task/${PREFIX:-}$cell: exported to $export_file"
done
exit "${status:-0}"

#!/bin/bash
# Issue 16's long runs in batches that each take about 2.5-2.75 hours on this 2-core machine: two queues
# (one per core, one torch thread, nice 19) run side by side, and when both end the batch's runs are
# exported from the store to results/runs.jsonl (merged with the earlier batches'), so that
# `make results` rebuilds docs/RESULTS.md from the committed export without the store.
#
#   results/run_issue16.sh list      the batches, their cells and seeds, and the estimated hours
#   results/run_issue16.sh BATCH     run one batch (toys, star_a, star_b, fashion_a, fashion_b); run again
#                                    after an interruption, it first continues the interrupted runs from
#                                    their checkpoints, then trains only the seeds not yet finished
#   results/run_issue16.sh chain BATCH...   the batches one after another (each's output appended to
#                                    results/logs/BATCH.batch.log), stopping at the first that fails; the
#                                    command to restart after a session or the machine ended:
#                                    setsid nohup results/run_issue16.sh chain star_b fashion_a fashion_b &
#   results/run_issue16.sh extend EPOCHS GLOB...   continue the finished runs of the matching groups to
#                                    EPOCHS epochs (results/extend_runs.py: an image cell still improving
#                                    at its last epoch), two queues, then export; EXTEND_SET="--set
#                                    optim.lr=1e-4" changes the config for the added epochs
#
# Protocols (docs/RESULTS.md sections 2 and 3):
#   toys    paper protocol: 75 epochs, M_train 1024, last epoch (eval.select = last), seeds 0-19
#   images  converged: $IMAGE_EPOCHS epochs (default 30) at lr 1e-3, then a step decay: every run
#           continued to $DECAY_EPOCHS epochs (default 1.5 x) at lr $DECAY_LR (default 1e-4;
#           results/extend_runs.py, right after the run, which is then exported; after both queues any run
#           of the task still short of it is decayed too; DECAY_EPOCHS=0 skips it); validation every epoch,
#           the checkpoint with the lowest validation NLL (eval.select = best_val) over all epochs, for
#           every method alike; seeds 0-9 in two halves. Since star_b, each epoch's validation computes the
#           NLL alone (eval.val_figures = nll): the same training, selection and test figures bit for bit
#           (tests/unit/test_train.py), about a third less time per epoch
#
# Estimates: CPU seconds per seed (toys, 75 epochs) or per seed and epoch (images, with a validation each
# epoch), one thread. Toys: issue 7's CPU-time columns (a 5-epoch toy 2 learned-proposal run measured
# again for issue 16 agrees: 0.54 s per epoch + 8.9 s fixed, i.e. 49.5 s at 75 epochs). Images: issue 7's
# per-epoch CPU × 1.65 for the EBM cells and × 1.2 for the MDNs, for a validation every epoch; measured for
# issue 16 on star, learned proposal K = 4: 5.95 s per training epoch + 11.2 s per validation (500 images:
# grid NLL, IS NLL, prediction, KL) = 17.2 s, below the 19.1 s assumed, so the hours printed are an upper
# estimate on an idle core. Wall time under other jobs' load is longer (nice 19 yields to them).
set -u
self=$(realpath "$0")
cd "$(dirname "$self")/.."
# Edit this file (and run_cells.sh) by writing a new file and renaming it over this one: bash reads a
# running script from its open file as it goes, so an in-place edit changes what a running batch does.
# nice 19 alone does not yield on a Linux desktop/server kernel with autogroups: the scheduler shares the
# CPU between sessions first and applies nice only inside one, so queues started from another terminal
# took half the cores from the user's foreground work (seen: a test run twice as slow). A batch therefore
# runs in its own session whose autogroup is niced to 19 (the user's own session is left as it is).
if [[ ${1:-list} != list && -z ${EBM_BATCH_SESSION:-} ]]; then
  EBM_BATCH_SESSION=1 exec setsid -w "$self" "$@"
fi
if [[ -n ${EBM_BATCH_SESSION:-} && -w /proc/self/autogroup ]]; then
  echo 19 > /proc/self/autogroup 2>/dev/null || true
fi
CELLS="learned_K4 nce_fixed mdn_K4 mdn_K8 teacher_K4 teacher_K8"
IMAGE_EPOCHS=${IMAGE_EPOCHS:-30}
DECAY_EPOCHS=${DECAY_EPOCHS:-$((IMAGE_EPOCHS * 3 / 2))}
DECAY_LR=${DECAY_LR:-1e-4}
IMAGE_SET="--set eval.every=1 --set eval.select=best_val --set eval.val_figures=nll"
FASHION_DATA=data/fashion4k
declare -A TOY_S=([toy2]="learned_K4=49.5 nce_fixed=36.6 mdn_K4=4.9 mdn_K8=4.7 teacher_K4=53.2 teacher_K8=54.0"
                  [toy1]="learned_K4=65.0 nce_fixed=46.4 mdn_K4=8.8 mdn_K8=10.6 teacher_K4=62.5 teacher_K8=71.1")
# per epoch with a validation every epoch: issue 7's per-epoch CPU × 1.65 for the EBMs (validation
# scores 500 images on 1024 grid points and 1024 IS samples each epoch), × 1.2 for the MDNs
declare -A IMG_S=([star]="learned_K4=19.1 nce_fixed=15.2 mdn_K4=3.1 mdn_K8=2.8 teacher_K4=21.5 teacher_K8=21.4"
                  [fashion]="learned_K4=18.3 nce_fixed=14.5 mdn_K4=2.6 mdn_K8=2.5 teacher_K4=20.3 teacher_K8=19.9")
# two queues per batch: cells of queue A | cells of queue B (balanced by the estimates above)
QA="learned_K4 mdn_K4 teacher_K8"
QB="nce_fixed teacher_K4 mdn_K8"

cost() {  # cost TABLE_ROW CELLS FACTOR -> CPU seconds of those cells per unit (seed or seed·epoch) × FACTOR
  awk -v row="$1" -v cells="$2" -v f="$3" 'BEGIN { n = split(row, kv, " "); for (i = 1; i <= n; i++) {
    split(kv[i], p, "="); c[p[1]] = p[2] } m = split(cells, cs, " "); s = 0; for (i = 1; i <= m; i++) s += c[cs[i]];
    printf "%.2f", s * f / 3600 }'
}

batch() {  # batch NAME -> "config epochs m seed0 seeds queueA | queueB" per queue line
  case $1 in
    toys)      echo "toy2 75 1024 0 20 $CELLS"; echo "toy1 75 1024 0 20 $CELLS" ;;
    star_a)    echo "star $IMAGE_EPOCHS 256 0 5 $QA"; echo "star $IMAGE_EPOCHS 256 0 5 $QB" ;;
    star_b)    echo "star $IMAGE_EPOCHS 256 5 5 $QA"; echo "star $IMAGE_EPOCHS 256 5 5 $QB" ;;
    fashion_a) echo "fashion $IMAGE_EPOCHS 256 0 5 $QA"; echo "fashion $IMAGE_EPOCHS 256 0 5 $QB" ;;
    fashion_b) echo "fashion $IMAGE_EPOCHS 256 5 5 $QA"; echo "fashion $IMAGE_EPOCHS 256 5 5 $QB" ;;
    *) echo "unknown batch $1 (batches: toys star_a star_b fashion_a fashion_b)" >&2; return 2 ;;
  esac
}

hours() {  # hours QUEUE_LINE -> estimated hours of one queue on an otherwise idle core
  read -r config epochs m seed0 seeds cells <<< "$1"
  if [[ $config == toy* ]]; then cost "${TOY_S[$config]}" "$cells" "$seeds"
  else cost "${IMG_S[$config]}" "$cells" "$((seeds * (DECAY_EPOCHS > epochs ? DECAY_EPOCHS : epochs)))"; fi
}

queue() {  # queue QUEUE_LINE: the cells one after another
  read -r config epochs m seed0 seeds cells <<< "$1"
  local extra="" prefix=p20_
  if [[ $config != toy* ]]; then
    prefix=conv_; extra="$IMAGE_SET"
    [[ $config == fashion ]] && extra="$extra --set task.data_dir=$FASHION_DATA"
  fi
  if [[ $config == toy* || $DECAY_EPOCHS -le $epochs ]]; then
    # shellcheck disable=SC2086  # cells and EXTRA are lists
    PREFIX=$prefix SEEDS=$seeds SEED0=$seed0 EXTRA="$extra" results/run_cells.sh "$config" "$epochs" "$m" $cells
    return
  fi
  # images: a seed at a time through the queue's cells, each run decayed and exported as soon as it is
  # trained, so that the runs finished before a session ends are complete and in results/runs.jsonl
  local s rc=0
  for ((s = seed0; s < seed0 + seeds; s++)); do
    # shellcheck disable=SC2086  # cells and EXTRA are lists
    PREFIX=$prefix SEEDS=1 SEED0=$s EXTRA="$extra" DECAY="$DECAY_EPOCHS $DECAY_LR" LOGS="results/logs/$QUEUE" \
      results/run_cells.sh "$config" "$epochs" "$m" $cells || rc=1
  done
  return $rc
}

if [[ ${1:-} == list || -z ${1:-} ]]; then
  for b in toys star_a star_b fashion_a fashion_b; do
    echo "$b:"
    while read -r line; do echo "  queue: $line  (~$(hours "$line") h)"; done < <(batch "$b")
  done
  exit 0
fi
if [[ $1 == extend ]]; then
  [[ $# -ge 3 ]] || { echo "usage: $0 extend EPOCHS GLOB..." >&2; exit 2; }
  epochs=$2; shift 2
  mkdir -p results/logs
  rc=0
  # shellcheck disable=SC2086  # EXTEND_SET is a list of --set KEY=VALUE
  .venv/bin/python results/extend_runs.py --epochs "$epochs" ${EXTEND_SET:-} --groups "$@" --queues 2 \
    --tracking-uri "sqlite:///${STORE:-results/mlruns.db}" --experiment "${EXPERIMENT:-paper-claims}" || rc=1
  .venv/bin/ebm results "${EXPERIMENT:-paper-claims}" --tracking-uri "sqlite:///${STORE:-results/mlruns.db}" \
    --export results/runs.jsonl || rc=1
  echo "$(date +%T) extend to $epochs epochs done (rc=$rc); commit results/runs.jsonl, then: make results"
  exit $rc
fi
if [[ $1 == chain ]]; then
  shift
  [[ $# -ge 1 ]] || { echo "usage: $0 chain BATCH..." >&2; exit 2; }
  for b in "$@"; do batch "$b" > /dev/null || exit 2; done      # every name checked before anything runs
  mkdir -p results/logs
  for b in "$@"; do
    echo "$(date +%T) chain: batch $b (log results/logs/$b.batch.log)"
    "$self" "$b" >> "results/logs/$b.batch.log" 2>&1 || { echo "$(date +%T) chain stopped: batch $b failed"; exit 1; }
  done
  echo "$(date +%T) chain done: $*"
  exit 0
fi
lines=$(batch "$1") || exit 2
if [[ $1 == fashion* && ! -f $FASHION_DATA/_dataset.json ]]; then
  .venv/bin/ebm data ingest fashion_rotation --out "$FASHION_DATA" --n-train 4000 --n-val 500 --n-test 1000 || exit 1
fi
mkdir -p results/logs
# first the runs an interruption stopped (the end of a session, a restart): continued from their latest
# checkpoints to their own length; refused (and the batch not started) while a trainer of these groups runs
groups=()
while read -r config _; do
  if [[ $config == toy* ]]; then groups+=("$config/p20_*"); else groups+=("$config/conv_*"); fi
done <<< "$lines"
.venv/bin/python results/extend_runs.py --interrupted --groups "${groups[@]}" --queues 2 \
  --tracking-uri "sqlite:///${STORE:-results/mlruns.db}" --experiment "${EXPERIMENT:-paper-claims}" || exit 1
pids=()
i=0
while read -r line; do
  i=$((i + 1))
  QUEUE=$1.q$i queue "$line" > "results/logs/$1.q$i.log" 2>&1 &
  pids+=($!)
  echo "$(date +%T) batch $1 queue $i (pid $!, ~$(hours "$line") h): $line -> results/logs/$1.q$i.log"
done <<< "$lines"
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
if [[ $1 != toys && $DECAY_EPOCHS -gt $IMAGE_EPOCHS ]]; then
  # the step decay, for the task's finished runs still short of it (this batch's, and any earlier)
  echo "$(date +%T) batch $1: step decay, runs continued to $DECAY_EPOCHS epochs at lr $DECAY_LR"
  .venv/bin/python results/extend_runs.py --epochs "$DECAY_EPOCHS" --set "optim.lr=$DECAY_LR" \
    --groups "${1%_*}/conv_*" --queues 2 --tracking-uri "sqlite:///${STORE:-results/mlruns.db}" \
    --experiment "${EXPERIMENT:-paper-claims}" || rc=1
fi
.venv/bin/ebm results "${EXPERIMENT:-paper-claims}" --tracking-uri "sqlite:///${STORE:-results/mlruns.db}" \
  --export results/runs.jsonl || rc=1
echo "$(date +%T) batch $1 done (rc=$rc); commit results/runs.jsonl, then: make results"
exit $rc

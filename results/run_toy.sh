#!/bin/bash
# Issue 7 toy grid: one run at a time, lowest CPU priority, all under experiment "paper-claims".
# Usage: results/run_toy.sh TASK EPOCHS M_TRAIN CELL...   (cells: learned_K1 learned_K4 learned_K16 nce_fixed mdn_K4 mdn_K8 teacher_K4 teacher_K8)
set -u
cd /work/main
task=$1; epochs=$2; m=$3; shift 3
for cell in "$@"; do
  case $cell in
    learned_K*) set_m="method.name=ebm_learned_proposal"; k=${cell#learned_K} ;;
    nce_fixed)  set_m="method.name=nce_fixed"; k=4 ;;
    mdn_K*)     set_m="method.name=mdn"; k=${cell#mdn_K} ;;
    teacher_K*) set_m="method.name=mdn_ebm_teacher"; k=${cell#teacher_K} ;;
  esac
  echo "=== $(date +%T) $task/${PREFIX:-}$cell"
  OMP_NUM_THREADS=1 nice -n 19 .venv/bin/ebm train $task --local --seeds 5 \
    --experiment paper-claims --tracking-uri sqlite:///results/mlruns.db --group $task/${PREFIX:-}$cell \
    --set $set_m --set proposal.K=$k --set optim.epochs=$epochs --set sampler.M_train=$m
  echo "=== $(date +%T) $task/${PREFIX:-}$cell rc=$?"
done

#!/usr/bin/env bash
# FP32 fine-tuning of MiniLM-L6 (offline assets) on SST-2, MRPC, CoLA, STS-B and CoNLL-03: the FP32
# references every compressed model is compared with. One run directory per task under OUT; summarise
# them with `python tools/collect_runs.py OUT`.
#   MPQ_ASSETS=../shared/assets bash tools/bench_finetune.sh [OUT] [TASK ...]
# THREADS=1 runs torch on one thread, so that two of these scripts can share a 2-core machine without
# OpenMP threads spinning against each other.
set -euo pipefail
OUT=${1:-runs/bench/fp}
shift || true
TASKS=${*:-"sst2 mrpc cola stsb conll03"}
: "${MPQ_ASSETS:?set MPQ_ASSETS to the offline asset folder}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [ -n "${THREADS:-}" ]; then export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS; fi

# SST-2 is capped at 1,000 steps (32,000 of its 67,349 sentences) to fit a 2-core machine.
declare -A TRAIN=([sst2]="finetune.epochs=1 max_steps=1000" [mrpc]="finetune.epochs=3" [cola]="finetune.epochs=3"
                  [stsb]="finetune.epochs=3" [conll03]="finetune.epochs=1")
declare -A EXTRA=([sst2]="eval.splits=[test_labeled]")

for task in $TASKS; do
  dir="$OUT/$task"
  if [ -f "$dir/metrics.json" ]; then echo "$task: done already ($dir)"; continue; fi
  resume=false; [ -d "$dir/train_state" ] && resume=true
  echo "$task: fine-tuning into $dir (resume=$resume)"
  python -m search stage=finetune model=minilm-l6 task="$task" logger=none progress_bar=false \
    ${TRAIN[$task]} finetune.lr=5e-5 finetune.batch_size=32 finetune.checkpoint_every=250 \
    ${EXTRA[$task]:-} resume=$resume hydra.run.dir="$dir"
done

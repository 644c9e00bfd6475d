#!/usr/bin/env bash
# Searched + QAT vs uniform-precision QAT at the same bits, from a fine-tuned FP checkpoint.
#   MPQ_ASSETS=../shared/assets bash tools/bench_search.sh CHECKPOINT TASK OUT "BUDGETS" "SEEDS" [extra overrides...]
# e.g. bash tools/bench_search.sh runs/bench/fp/mrpc/checkpoint mrpc runs/bench/search/mrpc "3 2" "42"
# For each budget b and seed: stage=search (budget.avg_bits=b) -> stage=qat of its architecture, and
# stage=qat of the uniform architecture at max(2, ceil(b)) bits (the nearest uniform precision that exists).
# Summarise with `python tools/collect_runs.py OUT`.
set -euo pipefail
if [ $# -lt 5 ]; then sed -n 2,7p "$0" >&2; exit 2; fi
CKPT=$1; TASK=$2; OUT=$3; BUDGETS=$4; SEEDS=$5; shift 5
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
common=(model.name_or_path="$CKPT" task="$TASK" logger=none progress_bar=false "$@")

run() {  # run DIR OVERRIDES...: skip when done, resume when interrupted
  local dir=$1; shift
  if [ -f "$dir/metrics.json" ]; then echo "done already: $dir"; return; fi
  local resume=false; [ -d "$dir/train_state" ] && resume=true
  echo "running $dir"
  python -m search "${common[@]}" "$@" resume=$resume hydra.run.dir="$dir"
}

for seed in $SEEDS; do
  for b in $BUDGETS; do
    run "$OUT/b$b/s$seed/search" stage=search budget.avg_bits="$b" seed="$seed"
    run "$OUT/b$b/s$seed/qat" stage=qat qat.architecture="$OUT/b$b/s$seed/search/architecture.json" seed="$seed"
    u=$(python -c "import math; print(max(2, math.ceil($b)))")
    mkdir -p "$OUT/b$b/s$seed"
    python tools/uniform_arch.py "$OUT/b$b/s$seed/search/architecture.json" "$u" "$OUT/b$b/s$seed/uniform$u.json" >/dev/null
    run "$OUT/b$b/s$seed/uniform$u" stage=qat qat.architecture="$OUT/b$b/s$seed/uniform$u.json" seed="$seed"
  done
done

#!/usr/bin/env bash
# One `stage=compare` cell set of the BENCHMARKS.md comparison sections, from the FP checkpoint that
# tools/bench_finetune.sh wrote, with the run lengths those sections use per task (capped for a 2-core CPU):
#   MPQ_ASSETS=../shared/assets bash tools/bench_compare.sh TASK SEED BUDGETS NAME METHODS [OVERRIDE ...]
#   e.g. bash tools/bench_compare.sh cola 42 '[2,1.5]' lowbit '[searched,hawq,uniform]' space=lowbit
# Writes $OUT/<TASK>_<NAME>_s<SEED> (OUT=runs/bench/compare) and resumes it when it is there already;
# the log goes to $LOGS/<TASK>_<NAME>_s<SEED>.log (LOGS=runs/logs). FP=runs/bench/fp holds the checkpoints.
# One torch thread (THREADS=1), so that two of these share a 2-core machine.
set -euo pipefail
if [ $# -lt 5 ]; then sed -n 2,8p "$0" >&2; exit 2; fi
task=$1 seed=$2 budgets=$3 name=$4 methods=$5
shift 5
: "${MPQ_ASSETS:?set MPQ_ASSETS to the offline asset folder}"
FP=${FP:-runs/bench/fp} OUT=${OUT:-runs/bench/compare} LOGS=${LOGS:-runs/logs}
# search epochs, QAT epochs and extra settings, as in each task's BENCHMARKS.md section
declare -A LENGTH=([cola]="search.epochs=1 qat.epochs=0.75 hawq.max_probes=50"
                   [mrpc]="search.epochs=2 qat.epochs=2 hawq.max_probes=50"
                   [sst2]="search.epochs=0.2 qat.epochs=0.11 eval.splits=[test_labeled]"
                   [conll03]="search.epochs=1 qat.epochs=0.5 hawq.max_probes=50")
if [ -z "${LENGTH[$task]:-}" ]; then
  echo "error: no benchmark run lengths for task '$task'; use one of: ${!LENGTH[*]}" >&2
  exit 2
fi
ckpt=$FP/$task/checkpoint
if [ ! -d "$ckpt" ]; then
  echo "error: no FP checkpoint at $ckpt; run: MPQ_ASSETS=$MPQ_ASSETS bash tools/bench_finetune.sh $FP $task" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
mkdir -p "$LOGS"
run=${task}_${name}_s$seed
echo "$run: compare into $OUT/$run, log $LOGS/$run.log"
# shellcheck disable=SC2086  # LENGTH holds several overrides
python -m search stage=compare model.name_or_path="$ckpt" task="$task" logger=none progress_bar=false \
  "compare.budgets=$budgets" "compare.seeds=[$seed]" ${LENGTH[$task]} resume=true \
  hydra.run.dir="$OUT/$run" "compare.methods=$methods" "$@" >> "$LOGS/$run.log" 2>&1 \
  || { rc=$?; tail -n 3 "$LOGS/$run.log" >&2; echo "error: $run failed (exit $rc); its log: $LOGS/$run.log" >&2; exit $rc; }

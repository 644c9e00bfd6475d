#!/usr/bin/env bash
# Export QAT runs as bit-packed folders, verify them against the QAT model, and size them.
#   MPQ_ASSETS=../shared/assets bash tools/bench_export.sh OUT TASK QAT_RUN_DIR [QAT_RUN_DIR ...]
# Each run becomes OUT/<its path with / as _>: stage=export (packed/, metrics.json with the size accounting
# and the verification on the dev split). Summarise with `python tools/collect_runs.py --exports OUT`.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n 2,5p "$0" >&2; exit 2; fi
OUT=$1; TASK=$2; shift 2
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
for src in "$@"; do
  dir="$OUT/$(echo "$src" | sed 's#^runs/##; s#/#_#g')"
  if [ -f "$dir/metrics.json" ]; then echo "done already: $dir"; continue; fi
  echo "exporting $src -> $dir"
  python -m search stage=export task="$TASK" export.run_dir="$src" logger=none progress_bar=false hydra.run.dir="$dir"
done

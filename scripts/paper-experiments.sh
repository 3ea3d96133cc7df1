#!/bin/bash
# Every experiment behind docs/results.md, docs/analysis.md and docs/controls.md on the embedded model,
# most valuable first; each step resumes (finished runs and settings are reused), so rerun it to complete.
#   bash scripts/paper-experiments.sh [OUT]     (default runs/paper; then: parts tables --from-runs OUT)
set -u
OUT=${1:-runs/paper}
PARTS=${PARTS:-.venv/bin/parts}
TASKS=sst2,boolq,qqp,wic,rte,mnli,agnews,arc
N=200
step() { echo "== $(date -u +%H:%M:%S) parts $*"; nice -n 10 $PARTS "$@" || echo "!! failed: $*"; }
for seeds in 0 0-1 0-2 0-3 0-4; do
  for templates in 1 1,2,3; do
    # the main table (Table 4 layout), then Table 3 (shares the sst2 / boolq runs)
    step evaluate --tasks $TASKS --templates $templates --seeds $seeds --limit $N --out "$OUT"
    step transfer --templates $templates --seeds $seeds --limit $N --target-limit $N --out "$OUT"
  done
  # template 4: the minimally contrastive twin, for Table 2
  step sweep --tasks $TASKS --templates 4 --seeds $seeds --split test --limit $N --out "$OUT"
done
step tables --from-runs "$OUT" --limit $N

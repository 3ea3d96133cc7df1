#!/bin/bash
# Every experiment behind docs/results.md, docs/analysis.md and docs/controls.md on the embedded model, most
# valuable first (all templates at one demonstration set, then more sets); each step resumes (finished runs and
# settings are reused), so rerun it to complete. With Ray installed (scripts/setup.sh --dev) the settings are
# spread over $WORKERS one-thread workers (default: one per core); without it they run in this process.
#   PARTS_DATA_DIR=../shared/data bash scripts/paper-experiments.sh [OUT]   (default runs/paper)
# It ends with `parts tables --from-runs OUT`: writes results/ and rebuilds every docs table and result figure.
set -u
OUT=${1:-runs/paper}
PARTS=${PARTS:-.venv/bin/parts}
PYTHON=${PYTHON:-.venv/bin/python}
TASKS=sst2,boolq,qqp,wic,rte,mnli,agnews,arc
N=200
SPREAD=()
if "$PYTHON" -c "import ray" 2>/dev/null; then SPREAD=(--ray local --workers "${WORKERS:-$(nproc)}"); fi
step() { echo "== $(date -u +%H:%M:%S) parts $*"; $PARTS "$@" "${SPREAD[@]}" || echo "!! failed: $*"; }
main_table() { step evaluate --tasks $TASKS --templates 1,2,3 --seeds "$1" --limit $N --out "$OUT"; }
twin() { step sweep --tasks $TASKS --templates 4 --seeds "$1" --split test --limit $N --out "$OUT"; }  # Table 2
shift_sets() { step transfer --templates "$1" --seeds "$2" --limit $N --target-limit $N --out "$OUT"; }  # Table 3

main_table 0
twin 0
step control --tasks sst2,arc --templates 1,2 --seeds 0 --limit $N --out "$OUT"
shift_sets 1,2,3 0
main_table 0-1
main_table 0-2
shift_sets 1,2,3 0-2
twin 0-2
main_table 0-3
main_table 0-4
shift_sets 1,2,3 0-4
twin 0-4
echo "== $(date -u +%H:%M:%S) parts tables --from-runs $OUT"
$PARTS tables --from-runs "$OUT" --limit $N

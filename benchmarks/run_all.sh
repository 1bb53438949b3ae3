#!/usr/bin/env bash
# Every adaptation method on the four shipped scenario x backbone recipes (BasicMotions, embedded data), each
# method at its learning rate chosen on the validation split from the recipe's bench.lr_grid.
# Each run writes runs/bench/<recipe>/{bench.json,bench.md,f1_vs_step.png,f1_vs_params.png,val_f1_vs_lr.png};
# the tables in docs/benchmarks.md come from these bench.md files.
#   benchmarks/run_all.sh              # seeds from each recipe's bench.seeds (5), 2 worker processes
#   SEEDS=3 WORKERS=4 benchmarks/run_all.sh
# Each training run uses one thread; WORKERS runs go in parallel (results do not depend on WORKERS).
set -euo pipefail
cd "$(dirname "$0")/.."
EDGETOOL=${EDGETOOL:-$( [ -x .venv/bin/edgetool ] && echo .venv/bin/edgetool || echo edgetool )}
OUT=${OUT:-runs/bench}
WORKERS=${WORKERS:-2}
METHODS=full,head,bn,bias,lora,dora,galore,adapter,ttlora
for recipe in bench-shift-resnet1d bench-shift-mobilenet1d bench-newclass-resnet1d bench-newclass-mobilenet1d; do
  "$EDGETOOL" bench "recipes/$recipe.yaml" --methods "$METHODS" ${SEEDS:+--seeds "$SEEDS"} --workers "$WORKERS" \
    --quiet --out "$OUT/$recipe"
done

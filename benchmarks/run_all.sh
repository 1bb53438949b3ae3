#!/usr/bin/env bash
# Every adaptation method on the four shipped scenario x backbone recipes (BasicMotions, embedded data).
# Each run writes runs/bench/<recipe>/{bench.json,bench.md,f1_vs_step.png,f1_vs_params.png};
# the tables in docs/benchmarks.md come from these bench.md files.
#   benchmarks/run_all.sh              # seeds from each recipe's bench.seeds (5)
#   SEEDS=3 benchmarks/run_all.sh      # fewer seeds
# On a shared CPU, OMP_NUM_THREADS=1 avoids OpenMP threads spin-waiting on each other.
set -euo pipefail
cd "$(dirname "$0")/.."
EDGETOOL=${EDGETOOL:-$( [ -x .venv/bin/edgetool ] && echo .venv/bin/edgetool || echo edgetool )}
OUT=${OUT:-runs/bench}
METHODS=full,head,bn,bias,lora,dora,galore,adapter,ttlora
for recipe in bench-shift-resnet1d bench-shift-mobilenet1d bench-newclass-resnet1d bench-newclass-mobilenet1d; do
  "$EDGETOOL" bench "recipes/$recipe.yaml" --methods "$METHODS" ${SEEDS:+--seeds "$SEEDS"} --out "$OUT/$recipe"
done

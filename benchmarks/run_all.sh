#!/usr/bin/env bash
# Every adaptation method on the four shipped scenario x backbone recipes (BasicMotions, embedded data), each
# method at its learning rate chosen on the validation split from the recipe's bench.lr_grid: one
# `edgetool bench` call for the four recipes, so one pool (or one Ray cluster) runs the whole grid.
# Each recipe writes runs/bench/<recipe>/{bench.json,bench.md,f1_vs_step.png,f1_vs_params.png,val_f1_vs_lr.png};
# the tables in docs/benchmarks.md come from these bench.md files.
#   benchmarks/run_all.sh                              # seeds from each recipe's bench.seeds (5), 2 worker processes
#   SEEDS=3 WORKERS=4 benchmarks/run_all.sh
#   EXECUTOR=ray benchmarks/run_all.sh                 # Ray tasks on a local Ray sized to this machine
#   EXECUTOR=ray RAY_ADDRESS=auto benchmarks/run_all.sh   # on the Ray cluster this node belongs to (`ray start`)
# Each training run uses one thread; WORKERS runs go in parallel (results do not depend on WORKERS or EXECUTOR).
set -euo pipefail
cd "$(dirname "$0")/.."
EDGETOOL=${EDGETOOL:-$( [ -x .venv/bin/edgetool ] && echo .venv/bin/edgetool || echo edgetool )}
OUT=${OUT:-runs/bench}
EXECUTOR=${EXECUTOR:-local}
METHODS=${METHODS:-full,head,bn,bias,lora,dora,galore,adapter,ttlora}
RECIPES=()
for name in bench-shift-resnet1d bench-shift-mobilenet1d bench-newclass-resnet1d bench-newclass-mobilenet1d; do
  RECIPES+=("recipes/$name.yaml")
done
if [ "$EXECUTOR" = ray ]; then
  where=(--executor ray ${RAY_ADDRESS:+--ray-address "$RAY_ADDRESS"})
else
  where=(--executor "$EXECUTOR" --workers "${WORKERS:-2}")
fi
"$EDGETOOL" bench "${RECIPES[@]}" --methods "$METHODS" ${SEEDS:+--seeds "$SEEDS"} "${where[@]}" --quiet --out "$OUT"

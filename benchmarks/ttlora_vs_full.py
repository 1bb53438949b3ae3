#!/usr/bin/env python3
"""Issue 2's benchmark: TT-LoRA against full fine-tuning, from the fair bench runs.

Reads runs/bench/<recipe>/bench.json written by benchmarks/run_all.sh (every method, 5 seeds, each method at
its learning rate chosen on the validation split) and prints and writes a summary of the two methods: the
rates chosen, test F1 at those rates and the gap, trainable %, convergence to headroom targets (paired by
seed), peak training memory, training FLOPs per step and adapter size. --run runs run_all.sh first.

Convergence targets depend on every method in the run (the best final F1 of any method sets the
headroom), so this reads the all-method runs rather than running the two methods alone.

    .venv/bin/python benchmarks/ttlora_vs_full.py [--run] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from toolchain.artifacts import atomic_write_text  # noqa: E402
from toolchain.bench.report import speedup_cell, steps_cell  # noqa: E402

RECIPES = ["bench-shift-resnet1d", "bench-shift-mobilenet1d", "bench-newclass-resnet1d", "bench-newclass-mobilenet1d"]
REFERENCE, OTHER = "ttlora", "full"


def summary_row(name: str, result: dict) -> str:
    rows = {r["method"]: r for r in result["rows"]}
    full, tt = rows[OTHER], rows[REFERENCE]
    n = len(result["meta"]["seeds"])
    gap = tt["f1_mean"] - full["f1_mean"]
    rel = 100 * gap / full["f1_mean"] if full["f1_mean"] else float("nan")
    key = list(result["meta"]["convergence"]["targets_per_seed"])[-1]
    speed_steps = full["convergence"][key]["speedup_of_reference_steps"]
    speed_seconds = full["convergence"][key]["speedup_of_reference_seconds"]
    return (f"| {name} | {full['lr']:g} / {tt['lr']:g} | {full['f1_mean']:.3f} ± {full['f1_std']:.3f} "
            f"| {tt['f1_mean']:.3f} ± {tt['f1_std']:.3f} | {gap:+.3f} ({rel:+.1f} %) | {tt['trainable_pct']:.2f} % "
            f"| {steps_cell(full['convergence'][key], n, 'steps', '.0f')} | {steps_cell(tt['convergence'][key], n, 'steps', '.0f')} "
            f"| {speedup_cell(speed_steps, 'TT-LoRA', 'full')} | {speedup_cell(speed_seconds, 'TT-LoRA', 'full')} "
            f"| {full['peak_memory_bytes_mean'] / 1024:.0f} / {tt['peak_memory_bytes_mean'] / 1024:.0f} KiB "
            f"| {tt['flops_per_step'] / full['flops_per_step']:.2f} | {full['adapter_bytes_mean']:,.0f} / {tt['adapter_bytes_mean']:,.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run benchmarks/run_all.sh first")
    ap.add_argument("--results", type=Path, default=REPO / "runs" / "bench", help="where run_all.sh wrote the benches")
    args = ap.parse_args()
    if args.run:
        subprocess.run([str(REPO / "benchmarks" / "run_all.sh")], check=True, env={**os.environ, "OUT": str(args.results)})
    results = {}
    for name in RECIPES:
        path = args.results / name / "bench.json"
        if not path.is_file():
            print(f"ttlora_vs_full: {path} is missing; run benchmarks/run_all.sh (or pass --run)", file=sys.stderr)
            return 2
        results[name] = json.loads(path.read_text())
    key = list(next(iter(results.values()))["meta"]["convergence"]["targets_per_seed"])[-1]
    lines = [
        f"| recipe | lr chosen: full / TT-LoRA | full FT macro-F1 | TT-LoRA macro-F1 | TT-LoRA − full (relative) "
        f"| TT-LoRA trainable | steps to {key} headroom: full | steps to {key} headroom: TT-LoRA "
        f"| TT-LoRA speed-up (full ÷ TT-LoRA steps) | TT-LoRA speed-up (training seconds) "
        "| peak train memory full / TT-LoRA | FLOPs/step TT-LoRA ÷ full | adapter bytes full / TT-LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [summary_row(name, result) for name, result in results.items()]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.results / "ttlora-vs-full.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

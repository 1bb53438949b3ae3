#!/usr/bin/env python3
"""Issue 2's benchmark: TT-LoRA against full fine-tuning on the embedded data, hard protocol, 5 seeds.

Runs `edgetool bench RECIPE --methods full,ttlora --seeds 5` on each shipped bench recipe (both
scenarios, both backbones), then prints and writes a summary: F1 gap, trainable %, steps to the target
F1 (paired per seed), peak training memory, training FLOPs per step and adapter size.

    .venv/bin/python benchmarks/ttlora_vs_full.py [--seeds 5] [--out runs/bench/ttlora-vs-full] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["bench-shift-resnet1d", "bench-shift-mobilenet1d", "bench-newclass-resnet1d", "bench-newclass-mobilenet1d"]


def edgetool() -> str:
    local = REPO / ".venv" / "bin" / "edgetool"
    return str(local) if local.exists() else (shutil.which("edgetool") or "edgetool")


def paired_speedup(full: dict, tt: dict) -> tuple[float | None, int]:
    """Mean over seeds where both reached the target of steps(full) / steps(ttlora); > 1 = TT-LoRA faster."""
    pairs = [(a, b) for a, b in zip(full["steps_to_target_per_seed"], tt["steps_to_target_per_seed"])
             if a is not None and b is not None and b > 0]
    if not pairs:
        return None, 0
    return sum(a / b for a, b in pairs) / len(pairs), len(pairs)


def fmt_steps(row: dict, n: int) -> str:
    if not row["steps_to_target_reached"]:
        return f"never (0/{n})"
    return f"{row['steps_to_target_mean']:.0f} ± {row['steps_to_target_std']:.0f} ({row['steps_to_target_reached']}/{n})"


def summary_row(name: str, result: dict) -> str:
    rows = {r["method"]: r for r in result["rows"]}
    full, tt = rows["full"], rows["ttlora"]
    n = len(result["meta"]["seeds"])
    gap = tt["f1_mean"] - full["f1_mean"]
    rel = 100 * gap / full["f1_mean"] if full["f1_mean"] else float("nan")
    speed, pairs = paired_speedup(full, tt)
    speed_txt = f"{speed:.2f}x ({pairs}/{n} paired)" if speed is not None else f"n/a (0/{n} paired)"
    return (f"| {name} | {full['f1_mean']:.3f} ± {full['f1_std']:.3f} | {tt['f1_mean']:.3f} ± {tt['f1_std']:.3f} "
            f"| {gap:+.3f} ({rel:+.1f} %) | {tt['trainable_pct']:.2f} % | {fmt_steps(full, n)} | {fmt_steps(tt, n)} "
            f"| {speed_txt} | {full['peak_memory_bytes_mean'] / 1024:.0f} / {tt['peak_memory_bytes_mean'] / 1024:.0f} KiB "
            f"| {tt['flops_per_step'] / full['flops_per_step']:.2f} | {full['adapter_bytes_mean']:,.0f} / {tt['adapter_bytes_mean']:,.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "ttlora-vs-full")
    ap.add_argument("--reuse", action="store_true", help="summarise existing bench.json files without re-running")
    args = ap.parse_args()
    for name in RECIPES:
        if not args.reuse:
            subprocess.run([edgetool(), "bench", str(REPO / "recipes" / f"{name}.yaml"), "--methods", "full,ttlora",
                            "--seeds", str(args.seeds), "--out", str(args.out / name)], check=True)
    lines = [
        "| recipe | full FT macro-F1 | TT-LoRA macro-F1 | TT-LoRA − full (relative) | TT-LoRA trainable | "
        "steps to target: full | steps to target: TT-LoRA | convergence speed-up (full/TT-LoRA steps) | "
        "peak train memory full / TT-LoRA | FLOPs/step TT-LoRA ÷ full | adapter bytes full / TT-LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RECIPES:
        result = json.loads((args.out / name / "bench.json").read_text())
        lines.append(summary_row(name, result))
    text = "\n".join(lines) + "\n"
    sys.path.insert(0, str(REPO))
    from toolchain.artifacts import atomic_write_text

    atomic_write_text(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

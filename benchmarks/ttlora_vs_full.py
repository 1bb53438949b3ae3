#!/usr/bin/env python3
"""Issue 2's benchmark: TT-LoRA against full fine-tuning on the embedded data, hard protocol, 5 seeds.

Runs `edgetool bench RECIPE --methods full,ttlora --seeds 5` on each shipped bench recipe (both
scenarios, both backbones), then prints and writes a summary: F1 gap, trainable %, steps to the target
F1 (paired per seed), peak training memory, training FLOPs per step and adapter size.

The recipes give every method the same learning rate. Because a shared learning rate can favour one
method, the same comparison is repeated at the learning rates in --lrs (derived recipes written next
to the results, identical except train.lr) and reported as a sensitivity table. Picking the best row
per method there is picking on the test split: read it as an optimistic bound, not a tuned result.

    .venv/bin/python benchmarks/ttlora_vs_full.py [--seeds 5] [--lrs 0.003,0.03] [--out DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

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


def bench(recipe: Path, seeds: int, out: Path) -> None:
    subprocess.run([edgetool(), "bench", str(recipe), "--methods", "full,ttlora", "--seeds", str(seeds),
                    "--out", str(out)], check=True)


def lr_variant(name: str, lr: float, out: Path) -> Path:
    """The shipped recipe with another train.lr (resolved: absolute paths, so it runs from `out`)."""
    from toolchain.recipe import load_recipe

    raw = load_recipe(REPO / "recipes" / f"{name}.yaml").resolved_dict()
    raw["name"] = f"{name}-lr{lr:g}"
    raw["train"]["lr"] = lr
    path = out / f"{raw['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def lr_row(name: str, lr: float, result: dict) -> str:
    rows = {r["method"]: r for r in result["rows"]}
    n = len(result["meta"]["seeds"])
    full, tt = rows["full"], rows["ttlora"]
    return (f"| {name} | {lr:g} | {full['f1_mean']:.3f} ± {full['f1_std']:.3f} | {tt['f1_mean']:.3f} ± {tt['f1_std']:.3f} "
            f"| {fmt_steps(full, n)} | {fmt_steps(tt, n)} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--lrs", default="0.003,0.03", help="extra learning rates for the sensitivity table ('' for none)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "ttlora-vs-full")
    ap.add_argument("--reuse", action="store_true", help="summarise existing bench.json files without re-running")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from toolchain.artifacts import atomic_write_text
    from toolchain.recipe import load_recipe

    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    for name in RECIPES:
        if not args.reuse:
            bench(REPO / "recipes" / f"{name}.yaml", args.seeds, args.out / name)
            for lr in lrs:
                bench(lr_variant(name, lr, args.out / "lr"), args.seeds, args.out / "lr" / f"{name}-lr{lr:g}")
    lines = [
        "| recipe | full FT macro-F1 | TT-LoRA macro-F1 | TT-LoRA − full (relative) | TT-LoRA trainable | "
        "steps to target: full | steps to target: TT-LoRA | convergence speed-up (full/TT-LoRA steps) | "
        "peak train memory full / TT-LoRA | FLOPs/step TT-LoRA ÷ full | adapter bytes full / TT-LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RECIPES:
        result = json.loads((args.out / name / "bench.json").read_text())
        lines.append(summary_row(name, result))
    lines += [
        "",
        "| recipe | train.lr | full FT macro-F1 | TT-LoRA macro-F1 | steps to target: full | steps to target: TT-LoRA |",
        "|---|---|---|---|---|---|",
    ]
    for name in RECIPES:
        shipped = load_recipe(REPO / "recipes" / f"{name}.yaml").train.lr
        runs = [(shipped, args.out / name)] + [(lr, args.out / "lr" / f"{name}-lr{lr:g}") for lr in lrs]
        for lr, path in sorted(runs):
            lines.append(lr_row(name, lr, json.loads((path / "bench.json").read_text())))
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "summary.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Issue 9's F1 invariant: the four shipped benches with the lean training step against plain autograd.

Reads runs/bench/<recipe>/bench.json (benchmarks/run_all.sh: the lean step, the default) and
runs/bench-plain/<recipe>/bench.json (the same recipes with `train: {lean_step: false}`; --run writes them),
and compares every method's chosen rate and per-seed test F1. For each (recipe, method, seed) whose F1 differs
by more than --tolerance it reruns that one training run with plain autograd and with the lean step, on 1 and
on 2 threads: the plain path's own run-to-run spread on that seed is what to read a difference against.
--rerun RECIPE,METHOD,SEED_INDEX reruns that one as well (at the rate the lean bench chose), differing or not.
Writes <results>/lean-vs-plain.md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lean_vs_plain.py [--run] [--results DIR] [--plain DIR]
        [--rerun bench-newclass-mobilenet1d,ttlora,0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["bench-shift-resnet1d", "bench-shift-mobilenet1d", "bench-newclass-resnet1d", "bench-newclass-mobilenet1d"]
METHODS = "full,head,bn,bias,lora,dora,galore,adapter,ttlora"


def plain_recipe(name: str, into: Path) -> Path:
    """A copy of recipes/<name>.yaml with the lean step off (every path absolute, so it loads from `into`)."""
    from toolchain.recipe import load_recipe

    data = load_recipe(REPO / "recipes" / f"{name}.yaml").resolved_dict()
    data["train"]["lean_step"] = False
    path = into / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_benches(results: Path, plain: Path, workers: int) -> None:
    env = {**os.environ, "OUT": str(results), "WORKERS": str(workers)}
    subprocess.run([str(REPO / "benchmarks" / "run_all.sh")], check=True, env=env)
    edgetool = REPO / ".venv" / "bin" / "edgetool"
    with tempfile.TemporaryDirectory() as tmp:
        for name in RECIPES:
            subprocess.run([str(edgetool if edgetool.exists() else "edgetool"), "bench", str(plain_recipe(name, Path(tmp))),
                            "--methods", METHODS, "--workers", str(workers), "--quiet", "--out", str(plain / name)],
                           check=True)


def rerun_seed(name: str, method: str, lr: float, seed_index: int) -> dict[str, float]:
    """Test F1 of one bench training run, plain and lean, on 1 and 2 threads."""
    import torch

    from toolchain.models.assembly import build_adapted, ensure_base_model
    from toolchain.data.protocol import load_data
    from toolchain.metrics import evaluate
    from toolchain.recipe import load_recipe
    from toolchain.stages.bench import method_configs, seed_data
    from toolchain.training.fit import fit, seed_everything

    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    mcfg, tcfg = method_configs(recipe, [method])[method]
    base_data = load_data(recipe.data, recipe.seed)
    base, head_name, _ = ensure_base_model(recipe, base_data, False, None)
    data = seed_data(recipe, seed_index, base_data)
    seed = recipe.seed + seed_index
    out = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for lean in (False, True):
                seed_everything(seed)
                model, adapted = build_adapted(mcfg, base, head_name, data)
                fit(model, adapted, data.target_train, tcfg.model_copy(update={"lr": lr, "lean_step": lean}), seed,
                    progress=False)
                out[f"{'lean' if lean else 'plain'}, {threads} thread{'s' if threads > 1 else ''}"] = \
                    evaluate(model, data.target_test)[0]
    finally:
        torch.set_num_threads(before)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run both sets of benches first (about 8 min on 2 cores)")
    ap.add_argument("--results", type=Path, default=REPO / "runs" / "bench", help="the lean-step benches (run_all.sh)")
    ap.add_argument("--plain", type=Path, default=REPO / "runs" / "bench-plain", help="the plain-autograd benches")
    ap.add_argument("--tolerance", type=float, default=0.01, help="per-seed F1 difference the invariant allows")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rerun", action="append", default=[], metavar="RECIPE,METHOD,SEED_INDEX",
                    help="also rerun this run, plain and lean, on 1 and 2 threads (repeatable)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from toolchain.artifacts import atomic_write_text

    if args.run:
        run_benches(args.results, args.plain, args.workers)
    lines = ["| recipe | method | lr lean / plain | mean F1 lean / plain | largest per-seed difference | seeds within "
             f"{args.tolerance:g} |", "|---|---|---|---|---|---|"]
    reruns = []
    rates = {}
    cells = within = 0
    for name in RECIPES:
        pair = []
        for where in (args.results, args.plain):
            path = where / name / "bench.json"
            if not path.is_file():
                print(f"lean_vs_plain: {path} is missing; pass --run", file=sys.stderr)
                return 2
            pair.append({r["method"]: r for r in json.loads(path.read_text())["rows"]})
        lean, plain = pair
        for method, a in lean.items():
            b = plain[method]
            rates[(name, method)] = a["lr"]
            diffs = [abs(x - y) for x, y in zip(a["f1_per_seed"], b["f1_per_seed"])]
            ok = sum(d <= args.tolerance for d in diffs)
            cells += len(diffs)
            within += ok
            lines.append(f"| {name} | {method} | {a['lr']:g} / {b['lr']:g} | {a['f1_mean']:.3f} / {b['f1_mean']:.3f} "
                         f"| {max(diffs):.3f} | {ok}/{len(diffs)} |")
            reruns += [(name, method, a["lr"], i) for i, d in enumerate(diffs) if d > args.tolerance and a["lr"] == b["lr"]]
    lines += ["", f"{within} of {cells} (recipe, method, seed) runs within {args.tolerance:g}."]
    for spec in args.rerun:
        try:
            name, method, index = spec.split(",")
            lr = rates[(name, method)]
            rerun = (name, method, lr, int(index))
        except (ValueError, KeyError):
            print(f"lean_vs_plain: --rerun {spec!r}: expected RECIPE,METHOD,SEED_INDEX of a compared run", file=sys.stderr)
            return 2
        if rerun not in reruns:
            reruns.append(rerun)
    for name, method, lr, i in reruns:
        f1 = rerun_seed(name, method, lr, i)
        lines.append(f"- {name}, {method}, seed index {i}, lr {lr:g}, rerun: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in f1.items()))
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.results / "lean-vs-plain.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wall time of the four shipped benches (benchmarks/run_all.sh) on the local process pool and on a local Ray,
side by side on this machine, plus a paper estimate of the time on N Ray nodes.

Runs alternate, local then Ray, `--rounds` times (A B A B ...), so slow drifts of a shared machine hit both;
the ratio quoted is the median of the per-round ratios Ray / local. Both executors get the same parallelism:
the local pool `--workers` processes, the local Ray as many CPUs as this machine has (one run per CPU), so
use --workers equal to this machine's CPU count. The bases are pretrained before the first timed run. The
figures of every run are compared with the first local run's (timings aside): they must be identical.

Estimate on N nodes of C CPUs each (a paper figure from one measured Ray run, not a measurement): the bench
is a sequence of batches (per recipe: the selection runs, then the reported runs), each waiting for the one
before. A batch of runs with times t_i (the `(… s)` of each `--quiet` line) takes at least max(t_i) and at
least sum(t_i) / (N x C); everything outside the batches (data, pretrained bases loaded, ONNX export,
evaluation, plots, a report run's one-off FLOPs, timing and fusion checks, Ray's start) is taken as serial and
equal to the measured wall time minus the batches' sum(t_i) / CPUs here. Shipping data to other nodes and
slower or faster nodes are not modelled.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/executor_overhead.py --rounds 2 --workers 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/executor_overhead.py --rounds 1 --seeds 1 --methods head,ttlora  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["bench-shift-resnet1d", "bench-shift-mobilenet1d", "bench-newclass-resnet1d", "bench-newclass-mobilenet1d"]
LINE = re.compile(r"^\[\d+/\d+\] (select|report) .* \((\d+(?:\.\d+)?) s\)$")
TIMING_KEYS = ("train_seconds", "wall_seconds", "seconds", "speedup_of_reference_seconds", "workers", "step_time_vs_full",
               "executor")


def edgetool() -> str:
    venv = REPO / ".venv" / "bin" / "edgetool"
    return str(venv) if venv.exists() else "edgetool"


def ensure_bases() -> None:
    """Pretrain the bases that are missing, untimed (else the first timed run would pay for them)."""
    sys.path.insert(0, str(REPO))
    from toolchain.recipe import load_recipe

    for name in RECIPES:
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        if not recipe.model.checkpoint.exists():
            subprocess.run([edgetool(), "pretrain", str(recipe.source), "--quiet"], check=True, cwd=REPO)


def run_once(executor: str, out: Path, args) -> tuple[float, list[str]]:
    env = {**os.environ, "EXECUTOR": executor, "OUT": str(out), "WORKERS": str(args.workers), "EDGETOOL": edgetool()}
    for key, value in (("SEEDS", args.seeds), ("METHODS", args.methods)):
        if value is not None:
            env[key] = str(value)
    began = time.perf_counter()
    done = subprocess.run([str(REPO / "benchmarks" / "run_all.sh")], env=env, cwd=REPO, check=True,
                          stdout=subprocess.PIPE, text=True)
    return time.perf_counter() - began, done.stdout.splitlines()


def batches(lines: list[str]) -> list[list[float]]:
    """The runs' seconds, per batch: a batch ends where the kind of line (select/report) or the recipe changes."""
    out: list[list[float]] = []
    kind = None
    for line in lines:
        m = LINE.match(line)
        if m is None:
            kind = None if line.startswith("-> ") else kind  # a recipe finished
            continue
        if m.group(1) != kind:
            out.append([])
            kind = m.group(1)
        out[-1].append(float(m.group(2)))
    return out


def estimate(wall: float, runs: list[list[float]], cpus_here: int, nodes: int, cpus_per_node: int) -> float:
    serial = wall - sum(sum(b) / cpus_here for b in runs)
    slots = nodes * cpus_per_node
    return max(serial, 0.0) + sum(max(max(b), sum(b) / slots) for b in runs)


def figures(value):
    if isinstance(value, dict):
        return {k: figures(v) for k, v in value.items() if not k.startswith(TIMING_KEYS)}
    if isinstance(value, list):
        return [figures(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="local/Ray pairs, alternated (default 2)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="local pool size (default: this machine's CPUs)")
    ap.add_argument("--seeds", type=int, help="override each recipe's bench.seeds (a smaller grid, for a smoke run)")
    ap.add_argument("--methods", help="override the methods (default: all nine)")
    ap.add_argument("--nodes", default="1,2,4,8,16", help="node counts for the estimate (default 1,2,4,8,16)")
    ap.add_argument("--cpus-per-node", type=int, default=8, help="CPUs per node for the estimate (default 8)")
    args = ap.parse_args()

    ensure_bases()
    walls: dict[str, list[float]] = {"local": [], "ray": []}
    ray_lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="executor-overhead-") as tmp:
        reference = None
        for round_ in range(args.rounds):
            for executor in ("local", "ray"):
                out = Path(tmp) / f"{executor}-{round_}"
                wall, lines = run_once(executor, out, args)
                walls[executor].append(wall)
                print(f"round {round_ + 1} {executor:5s} {wall:7.1f} s", flush=True)
                if executor == "ray":
                    ray_lines = lines
                got = {name: figures(json.loads((out / name / "bench.json").read_text())) for name in RECIPES}
                if reference is None:
                    reference = got
                elif got != reference:
                    sys.exit(f"executor_overhead: error: {executor} round {round_ + 1} gave other figures than local round 1")
    ratios = [r / l for l, r in zip(walls["local"], walls["ray"])]
    cpus_here = os.cpu_count() or 1
    print(f"\n{cpus_here} CPUs here; local pool --workers {args.workers}; local Ray sized to this machine")
    print("| executor | wall per round (s) | median (s) |\n|---|---|---|")
    for executor, values in walls.items():
        print(f"| {executor} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.median(values):.1f} |")
    print(f"\nRay / local wall time, per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.3f} (overhead {100 * (statistics.median(ratios) - 1):+.1f} %)")
    print("figures (timings aside) identical in every run: yes")

    runs = batches(ray_lines)
    wall = walls["ray"][-1]
    print(f"\nPaper estimate from the last Ray run ({sum(map(len, runs))} runs in {len(runs)} batches, {wall:.0f} s here; "
          f"serial part {max(wall - sum(sum(b) / cpus_here for b in runs), 0):.0f} s):")
    print(f"| nodes x {args.cpus_per_node} CPUs | estimated wall (s) |\n|---|---|")
    for nodes in (int(n) for n in args.nodes.split(",")):
        print(f"| {nodes} | {estimate(wall, runs, cpus_here, nodes, args.cpus_per_node):.0f} |")


if __name__ == "__main__":
    main()

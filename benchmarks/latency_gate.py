#!/usr/bin/env python3
"""Issue 17's latency gate: does `edgetool verify` ever FAIL two identical graphs under load, and does it
FAIL a fused graph that really is slower?

Builds, under --work (default runs/latency-gate):
  identical/  fuse-export of the embedded recipe adapted with a learning rate of 1e-30 for one step: the
              adapter update vanishes in float32, so fused.onnx is byte-for-byte original.onnx and verify
              needs no waiver (the script checks the bytes).
  slower/     a copy whose fused.onnx computes the same function with about --extra-compute more conv FLOPs
              (chosen convs split into two half-weight convs summed), verified with --allow-modified; its
              structure checks fail by design: only its latency verdicts are counted.
Then runs `edgetool verify DIR --engine onnxruntime --iterations N` --runs times on identical/ under each
--loads setting (that many bounded busy-loop processes, started before each verify and always killed after),
and --slow-runs times on slower/ without load. Counts pass / inconclusive / fail per case, per batch size and
per run (a run fails if any batch fails, else is inconclusive if any is), prints a markdown table and writes
it to <work>/latency-gate.md.

    .venv/bin/python benchmarks/latency_gate.py [--runs 30] [--slow-runs 10] [--iterations 20]
        [--loads 1,cores] [--extra-compute 0.2] [--work DIR]

The goal (docs/verify.md): 0 FAILs on identical graphs under every load; the slower graph FAILs in at least
9 of 10 quiet runs. Other processes on the machine are load too: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "basicmotions-ttlora.yaml"
BUSY_SECONDS = 3600  # a busy loop ends by itself after this, even if this script is killed outright
VERDICTS = ("pass", "inconclusive", "fail")


def edgetool(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    res = subprocess.run([sys.executable, "-c", "from toolchain.cli import main; main()", *args], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if check and res.returncode != 0:
        sys.exit(f"edgetool {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return res


def build_identical(work: Path) -> Path:
    """An engine dir whose fused.onnx is original.onnx, byte for byte, as fuse-export sealed it."""
    from toolchain.recipe import load_recipe

    eng = work / "identical"
    if (eng / "fuse_report.json").is_file():
        return eng
    data = load_recipe(RECIPE).resolved_dict()
    data["name"] = "latency-gate-identical"
    data["train"].update(lr=1e-30, steps=1, eval_every=1)  # an update below float32's resolution of the weights
    (work / "identical.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    edgetool("adapt", str(work / "identical.yaml"), "--out", str(work / "identical-run"))
    edgetool("fuse-export", str(work / "identical-run"), "--out", str(eng))
    for p in ("", ".fp16"):
        if (eng / f"original{p}.onnx").read_bytes() != (eng / f"fused{p}.onnx").read_bytes():
            sys.exit(f"{eng}: fused{p}.onnx differs from original{p}.onnx; the identical case needs equal files")
    return eng


def conv_flops(model: onnx.ModelProto) -> dict[str, float]:
    """Multiply-accumulates per sample of each Conv node (by name), from shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    flops = {}
    for n in model.graph.node:
        if n.op_type == "Conv" and n.output[0] in shapes and n.input[1] in inits:
            w, out = inits[n.input[1]], shapes[n.output[0]]
            flops[n.name] = float(np.prod(out[1:])) * float(np.prod(w[1:]))
    return flops


def build_slower(identical: Path, work: Path, extra: float) -> tuple[Path, float]:
    """A copy of `identical` whose fused.onnx has about `extra` more conv FLOPs and the same function."""
    eng = work / "slower"
    shutil.rmtree(eng, ignore_errors=True)
    shutil.copytree(identical, eng, ignore=shutil.ignore_patterns("verify_*"))
    model = onnx.load(str(eng / "fused.onnx"))
    flops = conv_flops(model)
    total, chosen, added = sum(flops.values()), set(), 0.0
    for name, f in sorted(flops.items(), key=lambda kv: -kv[1]):  # largest first, stop once `extra` is reached
        if added + f <= extra * total * 1.25:
            chosen.add(name)
            added += f
        if added >= extra * total:
            break
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        nodes.append(n)
        if n.name not in chosen:
            continue
        half = numpy_helper.to_array(inits[n.input[1]]) / 2
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(half, n.input[1]))
        model.graph.initializer.append(numpy_helper.from_array(half.copy(), n.input[1] + "__twin"))
        out = n.output[0]
        n.output[0] = out + "__a"
        twin = helper.make_node("Conv", [n.input[0], n.input[1] + "__twin"], [out + "__b"], name=n.name + "__twin")
        twin.attribute.extend(n.attribute)
        nodes += [twin, helper.make_node("Add", [out + "__a", out + "__b"], [out], name=n.name + "__sum")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(eng / "fused.onnx"))
    return eng, added / total


def start_busy(n: int) -> list[subprocess.Popen]:
    code = f"import time\nend = time.time() + {BUSY_SECONDS}\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def one_verify(eng: Path, iterations: int, busy: int, extra_args: tuple[str, ...] = ()) -> dict:
    procs = start_busy(busy)
    try:
        time.sleep(0.5 if busy else 0)  # let the loads get going
        res = edgetool("verify", str(eng), "--engine", "onnxruntime", "--iterations", str(iterations), *extra_args,
                       check=False)
    finally:
        stop_busy(procs)
    if res.returncode not in (0, 1):
        sys.exit(f"verify {eng} exited {res.returncode}: {res.stderr.strip()[-500:]}")
    r = json.loads((eng / "verify_report.json").read_text())
    per_batch = {b: v["verdict"] for b, v in r["latency_verdict"].items()}
    worst = "fail" if "fail" in per_batch.values() else ("inconclusive" if "inconclusive" in per_batch.values() else "pass")
    return {"exit": res.returncode, "batches": per_batch, "run": worst,
            "ratios": {b: v["ratio"] for b, v in r["latency_verdict"].items()},
            "failed_checks": r["failed_checks"]}


def table(rows: list[tuple[str, str, list[dict]]]) -> str:
    batches = sorted({b for _, _, results in rows for r in results for b in r["batches"]}, key=int)
    head = ["case", "load", "runs", "run: pass / inconclusive / fail"] + [
        f"batch {b}: pass / inc. / fail" for b in batches] + ["median fused/original ratios"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, load, results in rows:
        runs = Counter(r["run"] for r in results)
        cells = [case, load, str(len(results)), " / ".join(str(runs[v]) for v in VERDICTS)]
        for b in batches:
            c = Counter(r["batches"].get(b) for r in results)
            cells.append(" / ".join(str(c[v]) for v in VERDICTS))
        ratios = {b: np.median([r["ratios"][b] for r in results]) for b in batches}
        cells.append(", ".join(f"batch {b}: {x:.3f}" for b, x in ratios.items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="verifies of the identical graphs per load")
    ap.add_argument("--slow-runs", type=int, default=10, help="verifies of the slower graph, no load")
    ap.add_argument("--iterations", type=int, default=20, help="verify --iterations")
    ap.add_argument("--loads", default="1,cores", help="busy processes per identical-graph setting ('cores': one per "
                    "usable CPU; 0: none)")
    ap.add_argument("--extra-compute", type=float, default=0.2, help="extra conv FLOPs of the slower graph")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "latency-gate")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so the busy loops are killed (finally)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    loads = [cores if x.strip() == "cores" else int(x) for x in args.loads.split(",") if x.strip()]
    args.work.mkdir(parents=True, exist_ok=True)
    identical = build_identical(args.work)
    slower, added = build_slower(identical, args.work, args.extra_compute)
    print(f"identical: {identical} (fused.onnx == original.onnx); slower: {slower} (+{100 * added:.1f} % conv FLOPs)",
          flush=True)

    rows = []
    for busy in loads:
        results = []
        for i in range(args.runs):
            results.append(one_verify(identical, args.iterations, busy))
            print(f"identical, {busy} busy, run {i + 1}: {results[-1]['batches']} exit {results[-1]['exit']}", flush=True)
        rows.append(("identical graphs", f"{busy} busy process{'es' if busy != 1 else ''} on {cores} cores", results))
    results = []
    for i in range(args.slow_runs):
        results.append(one_verify(slower, args.iterations, 0, ("--allow-modified",)))
        print(f"slower, quiet, run {i + 1}: {results[-1]['batches']} ratios {results[-1]['ratios']}", flush=True)
    rows.append((f"fused +{100 * added:.0f} % conv FLOPs", f"no load started ({cores} cores)", results))

    cmd = " ".join(["benchmarks/latency_gate.py", f"--runs {args.runs}", f"--slow-runs {args.slow_runs}",
                    f"--iterations {args.iterations}", f"--loads {args.loads}", f"--extra-compute {args.extra_compute}"])
    text = f"`{cmd}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cores} usable CPUs\n\n{table(rows)}\n"
    (args.work / "latency-gate.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

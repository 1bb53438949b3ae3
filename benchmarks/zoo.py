#!/usr/bin/env python3
"""The model zoo: torchvision's classification architectures (random weights, 3 x 32 x 32 inputs, 4 classes)
through the CLI as a user runs it: `edgetool adapt` -> `edgetool fuse-export` -> `edgetool verify --engine
onnxruntime`, one architecture and method at a time, each in a fresh temporary directory (adapt pretrains
the random-weights base on the source images first). Prints a table
(arch, parameters, exit code of each stage, whether verify found the structures identical, seconds) and
writes it as Markdown with --md.

The architectures, the factory (`torchvision_zoo:build`) and the data are tests/torchvision_zoo.py's; needs
torchvision (the test extra). tests/test_torchvision_zoo.py runs a subset of the same pipeline in CI.

    .venv/bin/python benchmarks/zoo.py                               # every architecture, ttlora
    .venv/bin/python benchmarks/zoo.py --methods ttlora,lora,dora --archs resnet18,squeezenet1_1 --md zoo.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path[:0] = [str(REPO), str(TESTS)]
import torchvision_zoo  # noqa: E402
from toolchain.artifacts import atomic_write_text  # noqa: E402

STAGES = ("adapt", "fuse-export", "verify")


def run_stage(args: list[str], env: dict, log) -> int:
    cmd = [sys.executable, "-m", "toolchain.cli", *args]
    proc = subprocess.run(cmd, env=env, cwd=env["ZOO_DIR"], capture_output=True, text=True)
    log.write(f"$ edgetool {' '.join(args)}  -> exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n")
    return proc.returncode


def structure_identical(report_path: Path) -> str:
    """'yes' when every structure check verify made passed, 'NO' when one failed, '-' without a report."""
    if not report_path.is_file():
        return "-"
    checks = json.loads(report_path.read_text()).get("checks", [])
    structure = [c for c in checks if str(c.get("name", "")).startswith("structure")]
    if not structure:
        return "-"
    failed = [c["name"] for c in structure if not c.get("passed")]
    return "NO: " + ", ".join(failed) if failed else "yes"


def run_one(arch: str, method: str, workdir: Path, log) -> dict:
    data = torchvision_zoo.write_images(workdir / "images.npz")
    recipe = torchvision_zoo.recipe_dict(arch, data.name, "base.pt", method)
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "ZOO_DIR": str(workdir),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    row = {"arch": arch, "method": method,
           "params": sum(p.numel() for p in torchvision_zoo.build(arch).parameters())}
    start = time.perf_counter()
    commands = {"adapt": ["adapt", "recipe.yaml", "--out", "run", "--quiet"],
                "fuse-export": ["fuse-export", "run", "--out", "engine", "--trust-factory", "torchvision_zoo"],
                "verify": ["verify", "engine", "--engine", "onnxruntime", "--trust-factory", "torchvision_zoo"]}
    for stage in STAGES:
        rc = run_stage(commands[stage], env, log)
        row[stage] = rc
        if rc != 0:
            break
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["structure"] = structure_identical(workdir / "engine" / "verify_report.json")
    return row


def table(rows: list[dict]) -> str:
    lines = ["| arch | method | params | adapt | fuse-export | verify | structure identical | seconds |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        codes = [str(r.get(s, "-")) for s in STAGES]
        lines.append(f"| {r['arch']} | {r['method']} | {r['params'] / 1e6:.2f} M | {' | '.join(codes)} | "
                     f"{r['structure']} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(torchvision_zoo.ARCHS), help="comma-separated torchvision builders")
    ap.add_argument("--methods", default="ttlora", help="comma-separated methods (ttlora, lora, dora, ...)")
    ap.add_argument("--md", type=Path, help="also write the table here (Markdown)")
    ap.add_argument("--log", type=Path, help="every stage's output (default: a temporary file, named at the end)")
    args = ap.parse_args()
    rows = []
    log_path = args.log or Path(tempfile.mkstemp(prefix="zoo-", suffix=".log")[1])
    with open(log_path, "w") as log:
        for arch in args.archs.split(","):
            for method in args.methods.split(","):
                with tempfile.TemporaryDirectory(prefix=f"zoo-{arch}-") as tmp:
                    row = run_one(arch, method, Path(tmp), log)
                log.flush()
                rows.append(row)
                print(f"{arch} {method}: adapt {row.get('adapt')} fuse-export {row.get('fuse-export', '-')} "
                      f"verify {row.get('verify', '-')} structure {row['structure']} ({row['seconds']} s)", flush=True)
    text = table(rows)
    print(text)
    print(f"stage output: {log_path}")
    if args.md:
        atomic_write_text(args.md, text + "\n")
    return 0 if all(r.get("verify") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

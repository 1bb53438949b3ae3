"""scripts/min_constraints.py: the minimum-versions job's pins come from pyproject's floors, and a
dependency without a floor (or a stale --skip) is an error, not a silent gap."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="min_constraints.py reads pyproject.toml with tomllib (Python 3.11+)")
from packaging.version import Version  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "min_constraints.py"
_spec = importlib.util.spec_from_file_location("min_constraints", SCRIPT)
mc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mc)

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Floors below these are known broken (README/pyproject say why): verify imports Polygraphy's
# SimpleCompareFunc (0.53.4+); onnxconverter-common 1.14 pins protobuf==3.20.2, which current onnx and
# onnxruntime releases cannot use. The minimum-versions job would not notice the second.
KNOWN_MINIMUMS = {"polygraphy": "0.53.4", "onnxconverter-common": "1.15"}


def pins(*args: str) -> dict[str, str]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(line.split("==") for line in done.stdout.split())


def test_pins_are_pyprojects_floors_for_the_min_job_selection():
    got = pins("--extra", "onnxruntime", "--extra", "test", "--skip", "torch", "--skip", "torchvision", "--skip", "peft",
               "--skip", "galore-torch")
    declared = {r.split(">=")[0]: r.split(">=")[1] for r in PROJECT["dependencies"] if not r.startswith("torch")}
    assert {k: v for k, v in got.items() if k in declared} == declared
    assert got["onnxruntime"] == PROJECT["optional-dependencies"]["onnxruntime"][0].split(">=")[1]
    assert "pytest" in got and not {"torch", "torchvision", "peft", "galore-torch"} & set(got)


@pytest.mark.parametrize("name, minimum", sorted(KNOWN_MINIMUMS.items()))
def test_floors_are_not_below_known_broken_versions(name, minimum):
    assert Version(pins()[name]) >= Version(minimum)


def test_a_dependency_without_floor_is_an_error():
    with pytest.raises(mc.FloorError, match="'onnx' has no lower bound"):
        mc.floor_pins({"dependencies": ["numpy>=1.26", "onnx"]}, [], [])
    with pytest.raises(mc.FloorError, match="more than one lower bound"):
        mc.floor_pins({"dependencies": ["onnx>=1.16,>=1.17"]}, [], [])


def test_upper_bounds_and_extras_of_requirements_are_kept_apart():
    assert mc.floor_pins({"dependencies": ["torch>=2.1.0a0,<3", "uvicorn[standard]>=0.20"]}, [], []) == [
        "torch==2.1.0a0", "uvicorn[standard]==0.20"]


@pytest.mark.parametrize("args, message", [
    (["--extra", "nope"], "unknown extra(s) nope"),
    (["--skip", "not-a-dependency"], "--skip not-a-dependency: not among the selected requirements"),
])
def test_bad_arguments_are_one_line_exit_2(args, message):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr

#!/usr/bin/env python3
"""The decisions of scripts/install.sh, as a plan computed from facts (standard library only).

    install_plan.py [--test] [--venv DIR] [--python PY]   gather the facts, print the plan
    install_plan.py --probe                               print this interpreter's package facts (JSON)
    install_plan.py --print-torch-pin                     the CPU torch pin used off a Jetson

The plan is printed one step per line: `# ...` a header, `note: ...` information, `run: ...` a
shell-quoted command. A plan that cannot be carried out prints one line `install: error: ...` on
stderr and exits 2. `make_plan(facts)` is pure; `gather_facts()` is the only part that looks at the
machine. EDGETOOL_TEGRA_RELEASE overrides the Jetson marker file (/etc/nv_tegra_release) for tests."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The CPU build, installed before edgetool off a Jetson so pyproject's wide torch range never pulls a
# CUDA build. (Where pip finds it depends on the machine's pip configuration.)
TORCH_PIN = "torch==2.13.0"
# pyproject's range: torch>=2.1.0a0,<3 (release parts only; the a0 admits NVIDIA's pre-release tags).
TORCH_MIN, TORCH_BELOW = (2, 1, 0), (3,)
TEGRA_RELEASE = "/etc/nv_tegra_release"
MODES = ("demo", "test")


@dataclass(frozen=True)
class Facts:
    mode: str = "demo"                  # "demo": runtime dependencies; "test": + the test extras
    tegra_release: str | None = None    # first line of the Jetson marker file; None: not a Jetson
    arch: str = "x86_64"
    python: str = "python3"             # the interpreter that makes the venv
    venv: str = ".venv"
    venv_exists: bool = False
    venv_system_site: bool = False      # the existing venv's include-system-site-packages
    # What the venv sees (for a venv still to be made on a Jetson: what the system interpreter sees).
    torch_version: str | None = None    # None: `import torch` fails or no torch
    torch_error: str | None = None      # first line of the import error when torch is installed but broken
    torch_numpy_ok: bool | None = None  # torch.from_numpy works with the installed numpy; None: not tried
    numpy_version: str | None = None
    ort_dists: tuple[str, ...] = ()     # installed distributions that provide the `onnxruntime` module
    tensorrt_version: str | None = None


@dataclass
class Plan:
    header: str = ""
    notes: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    error: str | None = None

    def lines(self) -> list[str]:
        return ([f"# {self.header}"] + [f"note: {n}" for n in self.notes]
                + [f"run: {shlex.join(c)}" for c in self.commands])


def release(version: str) -> tuple[int, ...]:
    """(2, 5, 0) for '2.5.0a0+nv24.08': the release segment, enough to compare against the range."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def is_nvidia_build(torch_version: str) -> bool:
    """NVIDIA's JetPack/NGC wheels carry `nvYY.MM` in the local version: 2.5.0a0+872d972e41.nv24.08."""
    return re.search(r"(?:^|\.)nv\d", torch_version.partition("+")[2]) is not None


def numpy_major(version: str | None) -> int | None:
    r = release(version or "")
    return r[0] if r else None


def needs_numpy1(f: Facts) -> str | None:
    """Why the kept torch needs numpy<2, or None. Only for a torch that is kept, not one this plan installs."""
    v = f.torch_version
    if v is None:
        return None
    on_numpy2 = (numpy_major(f.numpy_version) or 0) >= 2
    if on_numpy2 and f.torch_numpy_ok is False:
        return f"torch {v} cannot use the installed numpy {f.numpy_version} (a NumPy 1 build)"
    if on_numpy2 and f.torch_numpy_ok:
        return None  # proven to work with NumPy 2
    if release(v) < (2, 3):
        return f"torch {v} predates NumPy 2 support (torch 2.3)"
    if is_nvidia_build(v):
        return f"torch {v} is an NVIDIA build compiled against NumPy 1"
    return None


def make_plan(f: Facts) -> Plan:
    jetson = f.tegra_release is not None
    plan = Plan(header=(f"Jetson ({f.tegra_release or TEGRA_RELEASE})" if jetson else "not a Jetson")
                + f", {f.arch}, mode {f.mode}: "
                + ("runtime dependencies" if f.mode == "demo" else "runtime + test dependencies"))
    if f.mode not in MODES:
        plan.error = f"unknown mode {f.mode!r} (expected one of {', '.join(MODES)})"
        return plan
    vpy = str(Path(f.venv) / "bin" / "python")
    pip = [vpy, "-m", "pip", "install", "-q", "--disable-pip-version-check"]

    # --- the venv
    if not f.venv_exists:
        # On a Jetson the venv must see JetPack's TensorRT (python3-libnvinfer) and NVIDIA's torch.
        plan.commands.append([f.python, "-m", "venv", *(["--system-site-packages"] if jetson else []), f.venv])
    elif jetson and not f.venv_system_site:
        plan.error = (f"{f.venv} was made without --system-site-packages, so JetPack's TensorRT and torch are "
                      f"invisible in it: remove it (rm -rf {f.venv}) and run again")
        return plan

    # --- torch
    pins: list[str] = []
    keep_torch = f.torch_version is not None
    if jetson:
        if f.torch_version is None:
            why = f" (`import torch` fails: {f.torch_error})" if f.torch_error else ""
            plan.error = (f"no importable torch on this Jetson{why}: install NVIDIA's JetPack torch wheel first "
                          "(README, 'JetPack 6'), then run again; a PyPI torch is not a JetPack build")
            return plan
        if not (TORCH_MIN <= release(f.torch_version) < TORCH_BELOW):
            plan.error = (f"torch {f.torch_version} is outside edgetool's range >=2.1,<3: install NVIDIA's "
                          "JetPack 6 torch wheel (2.1 or newer), then run again")
            return plan
        plan.notes.append(f"torch {f.torch_version} kept (JetPack's; no PyPI torch is installed on a Jetson)")
        # Pinned to itself so no dependency's resolution can replace it with a PyPI build.
        pins.append(f"torch=={f.torch_version}")
    elif keep_torch:
        plan.notes.append(f"torch {f.torch_version} kept")
        if f.mode == "test":
            # torchvision (a test extra) requires one torch release exactly: pinned, pip picks the torchvision
            # that pairs with this torch instead of replacing torch with the newest torchvision's.
            pins.append(f"torch=={f.torch_version}")
    else:
        if f.arch not in ("x86_64", "AMD64"):
            plan.notes.append(f"{f.arch} without {TEGRA_RELEASE}: not treated as a Jetson; installing PyPI's "
                              f"{TORCH_PIN} (on a Jetson that file comes with JetPack)")
        plan.commands.append(pip + [TORCH_PIN])
        if f.mode == "test":
            pins.append(TORCH_PIN)  # as above: torchvision pairs with this torch

    # --- numpy
    if keep_torch:
        why = needs_numpy1(f)
        if why:
            pins.append("numpy<2")
            plan.notes.append(f"numpy<2: {why}")

    # --- ONNX Runtime: any installed provider of the `onnxruntime` module is kept.
    extras = ["test"] if f.mode == "test" else []
    others = [d for d in f.ort_dists if d.lower() != "onnxruntime"]
    if others:
        plan.notes.append(f"{', '.join(others)} kept (not replaced by the CPU onnxruntime)")
        if len(others) < len(f.ort_dists):
            plan.notes.append(f"both onnxruntime and {', '.join(others)} are installed and share one module: "
                              f"the CPU one may have overwritten the GPU build; to restore it: pip uninstall -y "
                              f"onnxruntime {' '.join(others)}, then reinstall {others[0]}")
    else:
        extras.append("onnxruntime")  # none installed, or the CPU one (the extra keeps it at its floor)
        if jetson and not f.ort_dists:
            plan.notes.append("installing PyPI's onnxruntime (CPU only); for its CUDA provider install a JetPack "
                              "onnxruntime-gpu wheel first, and this script keeps it")

    if jetson:
        plan.notes.append(f"TensorRT {f.tensorrt_version} (JetPack)" if f.tensorrt_version else
                          "TensorRT's Python module is not importable: sudo apt install python3-libnvinfer "
                          "(until then `verify --engine auto` uses ONNX Runtime)")

    plan.commands.append(pip + ["-e", f".[{','.join(extras)}]" if extras else "."] + pins)
    return plan


# ------------------------------------------------------------------------------------ facts (impure)

def probe() -> dict:
    """This interpreter's package facts (runs inside the venv, or the system Python on a Jetson)."""
    import importlib.metadata as md

    out: dict = {"torch_version": None, "torch_error": None, "torch_numpy_ok": None, "numpy_version": None,
                 "ort_dists": [], "tensorrt_version": None}
    try:
        out["numpy_version"] = md.version("numpy")
    except md.PackageNotFoundError:
        pass
    out["ort_dists"] = sorted(set(md.packages_distributions().get("onnxruntime", [])))
    try:
        import torch

        out["torch_version"] = str(torch.__version__)
    except Exception as exc:  # ImportError, OSError (missing CUDA libraries), ...
        try:
            md.version("torch")
            out["torch_error"] = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        except md.PackageNotFoundError:
            pass
    else:
        if out["numpy_version"]:
            try:
                import numpy

                torch.from_numpy(numpy.zeros(1))
                out["torch_numpy_ok"] = True
            except Exception:  # "Numpy is not available": torch built against another NumPy ABI
                out["torch_numpy_ok"] = False
    try:
        import tensorrt

        out["tensorrt_version"] = str(tensorrt.__version__)
    except Exception:
        pass
    return out


def venv_system_site(venv: Path) -> bool:
    try:
        text = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return False
    m = re.search(r"^\s*include-system-site-packages\s*=\s*(\S+)", text, re.M)
    return bool(m) and m.group(1).lower() == "true"


def gather_facts(mode: str, venv: str, python: str) -> Facts:
    tegra = Path(os.environ.get("EDGETOOL_TEGRA_RELEASE") or TEGRA_RELEASE)
    tegra_release = None
    if tegra.is_file():
        try:
            lines = tegra.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        # "# R36 (release), REVISION: 3.0, GCID: ..., BOARD: ..." -> "L4T R36 (release), REVISION: 3.0"
        first = lines[0].lstrip("# ").split(", GCID")[0].strip() if lines else ""
        tegra_release = f"L4T {first}" if first else ""
    vpy = Path(venv) / "bin" / "python"
    exists = vpy.exists()
    # Who answers for the packages: the existing venv; for a venv still to be made on a Jetson, the system
    # interpreter (the venv will see its site-packages); otherwise a new venv starts empty.
    probe_py = str(vpy) if exists else (python if tegra_release is not None else None)
    pkg: dict = {}
    if probe_py:
        try:
            done = subprocess.run([probe_py, __file__, "--probe"], capture_output=True, text=True, timeout=300)
            pkg = json.loads(done.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            raise SystemExit(f"install: error: cannot ask {probe_py} which packages it has") from None
    return Facts(mode=mode, tegra_release=tegra_release, arch=platform.machine(), python=python, venv=venv,
                 venv_exists=exists, venv_system_site=exists and venv_system_site(Path(venv)),
                 torch_version=pkg.get("torch_version"), torch_error=pkg.get("torch_error"),
                 torch_numpy_ok=pkg.get("torch_numpy_ok"), numpy_version=pkg.get("numpy_version"),
                 ort_dists=tuple(pkg.get("ort_dists", ())), tensorrt_version=pkg.get("tensorrt_version"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plan edgetool's installation (see scripts/install.sh).")
    parser.add_argument("--test", action="store_true", help="also install the test extras")
    parser.add_argument("--venv", default=".venv")
    parser.add_argument("--python", default="python3", help="the interpreter that makes the venv")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--print-torch-pin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.print_torch_pin:
        print(TORCH_PIN)
        return 0
    plan = make_plan(gather_facts("test" if args.test else "demo", args.venv, args.python))
    if plan.error:
        print(f"install: error: {plan.error}", file=sys.stderr)
        return 2
    print("\n".join(plan.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

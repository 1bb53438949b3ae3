"""scripts/install.sh and its planner (scripts/install_plan.py): Jetson detection, the venv flags, torch
(CPU pin off a Jetson, never a PyPI torch on one), numpy<2 where the torch build needs it, ONNX Runtime
(an installed onnxruntime-gpu is kept), runtime vs test extras. The planner is tested on facts; install.sh
end to end with --dry-run, a fake /etc/nv_tegra_release and fake interpreters whose site-packages hold
stand-in torch/numpy/onnxruntime-gpu/tensorrt packages (so the planner's probe really runs)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL_SH = REPO / "scripts" / "install.sh"

_spec = importlib.util.spec_from_file_location("install_plan", REPO / "scripts" / "install_plan.py")
ip = importlib.util.module_from_spec(_spec)
sys.modules["install_plan"] = ip  # dataclasses look their module up there
_spec.loader.exec_module(ip)

NV_TORCH = "2.5.0a0+872d972e41.nv24.08"  # JetPack 6's NVIDIA wheel, a NumPy 1 build
L4T = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024"


def jetson(**kw) -> ip.Facts:
    base = dict(tegra_release="L4T R36 (release), REVISION: 4.0", arch="aarch64", torch_version=NV_TORCH,
                torch_numpy_ok=True, numpy_version="1.26.4")
    return ip.Facts(**{**base, **kw})


def pip_installs(plan: ip.Plan) -> list[list[str]]:
    """The arguments after `pip install` of each pip command, options dropped."""
    out = []
    for cmd in plan.commands:
        if cmd[1:4] == ["-m", "pip", "install"]:
            out.append([a for a in cmd[4:] if not a.startswith("-q") and a != "--disable-pip-version-check"])
    return out


def torch_requirements(plan: ip.Plan) -> list[str]:
    return [a for args in pip_installs(plan) for a in args if a.split("=")[0].split("<")[0] == "torch"]


# ---------------------------------------------------------------------------------------------- planner


def test_x86_fresh_demo_installs_cpu_torch_first_then_runtime_with_onnxruntime():
    plan = ip.make_plan(ip.Facts(mode="demo", arch="x86_64"))
    assert plan.error is None
    assert plan.commands[0] == ["python3", "-m", "venv", ".venv"]  # no --system-site-packages off a Jetson
    assert pip_installs(plan) == [[ip.TORCH_PIN], ["-e", ".[onnxruntime]"]]


def test_x86_test_mode_adds_the_test_extras_with_torch_pinned():
    # The test extras hold torchvision, whose releases each require one torch release: torch stays pinned
    # so pip pairs torchvision with it rather than replacing torch (a CPU build) with another.
    plan = ip.make_plan(ip.Facts(mode="test"))
    assert pip_installs(plan) == [[ip.TORCH_PIN], ["-e", ".[test,onnxruntime]", ip.TORCH_PIN]]
    kept = ip.make_plan(ip.Facts(mode="test", venv_exists=True, torch_version="2.13.0+cpu", numpy_version="2.4.6",
                                 torch_numpy_ok=True, ort_dists=("onnxruntime",)))
    assert pip_installs(kept) == [["-e", ".[test,onnxruntime]", "torch==2.13.0+cpu"]]


def test_x86_existing_torch_is_kept_and_no_numpy_pin():
    plan = ip.make_plan(ip.Facts(venv_exists=True, torch_version="2.13.0+cpu", numpy_version="2.4.6",
                                 torch_numpy_ok=True, ort_dists=("onnxruntime",)))
    assert plan.error is None and len(plan.commands) == 1  # the venv exists: no venv command
    assert torch_requirements(plan) == [] and pip_installs(plan) == [["-e", ".[onnxruntime]"]]


def test_jetson_fresh_venv_sees_system_site_packages_and_keeps_jetpack_torch():
    plan = ip.make_plan(jetson(python="/usr/bin/python3"))
    assert plan.error is None
    assert plan.commands[0] == ["/usr/bin/python3", "-m", "venv", "--system-site-packages", ".venv"]
    # No PyPI torch: the only torch requirement pins the JetPack build to itself.
    assert torch_requirements(plan) == [f"torch=={NV_TORCH}"]
    assert ip.TORCH_PIN not in [a for args in pip_installs(plan) for a in args]
    assert any("no PyPI torch" in n for n in plan.notes)


@pytest.mark.parametrize("mode, extras", [("demo", ".[onnxruntime]"), ("test", ".[test,onnxruntime]")])
def test_jetson_demo_vs_test_mode(mode, extras):
    plan = ip.make_plan(jetson(mode=mode))
    assert pip_installs(plan) == [["-e", extras, f"torch=={NV_TORCH}", "numpy<2"]]


def test_jetson_without_torch_stops_with_one_line_naming_the_jetpack_wheel():
    plan = ip.make_plan(jetson(torch_version=None, numpy_version=None))
    assert plan.commands == [] or all("pip" not in c for c in plan.commands)
    assert "install NVIDIA's JetPack torch wheel first" in plan.error and "\n" not in plan.error


def test_jetson_broken_torch_import_is_named_and_not_replaced():
    plan = ip.make_plan(jetson(torch_version=None, torch_error="libcudnn.so.9: cannot open shared object file"))
    assert "libcudnn.so.9" in plan.error and "JetPack torch wheel" in plan.error


def test_jetson_torch_outside_the_range_stops():
    plan = ip.make_plan(jetson(torch_version="2.0.0+nv23.05"))
    assert plan.error and "outside edgetool's range" in plan.error


def test_jetson_existing_venv_without_system_site_packages_stops():
    plan = ip.make_plan(jetson(venv_exists=True, venv_system_site=False))
    assert plan.error and "rm -rf .venv" in plan.error
    ok = ip.make_plan(jetson(venv_exists=True, venv_system_site=True))
    assert ok.error is None and not any("venv" in c[1:3] for c in ok.commands)


@pytest.mark.parametrize("facts", [jetson(ort_dists=("onnxruntime-gpu",)),
                                   ip.Facts(venv_exists=True, torch_version="2.13.0", ort_dists=("onnxruntime-gpu",))],
                         ids=["jetson", "x86"])
def test_onnxruntime_gpu_is_kept(facts):
    plan = ip.make_plan(facts)
    (install,) = [args for args in pip_installs(plan) if "-e" in args]
    assert install[1] == "." and not any("onnxruntime" in a for a in install)
    assert any("onnxruntime-gpu kept" in n for n in plan.notes)


def test_both_onnxruntime_packages_installed_is_flagged():
    plan = ip.make_plan(jetson(ort_dists=("onnxruntime", "onnxruntime-gpu")))
    assert any("share one module" in n and "pip uninstall -y onnxruntime onnxruntime-gpu" in n for n in plan.notes)
    assert not any("onnxruntime" in a for a in pip_installs(plan)[-1])


@pytest.mark.parametrize("torch_version, numpy_version, numpy_ok, pinned", [
    (NV_TORCH, "1.26.4", True, True),           # NVIDIA build on NumPy 1: numpy 2 unproven, pin
    (NV_TORCH, "2.1.0", False, True),           # NVIDIA build already broken by NumPy 2: pin (downgrade)
    ("2.8.0a0+nv25.06", "2.2.0", True, False),  # proven to work with NumPy 2: no pin
    (NV_TORCH, None, None, True),               # no numpy yet: pip would pick 2.x, pin
    ("2.2.2", "1.26.4", True, True),            # before torch 2.3 no build supports NumPy 2
    ("2.4.0", "2.0.0", False, True),            # any build that fails with the installed NumPy 2
    ("2.13.0+cpu", "2.4.6", True, False),
    ("2.13.0+cpu", None, None, False),
])
def test_numpy_pin_where_the_torch_build_needs_it(torch_version, numpy_version, numpy_ok, pinned):
    facts = jetson(torch_version=torch_version, numpy_version=numpy_version, torch_numpy_ok=numpy_ok)
    plan = ip.make_plan(facts)
    assert plan.error is None
    assert ("numpy<2" in pip_installs(plan)[-1]) == pinned
    assert any(n.startswith("numpy<2") for n in plan.notes) == pinned


def test_numpy_is_not_pinned_for_the_torch_this_plan_installs():
    plan = ip.make_plan(ip.Facts(numpy_version="2.4.6"))
    assert not any("numpy" in a for args in pip_installs(plan) for a in args)


def test_aarch64_off_jetson_says_so():
    plan = ip.make_plan(ip.Facts(arch="aarch64"))
    assert torch_requirements(plan) == [ip.TORCH_PIN]
    assert any("not treated as a Jetson" in n for n in plan.notes)


def test_jetson_tensorrt_note():
    assert any("TensorRT 10.3.0" in n for n in ip.make_plan(jetson(tensorrt_version="10.3.0")).notes)
    assert any("sudo apt install python3-libnvinfer" in n for n in ip.make_plan(jetson()).notes)


def test_unknown_mode_is_an_error():
    assert "unknown mode" in ip.make_plan(ip.Facts(mode="all")).error


@pytest.mark.parametrize("version, rel, nvidia", [
    (NV_TORCH, (2, 5, 0), True), ("2.1.0a0+41361538.nv23.06", (2, 1, 0), True), ("2.13.0+cpu", (2, 13, 0), False),
    ("2.4.0+cu124", (2, 4, 0), False), ("2.3.0a0+ebedce2", (2, 3, 0), False),
])
def test_version_parsing(version, rel, nvidia):
    assert ip.release(version) == rel and ip.is_nvidia_build(version) == nvidia


# ---------------------------------------------------------------------------------------------- install.sh


def fake_python(root: Path, *, system_site: bool = False, torch: str | None = None, numpy: str | None = None,
                ort_gpu: str | None = None, tensorrt: str | None = None) -> Path:
    """A venv (no pip) whose site-packages hold stand-ins for the named packages: a torch whose from_numpy
    fails under NumPy 2 like NVIDIA's NumPy 1 builds, a numpy, onnxruntime-gpu, tensorrt."""
    venv.create(root, system_site_packages=system_site, with_pip=False, symlinks=True)
    (site,) = (root / "lib").glob("python3*/site-packages")

    def package(dist: str, module: str, version: str, code: str = "") -> None:
        (site / module).mkdir()
        (site / module / "__init__.py").write_text(f"__version__ = {version!r}\n{code}")
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "top_level.txt").write_text(module + "\n")

    if numpy:
        package("numpy", "numpy", numpy, "def zeros(n):\n    return [0.0] * n\n")
    if torch:
        package("torch", "torch", torch, "import numpy\n\ndef from_numpy(a):\n"
                "    if int(numpy.__version__.split('.')[0]) >= 2:\n        raise RuntimeError('Numpy is not available')\n"
                "    return a\n")
    if ort_gpu:
        package("onnxruntime-gpu", "onnxruntime", ort_gpu)
    if tensorrt:
        package("tensorrt", "tensorrt", tensorrt)
    return root / "bin" / "python"


def run_install(tmp_path: Path, *args: str, tegra: bool, **env: str) -> subprocess.CompletedProcess:
    marker = tmp_path / "nv_tegra_release"
    if tegra:
        marker.write_text(L4T + "\n")
    full = {**os.environ, "EDGETOOL_TEGRA_RELEASE": str(marker), "VENV": str(tmp_path / "venv"), **env}
    full.pop("EDGETOOL_INSTALL_DRY_RUN", None) if "EDGETOOL_INSTALL_DRY_RUN" not in env else None
    return subprocess.run(["bash", str(INSTALL_SH), *args], capture_output=True, text=True, env=full, timeout=120)


def commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[len("run: "):]) for line in stdout.splitlines() if line.startswith("run: ")]


@pytest.mark.parametrize("args, extras", [(["--dry-run"], ".[onnxruntime]"), (["--test", "--dry-run"], ".[test,onnxruntime]")],
                         ids=["demo", "test"])
def test_install_sh_x86_dry_run(tmp_path, args, extras):
    done = run_install(tmp_path, *args, tegra=False, PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# not a Jetson")
    cmds = commands(done.stdout)
    assert cmds[0] == [sys.executable, "-m", "venv", str(tmp_path / "venv")]
    pins = [ip.TORCH_PIN] if "test" in extras else []
    assert cmds[1][-1] == ip.TORCH_PIN and cmds[2][-2 - len(pins):] == ["-e", extras, *pins]
    assert not (tmp_path / "venv").exists()  # a dry run runs nothing


def test_install_sh_detects_jetson_and_plans_from_the_system_python(tmp_path):
    system = fake_python(tmp_path / "system", torch=NV_TORCH, numpy="1.21.5", ort_gpu="1.19.0", tensorrt="10.3.0")
    done = run_install(tmp_path, tegra=True, PYTHON=str(system), EDGETOOL_INSTALL_DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("# Jetson (L4T R36 (release), REVISION: 4.0)")
    cmds = commands(out)
    assert cmds[0] == [str(system), "-m", "venv", "--system-site-packages", str(tmp_path / "venv")]
    assert cmds[1][-4:] == ["-e", ".", f"torch=={NV_TORCH}", "numpy<2"]  # onnxruntime-gpu kept: no extra
    assert len(cmds) == 2 and ip.TORCH_PIN not in out
    assert "onnxruntime-gpu kept" in out and "TensorRT 10.3.0" in out
    assert not (tmp_path / "venv").exists()


def test_install_sh_jetson_existing_venv_is_probed(tmp_path):
    """The venv's own packages decide: NumPy 2 already there breaks the NVIDIA torch, so numpy<2 is pinned."""
    fake_python(tmp_path / "venv", system_site=True, torch=NV_TORCH, numpy="2.1.0")
    done = run_install(tmp_path, "--test", "--dry-run", tegra=True, PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    assert "cannot use the installed numpy 2.1.0" in done.stdout
    (cmd,) = commands(done.stdout)
    assert cmd[0] == str(tmp_path / "venv" / "bin" / "python")
    assert cmd[-4:] == ["-e", ".[test,onnxruntime]", f"torch=={NV_TORCH}", "numpy<2"]


def test_install_sh_jetson_without_torch_is_one_line_exit_2(tmp_path):
    system = fake_python(tmp_path / "system", numpy="1.21.5")
    done = run_install(tmp_path, tegra=True, PYTHON=str(system))  # not a dry run: must stop before doing anything
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("install: error: no importable torch on this Jetson")
    assert not (tmp_path / "venv").exists()


def test_install_sh_jetson_venv_without_system_site_packages_stops(tmp_path):
    fake_python(tmp_path / "venv", system_site=False, torch=NV_TORCH, numpy="1.26.4")
    done = run_install(tmp_path, tegra=True, PYTHON=sys.executable)
    assert done.returncode == 2 and "rm -rf" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, env, message", [
    (["--bogus"], {}, "unknown argument '--bogus'"),
    ([], {"PYTHON": "/nonexistent/python3"}, "cannot be used: edgetool needs Python 3.10 or newer"),
    ([], {"PYTHON": "OLD"}, "Python 3.8 from"),
])
def test_install_sh_bad_input_is_one_line_exit_2(tmp_path, args, env, message):
    if env.get("PYTHON") == "OLD":  # an interpreter that reports 3.8 and fails the version check
        old = tmp_path / "python3.8"
        old.write_text("#!/bin/sh\necho 3.8\nexit 1\n")
        old.chmod(0o755)
        env = {"PYTHON": str(old)}
    done = run_install(tmp_path, *args, tegra=False, **env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr

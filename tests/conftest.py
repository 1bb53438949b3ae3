"""Shared fixtures: tiny recipes on the embedded data, so the whole suite stays fast on 2 CPU cores."""

from __future__ import annotations

import importlib
import json
import importlib.metadata
from pathlib import Path

import pytest
import torch
import yaml

from toolchain.errors import first_line
from toolchain.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread: torch's default pool oversubscribes small CI machines under load, and numeric
# results must not depend on the thread count.
torch.set_num_threads(1)


def import_test_dependency(module: str, dist: str, why: str):
    """`import module` for tests that need a test extra. Not installed: the test module skips, saying so.
    Installed but failing to import: the run fails, loudly. A skip there would hide every test that needs it
    (torchvision's CUDA wheel next to a CPU torch once broke `import peft`, through transformers, and the 22
    PEFT cross-checks skipped as if peft were simply not installed)."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{why} ({dist} is not installed: pip install -e .[test])", allow_module_level=True)
    try:
        return importlib.import_module(module)
    except Exception as exc:  # an installed test dependency that cannot import is a broken environment
        pytest.fail(f"{dist} {version} is installed but `import {module}` fails: {type(exc).__name__}: "
                    f"{first_line(exc)}", pytrace=False)


# torchvision first, before anything else imports it (transformers does, under peft): where its compiled ops
# cannot load next to a CPU torch, torchvision_zoo.import_torchvision still imports it (see that module). An
# installed torchvision that cannot import stops the whole run here.
try:
    importlib.metadata.version("torchvision")
except importlib.metadata.PackageNotFoundError:
    pass
else:
    from torchvision_zoo import import_torchvision

    import_torchvision()


def cli(*args):
    """`edgetool ARGS...` in-process; an unexpected exception propagates (a traceback is a test failure)."""
    from click.testing import CliRunner

    from toolchain.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def adapt_fuse_verify(recipe: Path, tmp_path: Path, trust_factory: str) -> dict:
    """adapt -> fuse-export -> verify --engine onnxruntime from the CLI, each exit 0, every structure check
    passed; verify's report. `trust_factory`: the user's own factory module, trusted here as fuse-export and
    verify require for a run directory that names a factory."""
    result = cli("adapt", recipe, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    result = cli("fuse-export", tmp_path / "run", "--out", tmp_path / "engine", "--trust-factory", trust_factory)
    assert result.exit_code == 0, result.output
    result = cli("verify", tmp_path / "engine", "--engine", "onnxruntime", "--trust-factory", trust_factory)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "engine" / "verify_report.json").read_text())
    structure = [c for c in report["checks"] if c["name"].startswith("structure.")]
    assert structure and all(c["passed"] for c in structure), structure
    return report


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2 with exactly one `edgetool: error: ...` line on stderr containing every needle; returns it."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgetool: error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tiny_recipe_dict(checkpoint: Path, **overrides) -> dict:
    """The embedded default protocol, shrunk: width-8 backbone, short pretrain and adaptation."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "data": {"format": "basicmotions", "shift": {"rotation_deg": 100, "gain": 0.2, "offset": 0.3, "noise": 0.1, "seed": 7},
                 "target_shots": 3},
        "model": {"arch": "resnet1d", "width": 8, "checkpoint": str(checkpoint)},
        "pretrain": {"steps": 60, "lr": 0.01, "batch_size": 16},
        "method": {"name": "ttlora", "rank": 2},
        "train": {"steps": 20, "lr": 0.01, "batch_size": 12, "eval_every": 5},
        # Time floors off: tests check the timing machinery, not speed, and report exactly `iterations` rounds.
        "verify": {"iterations": 20, "warmup": 3, "batch_sizes": [1, 8], "warmup_seconds": 0, "min_seconds": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A pretrained width-8 ResNet1d base on BasicMotions (made once per test session)."""
    from toolchain.stages.adapt import pretrain

    d = tmp_path_factory.mktemp("base")
    recipe = load_recipe(write_recipe(d / "tiny.yaml", tiny_recipe_dict(d / "base.pt")))
    pretrain(recipe, progress=False, echo=None)
    return d / "base.pt"


@pytest.fixture()
def make_recipe(tmp_path, tiny_checkpoint):
    """make_recipe(**overrides) -> a loaded Recipe whose file lives in tmp_path, sharing the session's base
    checkpoint unless `model` is overridden."""

    def _make(name: str = "tiny", **overrides) -> Recipe:
        raw = tiny_recipe_dict(tiny_checkpoint, name=name, **overrides)
        return load_recipe(write_recipe(tmp_path / f"{name}.yaml", raw))

    return _make


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_checkpoint) -> Path:
    """An adapted TT-LoRA run directory (session-scoped; treat as read-only)."""
    from toolchain.stages.adapt import adapt

    d = tmp_path_factory.mktemp("run")
    recipe = load_recipe(write_recipe(d / "tiny.yaml", tiny_recipe_dict(tiny_checkpoint)))
    return adapt(recipe, d / "run", progress=False, echo=None)


@pytest.fixture(scope="session")
def tiny_engine(tiny_run, tmp_path_factory) -> Path:
    """`edgetool fuse-export` on the session's tiny TT-LoRA run (treat as read-only: copy it to change it)."""
    from click.testing import CliRunner

    from toolchain.cli import main

    out = tmp_path_factory.mktemp("engine") / "engine"
    res = CliRunner().invoke(main, ["fuse-export", str(tiny_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _tensorrt_skip_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return "TensorRT is not installed"
    from toolchain.backends.cuda import cuda_device

    device, why = cuda_device()
    return None if device is not None else why


TENSORRT_SKIP_REASON = _tensorrt_skip_reason()


def needs_tensorrt(fn):
    """Marked `tensorrt`; skipped with the reason where TensorRT or a CUDA GPU is missing."""
    fn = pytest.mark.skipif(TENSORRT_SKIP_REASON is not None,
                            reason=f"needs TensorRT and a CUDA GPU: {TENSORRT_SKIP_REASON}")(fn)
    return pytest.mark.tensorrt(fn)


def assert_parity_passed(result, report: dict) -> None:
    """verify failed no check and exited 0. A latency check may be inconclusive (never fail) for the
    identical graphs fuse-export writes: with the few rounds tests time (fewer than 8) it always is, and
    tests/test_latency_verdict.py shows on synthetic timings that identical graphs never fail."""
    assert report["failed_checks"] == [], result.output
    assert result.exit_code == 0, result.output
    assert all(c["verdict"] in ("pass", "inconclusive") for c in report["checks"] if c["name"].startswith("latency."))

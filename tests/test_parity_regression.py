"""CI parity regression: embedded recipe (tiny shape) -> adapt (short) -> fuse-export -> verify
--engine onnxruntime, asserting the recipe's parity thresholds, then comparing every parity figure
with the committed baseline tests/parity_baseline.json.

"Measurably worse" (what fails the run), per kind of figure:
  error      (max/mean absolute error; lower is better): worse when  value > ERROR_FACTOR x baseline + floor.
             FP32 errors are rounding noise (a few ulps of the logits, ~1e-6) whose size moves by small
             factors between runs, CPUs and kernels (2x was seen between two runs on one machine); the
             factor and the floor absorb that. The floor is a tenth of the absolute tolerances verify
             used before it judged errors against the original engine's (1e-5 FP32, 5e-3 FP16) for max
             errors and a hundredth for mean errors, so a figure is flagged early, while a real regression (a wrong fold, a node left in
             FP16 that overflows) moves errors by orders of magnitude.
  agreement  (argmax agreement; higher is better): worse when more than `slack` additional windows of the
             target test split disagree than in the baseline (0 at FP32: any flip is real; 1 at FP16,
             where a near-tie may flip on another CPU).
  delta      (|macro-F1 engine - PyTorch|; lower is better): worse when value > baseline + slack
             (0 at FP32; 0.03 at FP16, about one window's worth of macro-F1 on 40 windows).
Latency is not part of the baseline (it depends on the machine); its verdict is tested in test_latency_verdict.

Regenerate the baseline after an intended change:
    EDGETOOL_UPDATE_PARITY_BASELINE=1 .venv/bin/pytest tests/test_parity_regression.py
(the run then writes the file and skips the comparison; commit the new file with the change)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from click.testing import CliRunner

from conftest import assert_parity_passed
from toolchain.artifacts import atomic_write_json
from toolchain.cli import main

BASELINE = Path(__file__).with_name("parity_baseline.json")
UPDATE_ENV = "EDGETOOL_UPDATE_PARITY_BASELINE"
ERROR_FACTOR = 4.0

# figure -> (kind, floor or slack); see the module docstring
METRICS: dict[str, tuple[str, float]] = {
    "fuse.max_abs_error": ("error", 1e-5),
    "fuse.argmax_agreement": ("agreement", 0),
    "fuse.ort_max_abs_error": ("error", 1e-5),
    "fuse.fp16_argmax_agreement": ("agreement", 1),
    "verify.fp32.max_abs_error": ("error", 1e-5),
    "verify.fp32.mean_abs_error": ("error", 1e-6),
    "verify.fp32.argmax_agreement": ("agreement", 0),
    "verify.fp32.f1_delta": ("delta", 0.0),
    "verify.fp16.max_abs_error": ("error", 5e-3),
    "verify.fp16.mean_abs_error": ("error", 5e-4),
    "verify.fp16.argmax_agreement": ("agreement", 1),
    "verify.fp16.f1_delta": ("delta", 0.03),
}


def parity_figures(fuse_report: dict, verify_report: dict) -> dict[str, float]:
    figs = {f"fuse.{k}": float(fuse_report[k]) for k in ("max_abs_error", "argmax_agreement", "ort_max_abs_error",
                                                         "fp16_argmax_agreement")}
    for precision, acc in verify_report["accuracy"].items():
        for k in ("max_abs_error", "mean_abs_error", "argmax_agreement", "f1_delta"):
            figs[f"verify.{precision}.{k}"] = float(acc[k])
    return figs


def parity_regressions(current: dict[str, float], baseline: dict[str, float], windows: int) -> list[str]:
    """One line per figure measurably worse than the baseline (or missing from either side)."""
    problems = []
    for name, (kind, margin) in METRICS.items():
        if name not in baseline:
            problems.append(f"{name}: not in {BASELINE.name}; regenerate it ({UPDATE_ENV}=1)")
            continue
        if name not in current:
            problems.append(f"{name}: not measured by this run")
            continue
        value, base = current[name], baseline[name]
        if kind == "error":
            limit = ERROR_FACTOR * base + margin
            if value > limit:
                problems.append(f"{name}: {value:.3g} > {limit:.3g} ({ERROR_FACTOR:g} x baseline {base:.3g} + {margin:g})")
        elif kind == "agreement":
            limit = base - margin / windows - 1e-12
            if value < limit:
                problems.append(f"{name}: {value:.4f} < baseline {base:.4f} - {margin:g} window(s) of {windows}")
        else:
            if value > base + margin + 1e-12:
                problems.append(f"{name}: {value:.4f} > baseline {base:.4f} + {margin:g}")
    return problems


@pytest.fixture(scope="module")
def pipeline(tiny_run, tmp_path_factory):
    """tiny_run is the embedded recipe's shape adapted briefly (conftest); export and verify it via the CLI."""
    eng = tmp_path_factory.mktemp("parity") / "engine"
    cli = CliRunner()
    fused = cli.invoke(main, ["fuse-export", str(tiny_run), "--out", str(eng)])
    assert fused.exit_code == 0, fused.output
    verified = cli.invoke(main, ["verify", str(eng), "--engine", "onnxruntime", "--iterations", "5", "--warmup", "1"])
    return {"verify_result": verified,
            "fuse": json.loads((eng / "fuse_report.json").read_text()),
            "verify": json.loads((eng / "verify_report.json").read_text())}


def test_pipeline_passes_parity_thresholds(pipeline, tiny_run):
    res, r = pipeline["verify_result"], pipeline["verify"]
    assert r["engine"] == "onnxruntime"
    assert_parity_passed(res, r)
    from toolchain.recipe import load_recipe

    cfg = load_recipe(tiny_run / "recipe.yaml").verify
    fp32, fp16 = r["accuracy"]["fp32"], r["accuracy"]["fp16"]
    assert fp32["argmax_agreement"] >= cfg.min_argmax_agreement
    assert fp32["f1_delta"] <= cfg.max_f1_delta
    assert fp32["output_error_passed"] and fp32["scaled_error"] <= fp32["error_limit"]
    assert fp16["argmax_agreement"] >= cfg.fp16_min_argmax_agreement
    assert fp16["f1_delta"] <= cfg.fp16_max_f1_delta
    assert fp16["output_error_passed"]
    assert pipeline["fuse"]["passed"] and pipeline["fuse"]["graph_identical"]
    # latency machinery ran (figures are machine-dependent and not asserted)
    assert set(r["latency_ratio"]) == {"1", "8"} and all(v > 0 for v in r["latency_ratio"].values())


def test_parity_not_worse_than_baseline(pipeline):
    current = parity_figures(pipeline["fuse"], pipeline["verify"])
    if os.environ.get(UPDATE_ENV):
        atomic_write_json(BASELINE, {
            "_about": "Parity figures of tests/test_parity_regression.py (tiny embedded recipe, ONNX Runtime CPU). "
                      f"Regenerate with {UPDATE_ENV}=1; the margins are documented in that test module.",
            "generated_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                               "numpy": np.__version__, "machine": platform.machine(), "python": platform.python_version()},
            "test_windows": pipeline["verify"]["test_windows"],
            "figures": current,
        })
        pytest.skip(f"{BASELINE.name} regenerated ({UPDATE_ENV} is set); nothing compared")
    assert BASELINE.is_file(), f"{BASELINE} missing; create it with {UPDATE_ENV}=1"
    baseline = json.loads(BASELINE.read_text())
    problems = parity_regressions(current, baseline["figures"], pipeline["verify"]["test_windows"])
    assert not problems, "parity is measurably worse than the baseline:\n" + "\n".join(problems)


def test_regression_check_can_fail():
    """The comparison is not vacuous: each kind of figure fails when it gets measurably worse, and noise passes."""
    base = {"verify.fp32.max_abs_error": 2.6e-6, "verify.fp32.argmax_agreement": 1.0, "verify.fp16.f1_delta": 0.0,
            "verify.fp16.argmax_agreement": 1.0}
    base = {**{k: 0.0 if METRICS[k][0] != "agreement" else 1.0 for k in METRICS}, **base}
    assert parity_regressions(dict(base), base, 40) == []
    noise = {**base, "verify.fp32.max_abs_error": 5e-6, "verify.fp16.argmax_agreement": 39 / 40,
             "verify.fp16.f1_delta": 0.025}
    assert parity_regressions(noise, base, 40) == []
    worse = {**base, "verify.fp32.max_abs_error": 3e-4, "verify.fp32.argmax_agreement": 39 / 40,
             "verify.fp16.argmax_agreement": 38 / 40, "verify.fp16.f1_delta": 0.06}
    problems = parity_regressions(worse, base, 40)
    assert [p.split(":")[0] for p in problems] == ["verify.fp32.max_abs_error", "verify.fp32.argmax_agreement",
                                                   "verify.fp16.argmax_agreement", "verify.fp16.f1_delta"]
    missing = dict(base); missing.pop("fuse.max_abs_error")
    assert "regenerate" in parity_regressions(base, missing, 40)[0]

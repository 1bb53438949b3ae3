"""Parity judgements, apart from any backend: accuracy of an engine against PyTorch, latency statistics
of interleaved timings with the A-vs-A' control and the band it implies, and the JUnit report.

Latency: warm-up, then round-robin timed runs of original (A), fused (B) and a second, independent
instance of the original (A') -- A B A' B A' A ..., the order rotating each round so drift and
position effects hit all three alike. A' vs A is the control: two identical graphs, so its median
ratio shows how far this machine's noise alone moves the ratio. When twice that deviation exceeds the
requested band, the band is widened to it (capped at verify.latency_band_max), and the report records
the requested band, the effective band and the reason. The noise of a batch size is the larger of the
control's deviation from 1 and half its 95 % bootstrap interval, so a lucky control on a loaded machine
does not pass for a quiet one."""

from __future__ import annotations

import datetime as _dt
import platform
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends.base import Runner, quiet_polygraphy
from .metrics import macro_f1
from .recipe import VerifyConfig

# The fused/original ratio and the control ratio are both noisy; a band of twice the control's
# deviation leaves room for the noise of each.
NOISE_FACTOR = 2.0


@dataclass
class Check:
    name: str
    passed: bool
    message: str
    seconds: float = 0.0


@dataclass
class AccuracyResult:
    precision: str
    argmax_agreement: float
    f1_torch: float | None  # None: no labels (the run's data is not available)
    f1_engine: float | None
    f1_delta: float | None
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    atol: float
    rtol: float
    output_error_passed: bool
    executed_as: str = ""


def tolerances(cfg: VerifyConfig, precision: str) -> dict[str, float]:
    if precision == "fp32":
        return {"atol": cfg.atol, "rtol": cfg.rtol, "min_agreement": cfg.min_argmax_agreement, "max_f1_delta": cfg.max_f1_delta}
    return {"atol": cfg.fp16_atol, "rtol": cfg.fp16_rtol, "min_agreement": cfg.fp16_min_argmax_agreement,
            "max_f1_delta": cfg.fp16_max_f1_delta}


def compare_outputs(engine_out: np.ndarray, reference: np.ndarray, atol: float, rtol: float,
                    output_name: str = "logits") -> dict[str, Any]:
    """Polygraphy's SimpleCompareFunc, elementwise mode: an element fails when it exceeds BOTH atol and
    rtol (relative to the reference); also returns its max/mean absolute and max relative errors."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc

    with quiet_polygraphy():
        result = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise")(
            IterationResult({output_name: engine_out}, runner_name="engine"),
            IterationResult({output_name: reference}, runner_name="torch"),
        )[output_name]
    return {"passed": bool(result), "max_abs_error": float(result.max_absdiff),
            "max_rel_error": float(result.max_reldiff), "mean_abs_error": float(result.mean_absdiff)}


def accuracy_parity(engine_out: np.ndarray, torch_out: np.ndarray, y: np.ndarray | None, precision: str,
                    cfg: VerifyConfig) -> tuple[AccuracyResult, list[Check]]:
    """Without labels (y None) there is no F1: the f1_delta check is left out, not passed."""
    tol = tolerances(cfg, precision)
    pred_e, pred_t = engine_out.argmax(axis=1), torch_out.argmax(axis=1)
    agreement = float(np.mean(pred_e == pred_t))
    f1_e, f1_t = (None, None) if y is None else (macro_f1(y, pred_e), macro_f1(y, pred_t))
    cmp = compare_outputs(engine_out, torch_out, tol["atol"], tol["rtol"])
    res = AccuracyResult(precision, agreement, f1_t, f1_e, None if y is None else abs(f1_e - f1_t), cmp["max_abs_error"],
                         cmp["max_rel_error"], cmp["mean_abs_error"], tol["atol"], tol["rtol"], cmp["passed"])
    n = len(pred_e)
    checks = [
        Check(f"accuracy.{precision}.argmax_agreement", agreement >= tol["min_agreement"],
              f"argmax agreement {agreement:.4f} ({int(round(agreement * n))}/{n}), required >= {tol['min_agreement']:g}"),
    ]
    if y is not None:
        checks.append(Check(f"accuracy.{precision}.f1_delta", res.f1_delta <= tol["max_f1_delta"] + 1e-12,
                            f"macro-F1 engine {f1_e:.4f} vs PyTorch {f1_t:.4f} (|delta| {res.f1_delta:.4f}), "
                            f"allowed {tol['max_f1_delta']:g}"))
    checks += [
        Check(f"accuracy.{precision}.output_error", cmp["passed"],
              f"max |engine - PyTorch| {cmp['max_abs_error']:.3g} (max rel {cmp['max_rel_error']:.3g}); Polygraphy "
              f"elementwise check atol {tol['atol']:g}, rtol {tol['rtol']:g}"),
    ]
    return res, checks


def interleaved_timings(runners: dict[str, Runner], x: np.ndarray, warmup: int, iterations: int) -> dict[str, np.ndarray]:
    """Seconds per inference for each runner: `warmup` untimed rounds, then `iterations` rounds in which
    each runner runs once, the order rotating every round (A B C, B C A, C A B, ...)."""
    names = list(runners)
    for _ in range(warmup):
        for n in names:
            runners[n].time_once(x)
    times = {n: np.empty(iterations) for n in names}
    for i in range(iterations):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n][i] = runners[n].time_once(x)
    return times


def latency_stats(seconds: np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()), "n": int(ms.size)}


@dataclass
class ControlNoise:
    """How far two identical graphs' timings drift apart: the A'-vs-A median ratio and half the width of
    its 95 % bootstrap interval (rounds resampled jointly, so the pairing within a round is kept)."""

    ratio: float
    halfwidth: float

    @property
    def noise(self) -> float:
        return max(abs(self.ratio - 1.0), self.halfwidth)


def control_noise(original_s: np.ndarray, control_s: np.ndarray, resamples: int = 1000, seed: int = 0) -> ControlNoise:
    a, c = np.asarray(original_s), np.asarray(control_s)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    boot = np.median(c[idx], axis=1) / np.median(a[idx], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return ControlNoise(float(np.median(c) / np.median(a)), float((hi - lo) / 2))


@dataclass
class BandDecision:
    requested: float
    effective: float
    widened: bool
    noise: float  # the largest ControlNoise.noise over the batch sizes
    reason: str


def decide_band(requested: float, controls: dict[Any, ControlNoise], cap: float) -> BandDecision:
    """The latency band to apply. Widened only when the A-vs-A control shows the machine is noisier than
    the band allows: to NOISE_FACTOR x the control's noise, never past `cap` (nor below the request)."""
    if not controls:
        return BandDecision(requested, requested, False, 0.0, "no control measured")
    worst_bs, worst = max(controls.items(), key=lambda kv: kv[1].noise)
    noise = worst.noise
    needed = NOISE_FACTOR * noise
    seen = (f"control ratio {worst.ratio:.3f}, 95 % bootstrap interval +/-{100 * worst.halfwidth:.1f} % "
            f"at batch {worst_bs}")
    if needed <= requested:
        return BandDecision(requested, requested, False, noise,
                            f"two identical graphs agree within {100 * noise:.1f} % ({seen}): the requested band holds")
    cap = max(cap, requested)
    effective = min(needed, cap)
    reason = (f"machine is noisy: two identical original graphs timed up to {100 * noise:.1f} % apart ({seen}); "
              f"band widened from +/-{100 * requested:.2f} % to +/-{100 * effective:.2f} %")
    if needed > cap:
        reason += f" (capped at verify.latency_band_max; {NOISE_FACTOR:g} x noise would be +/-{100 * needed:.1f} %)"
    return BandDecision(requested, effective, True, noise, reason)


def latency_checks(ratios: dict[int, float], band: BandDecision, precision: str) -> list[Check]:
    checks = []
    for bs, r in ratios.items():
        ok = abs(r - 1.0) <= band.effective
        msg = (f"{precision} batch {bs}: median fused/original {r:.3f}, allowed 1 +/- {band.effective:.3f}"
               + (f" (requested +/-{band.requested:.3f}; {band.reason})" if band.widened else ""))
        if not ok and band.widened and band.effective >= band.requested and "capped" in band.reason:
            msg += "; the machine is too noisy to conclude: rerun on an idle device"
        checks.append(Check(f"latency.batch_{bs}", ok, msg))
    return checks


def latency_input(X: np.ndarray, batch: int) -> np.ndarray:
    """`batch` real target windows (tiled when the split is smaller)."""
    reps = -(-batch // len(X))
    return np.ascontiguousarray(np.concatenate([X] * reps)[:batch])


def junit_xml(checks: list[Check], suite: str, properties: dict[str, Any]) -> bytes:
    failures = [c for c in checks if not c.passed]
    root = ET.Element("testsuites", name="edgetool", tests=str(len(checks)), failures=str(len(failures)), errors="0")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)), failures=str(len(failures)), errors="0",
                       skipped="0", time=f"{sum(c.seconds for c in checks):.3f}",
                       timestamp=_dt.datetime.now().isoformat(timespec="seconds"), hostname=platform.node())
    props = ET.SubElement(ts, "properties")
    for k, v in properties.items():
        ET.SubElement(props, "property", name=str(k), value=str(v))
    for c in checks:
        group, _, name = c.name.partition(".")
        tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{group}", name=name or group, time=f"{c.seconds:.3f}")
        if c.passed:
            ET.SubElement(tc, "system-out").text = c.message
        else:
            ET.SubElement(tc, "failure", message=c.message, type="ParityFailure").text = c.message
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)

"""Parity judgements, apart from any backend (docs/verify.md has the reasoning and the statistics).

Accuracy, at one precision: the fused engine against its reference (the fused PyTorch model in verify,
the fused FP32 graph in fuse-export), judged next to the original engine against *its* reference on the
same inputs. Argmax agreement and macro-F1 delta have fixed thresholds; the output error is scaled by the
output's magnitude and passes when it is within `error_margin` x the original engine's scaled error plus
a small scaled floor. One function, `accuracy_parity`, used by verify (FP32, FP16) and fuse-export (FP16).

Latency: per-round paired ratios fused/original and control/original from interleaved rounds (A B A',
rotating), a distribution-free confidence interval for the median of each, and a verdict with three
outcomes: pass, fail (only when the machine could resolve the difference) and inconclusive. The verdict
consumes arrays of per-round seconds, so it does not depend on how a backend times a run."""

from __future__ import annotations

import datetime as _dt
import math
import platform
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import macro_f1
from ..recipe import VerifyConfig

PASS, FAIL, INCONCLUSIVE, WARNING = "pass", "fail", "inconclusive", "warning"

# A fail needs the fused/original interval to clear twice the control's deviation: the fused pair and
# the control pair are each as noisy as the other, so half of the room is for each.
NOISE_FACTOR = 2.0


@dataclass
class Check:
    """One JUnit testcase. `verdict`: pass, fail (exit 1), inconclusive (latency the machine could not
    resolve) or warning (a check waived on request); only `fail` fails the run."""

    name: str
    verdict: str
    message: str
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def failed(self) -> bool:
        return self.verdict == FAIL

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "passed": self.passed, "message": self.message,
                "seconds": self.seconds}


def check(name: str, ok: bool, message: str) -> Check:
    return Check(name, PASS if ok else FAIL, message)


# ---------------------------------------------------------------------------------------------- accuracy


@dataclass
class ParityCriteria:
    """The thresholds of one precision. `error_floor` is relative to the output's magnitude."""

    min_agreement: float
    max_f1_delta: float
    error_margin: float
    error_floor: float


def criteria(cfg: VerifyConfig, precision: str) -> ParityCriteria:
    if precision == "fp32":
        return ParityCriteria(cfg.min_argmax_agreement, cfg.max_f1_delta, cfg.error_margin, cfg.error_floor)
    return ParityCriteria(cfg.fp16_min_argmax_agreement, cfg.fp16_max_f1_delta, cfg.error_margin, cfg.fp16_error_floor)


def output_error(out: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Max and mean |out - reference|, the output's scale (max |reference|) and the max error relative to it."""
    diff = np.abs(np.asarray(out, np.float64) - np.asarray(reference, np.float64))
    scale = float(np.abs(reference).max()) if np.size(reference) else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    scaled = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    if not np.isfinite(out).all():
        max_abs = scaled = math.inf
    return {"max_abs": max_abs, "mean_abs": float(diff.mean()) if diff.size else 0.0, "scale": scale, "scaled": scaled}


@dataclass
class AccuracyResult:
    precision: str
    argmax_agreement: float  # fused engine vs its reference
    f1_torch: float | None  # macro-F1 of the reference's predictions; None: no labels (the run's data is absent)
    f1_engine: float | None
    f1_delta: float | None  # |f1_engine - f1_torch|
    max_abs_error: float
    mean_abs_error: float
    output_scale: float  # max |reference logit|
    scaled_error: float  # max_abs_error / output_scale
    original_argmax_agreement: float  # original engine vs its reference, the same inputs
    original_f1_delta: float | None
    original_max_abs_error: float
    original_scaled_error: float
    baseline_valid: bool  # the original engine meets the agreement and F1 thresholds itself
    error_limit: float  # on scaled_error
    error_margin: float
    error_floor: float
    min_agreement: float
    max_f1_delta: float
    output_error_passed: bool
    executed_as: str = ""
    original_error_limit: float = 0.0  # on original_scaled_error (see original_engine_check)


def accuracy_parity(engine_out: np.ndarray, reference_out: np.ndarray, original_engine_out: np.ndarray,
                    original_reference_out: np.ndarray, y: np.ndarray | None, precision: str,
                    crit: ParityCriteria, prefix: str = "accuracy") -> tuple[AccuracyResult, list[Check]]:
    """Argmax agreement and |F1 delta| against the thresholds, and the scaled output error against the
    original engine's (used as the baseline only when the original engine meets the thresholds itself, so
    a broken original cannot excuse a broken fused engine). Without labels (y None) there is no F1: the
    f1_delta check is left out, not passed."""
    pred_e, pred_r = engine_out.argmax(axis=1), reference_out.argmax(axis=1)
    agreement = float(np.mean(pred_e == pred_r))
    pred_oe, pred_or = original_engine_out.argmax(axis=1), original_reference_out.argmax(axis=1)
    o_agreement = float(np.mean(pred_oe == pred_or))
    if y is None:
        f1_e = f1_r = delta = o_delta = None
    else:
        f1_e, f1_r = macro_f1(y, pred_e), macro_f1(y, pred_r)
        delta, o_delta = abs(f1_e - f1_r), abs(macro_f1(y, pred_oe) - macro_f1(y, pred_or))
    err, o_err = output_error(engine_out, reference_out), output_error(original_engine_out, original_reference_out)
    baseline_valid = (o_agreement >= crit.min_agreement and (o_delta is None or o_delta <= crit.max_f1_delta + 1e-12)
                      and math.isfinite(o_err["scaled"]))
    limit = (crit.error_margin * o_err["scaled"] if baseline_valid else 0.0) + crit.error_floor
    res = AccuracyResult(precision, agreement, f1_r, f1_e, delta, err["max_abs"], err["mean_abs"],
                         err["scale"], err["scaled"], o_agreement, o_delta, o_err["max_abs"], o_err["scaled"],
                         baseline_valid, limit, crit.error_margin, crit.error_floor, crit.min_agreement,
                         crit.max_f1_delta, err["scaled"] <= limit)
    n = len(pred_e)
    same = lambda ok: "" if ok else "; the original engine misses it too: precision, not fusion"  # noqa: E731
    o_delta_text = "n/a" if o_delta is None else f"{o_delta:.4f}"
    baseline = (f"original engine {o_err['scaled']:.2g} (max |error| {o_err['max_abs']:.3g}): limit "
                f"{crit.error_margin:g} x {o_err['scaled']:.2g} + {crit.error_floor:g} = {limit:.2g}" if baseline_valid else
                f"the original engine is no baseline (agreement {o_agreement:.4f}, |F1 delta| {o_delta_text} miss the "
                f"thresholds): limit the floor {crit.error_floor:g}")
    checks = [
        check(f"{prefix}.{precision}.argmax_agreement", agreement >= crit.min_agreement,
              f"argmax agreement {agreement:.4f} ({int(round(agreement * n))}/{n}), required >= {crit.min_agreement:g} "
              f"(original engine {o_agreement:.4f}{same(agreement >= crit.min_agreement or o_agreement >= crit.min_agreement)})"),
    ]
    if y is not None:
        checks.append(check(f"{prefix}.{precision}.f1_delta", delta <= crit.max_f1_delta + 1e-12,
                            f"macro-F1 engine {f1_e:.4f} vs reference {f1_r:.4f} (|delta| {delta:.4f}), allowed "
                            f"{crit.max_f1_delta:g} (original engine |delta| {o_delta_text})"))
    checks.append(check(f"{prefix}.{precision}.output_error", res.output_error_passed,
                        f"max |engine - reference| {err['max_abs']:.3g} = {err['scaled']:.2g} of max |logit| "
                        f"{err['scale']:.3g}; " + baseline))
    return res, checks


def original_engine_check(res: AccuracyResult, file_name: str, prefix: str = "accuracy") -> Check:
    """The original engine judged against the original (base) model as the fused engine is against its own
    reference: the same agreement and F1 thresholds, and its scaled output error within `error_margin` x the
    fused engine's + the floor. Without it a wrong `original.onnx` (another graph, integrity waived) would
    only lose its place as the error baseline, and latency would be timed against a graph nobody checked."""
    crit_f1 = res.max_f1_delta + 1e-12
    res.original_error_limit = res.error_margin * res.scaled_error + res.error_floor
    problems = []
    if res.original_argmax_agreement < res.min_agreement:
        problems.append(f"argmax agreement {res.original_argmax_agreement:.4f} < {res.min_agreement:g}")
    if res.original_f1_delta is not None and res.original_f1_delta > crit_f1:
        problems.append(f"|macro-F1 delta| {res.original_f1_delta:.4f} > {res.max_f1_delta:g}")
    if not res.original_scaled_error <= res.original_error_limit:
        problems.append(f"max |error| {res.original_scaled_error:.2g} of max |logit| > {res.error_margin:g} x the fused "
                        f"engine's {res.scaled_error:.2g} + {res.error_floor:g}")
    f1 = "n/a" if res.original_f1_delta is None else f"{res.original_f1_delta:.4f}"
    figures = (f"argmax agreement {res.original_argmax_agreement:.4f}, |macro-F1 delta| {f1}, max |error| "
               f"{res.original_scaled_error:.2g} of max |logit| (limit {res.original_error_limit:.2g})")
    if problems:
        return Check(f"{prefix}.{res.precision}.original_engine", FAIL,
                     f"{file_name} does not compute the original model: {'; '.join(problems)}; latency and the error "
                     f"baseline rest on it (rerun `edgetool fuse-export`)")
    return Check(f"{prefix}.{res.precision}.original_engine", PASS, f"{file_name} against the original model: {figures}")


# ---------------------------------------------------------------------------------------------- latency


def latency_stats(seconds: np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()), "n": int(ms.size)}


def median_ci(x: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(median, low, high): the sample median and the distribution-free interval [x_(k), x_(n+1-k)]
    (order statistics) for the population median, with the largest k whose coverage
    1 - 2 P(Binomial(n, 1/2) <= k - 1) is at least `confidence`. (-inf, inf) when n is too small."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    if n == 0:
        return math.nan, -math.inf, math.inf
    tail, k, term, cum = (1.0 - confidence) / 2, 0, 1, 0  # term = C(n, j), exact integers
    for j in range(n // 2 + 1):
        cum += term
        if cum / 2**n > tail:  # P(Bin <= j) too large: k = j + 1 would not cover
            break
        k = j + 1
        term = term * (n - j) // (j + 1)
    med = float(np.median(x))
    return (med, float(x[k - 1]), float(x[n - k])) if k else (med, -math.inf, math.inf)


def min_rounds(confidence: float) -> int:
    """Fewest rounds for which `median_ci` has a bounded interval: 2 x 2^-n <= 1 - confidence."""
    return math.ceil(1 - math.log2(1 - confidence))


@dataclass
class LatencyVerdict:
    """Ratios are fused/original (and control/original); the band and thresholds are fractions (0.05 = 5 %)."""

    verdict: str
    reason: str
    short: str  # the reason in a few words, for the summary line
    rounds: int
    confidence: float
    ratio: float  # median of the per-round ratios
    ci: tuple[float, float]
    control_ratio: float
    control_ci: tuple[float, float]
    resolution: float  # how far apart two identical graphs may time: max deviation of the control's CI
    band: float  # requested
    fail_threshold: float  # a fail needs the fused CI wholly above 1 + this
    band_max: float
    widened: bool  # fail_threshold > band (the machine is noisier than the band)


def latency_verdict(original_s: np.ndarray, fused_s: np.ndarray, control_s: np.ndarray, band: float,
                    band_max: float, confidence: float) -> LatencyVerdict:
    """pass / fail / inconclusive for one batch size from the per-round seconds of original (A), fused
    (B) and control (A', a second instance of the original), index i being round i. See docs/verify.md.

    pass:  the CI of median(B/A) lies below 1 + band, and the control's CI lies within 1 +/- band.
    fail:  the CI of median(B/A) lies above 1 + t, t = max(band, NOISE_FACTOR x the control's deviation),
           and t <= band_max. Faster than the original is never a failure (one-sided).
    inconclusive: everything else (too few rounds, a control noisier than the band, a CI across 1 + band)."""
    a, b, c = (np.asarray(t, dtype=np.float64) for t in (original_s, fused_s, control_s))
    if not (len(a) == len(b) == len(c)):
        raise ValueError("per-round timings must have one entry per round for each runner")
    ok = (a > 0) & (b > 0) & (c > 0) & np.isfinite(a) & np.isfinite(b) & np.isfinite(c)
    a, b, c = a[ok], b[ok], c[ok]
    r_med, r_lo, r_hi = median_ci(np.log(b / a), confidence)
    c_med, c_lo, c_hi = median_ci(np.log(c / a), confidence)
    beta = math.log1p(band)
    rho = max(abs(c_lo), abs(c_hi))  # log units; inf when unbounded
    theta = max(beta, NOISE_FACTOR * rho)
    ex = math.exp
    v = LatencyVerdict(INCONCLUSIVE, "", "", len(a), confidence, ex(r_med), (ex(r_lo), ex(r_hi)), ex(c_med),
                       (ex(c_lo), ex(c_hi)), math.expm1(rho), band, math.expm1(theta), band_max, theta > beta)
    pct = f"{100 * confidence:g} %"
    fused = f"fused/original {v.ratio:.3f} ({pct} CI {v.ci[0]:.3f}-{v.ci[1]:.3f})"
    control = f"identical graphs (control) {v.control_ratio:.3f} ({v.control_ci[0]:.3f}-{v.control_ci[1]:.3f})"
    if len(a) < min_rounds(confidence):
        v.short = f"{len(a)} rounds are too few"
        v.reason = (f"{len(a)} timed rounds cannot bound a {pct} interval (at least {min_rounds(confidence)} needed); "
                    "raise --iterations")
    elif r_lo > theta and v.fail_threshold <= band_max:
        v.verdict = FAIL
        v.short = f"fused slower than 1 + {v.fail_threshold:.3f}"
        v.reason = (f"{fused}: the fused engine is slower than 1 + {v.fail_threshold:.3f}"
                    + (f" (band widened from {band:.3f}: {control})" if v.widened else f"; {control}"))
    elif r_hi <= beta and rho <= beta:
        v.verdict = PASS
        v.short = f"fused not slower than 1 + {band:g}"
        v.reason = f"{fused} <= 1 + {band:g}; {control} within the band"
        if r_hi < -beta:
            v.reason += "; timed faster than the identical original: noise, not a gain"
    elif rho > beta:
        v.short = f"identical graphs timed up to {100 * v.resolution:.1f} % apart, band {100 * band:g} %"
        v.reason = (f"the machine is too noisy for the +/-{100 * band:g} % band: {control}, up to "
                    f"{100 * v.resolution:.1f} % apart; {fused}")
        if r_lo > theta:
            v.reason += f"; slower than 1 + {v.fail_threshold:.3f}, beyond verify.latency_band_max {band_max:g}"
        v.reason += "; rerun on an idle device or with more --iterations"
    else:
        v.short = f"interval {v.ci[0]:.3f}-{v.ci[1]:.3f} neither below 1 + {band:g} nor above 1 + {v.fail_threshold:.3f}"
        v.reason = (f"{fused} reaches past 1 + {band:g} but does not clear 1 + {v.fail_threshold:.3f}; "
                    f"{control}; rerun with more --iterations")
    return v


def latency_input(X: np.ndarray, batch: int) -> np.ndarray:
    """`batch` real target windows (tiled when the split is smaller)."""
    reps = -(-batch // len(X))
    return np.ascontiguousarray(np.concatenate([X] * reps)[:batch])


# ---------------------------------------------------------------------------------------------- JUnit


def junit_xml(checks: list[Check], suite: str, properties: dict[str, Any],
              warnings: tuple[str, ...] | list[str] = ()) -> bytes:
    """One testcase per check: <failure> for fail, <skipped message=...> for inconclusive and warning."""
    failures = [c for c in checks if c.failed]
    skipped = [c for c in checks if c.verdict in (INCONCLUSIVE, WARNING)]
    root = ET.Element("testsuites", name="edgetool", tests=str(len(checks)), failures=str(len(failures)), errors="0",
                      skipped=str(len(skipped)))
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(checks)), failures=str(len(failures)), errors="0",
                       skipped=str(len(skipped)), time=f"{sum(c.seconds for c in checks):.3f}",
                       timestamp=_dt.datetime.now().isoformat(timespec="seconds"), hostname=platform.node())
    props = ET.SubElement(ts, "properties")
    for k, v in properties.items():
        ET.SubElement(props, "property", name=str(k), value=str(v))
    for c in checks:
        group, _, name = c.name.partition(".")
        tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{group}", name=name or group, time=f"{c.seconds:.3f}")
        if c.failed:
            ET.SubElement(tc, "failure", message=c.message, type="ParityFailure").text = c.message
        elif c.verdict in (INCONCLUSIVE, WARNING):
            ET.SubElement(tc, "skipped", message=f"{c.verdict}: {c.message}")
        else:
            ET.SubElement(tc, "system-out").text = c.message
    if warnings:
        ET.SubElement(ts, "system-err").text = "\n".join(f"warning: {w}" for w in warnings)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)

"""Stage `verify`: the fused model, as an engine, is as accurate as the fused PyTorch model and exactly
as fast as the original model's engine.

Checks (each one a JUnit testcase; any failure -> exit 1 naming it):
  accuracy.<precision>.argmax_agreement  fused engine vs fused PyTorch on the target test split
  accuracy.<precision>.f1_delta          |macro-F1(engine) - macro-F1(PyTorch)|
  accuracy.<precision>.output_error      Polygraphy's elementwise atol/rtol comparison of the logits
  latency.batch_<n>                      median(fused) / median(original) within 1 +/- band
Precisions: what the backend runs (ONNX Runtime: the FP32 and the FP16 graph; TensorRT: FP16 engines),
with the recipe's FP32 or FP16 tolerances.

Latency: warm-up, then round-robin timed runs of original (A), fused (B) and a second, independent
instance of the original (A') -- A B A' B A' A ..., the order rotating each round so drift and
position effects hit all three alike. A' vs A is the control: two identical graphs, so its median
ratio shows how far this machine's noise alone moves the ratio. When twice that deviation exceeds the
requested band, the band is widened to it (capped at verify.latency_band_max), and the report records
the requested band, the effective band and the reason. The noise of a batch size is the larger of the
control's deviation from 1 and half its 95 % bootstrap interval, so a lucky control on a loaded machine
does not pass for a quiet one.

Outputs (atomic): ENGINE_DIR/verify_report.json, ENGINE_DIR/verify_junit.xml, and a terminal summary.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from .artifacts import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from .cliutil import echo as _cli_echo
from .cliutil import reports_errors
from .errors import EdgetoolError, ParityError
from .recipe import VerifyConfig
from .runners import (BACKENDS, Backend, GraphSpec, OnnxRuntimeBackend, OnnxRuntimeRunner, Runner, TorchRunner,
                      quiet_polygraphy, select_backend)
from .train import macro_f1

REPORT_NAME = "verify_report.json"
JUNIT_NAME = "verify_junit.xml"
ENGINE_CHOICES = [*BACKENDS, "auto"]
# The fused/original ratio and the control ratio are both noisy; a band of twice the control's
# deviation leaves room for the noise of each.
NOISE_FACTOR = 2.0
TORCH_TIMING_THREADS = 1  # see _unfused_phase


def _log(echo, msg: str) -> None:
    if echo is not None:
        echo(msg)


# ------------------------------------------------------------------------------------------ comparison


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
    f1_torch: float
    f1_engine: float
    f1_delta: float
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


def accuracy_parity(engine_out: np.ndarray, torch_out: np.ndarray, y: np.ndarray, precision: str,
                    cfg: VerifyConfig) -> tuple[AccuracyResult, list[Check]]:
    tol = tolerances(cfg, precision)
    pred_e, pred_t = engine_out.argmax(axis=1), torch_out.argmax(axis=1)
    agreement = float(np.mean(pred_e == pred_t))
    f1_e, f1_t = macro_f1(y, pred_e), macro_f1(y, pred_t)
    cmp = compare_outputs(engine_out, torch_out, tol["atol"], tol["rtol"])
    res = AccuracyResult(precision, agreement, f1_t, f1_e, abs(f1_e - f1_t), cmp["max_abs_error"], cmp["max_rel_error"],
                         cmp["mean_abs_error"], tol["atol"], tol["rtol"], cmp["passed"])
    n = len(y)
    checks = [
        Check(f"accuracy.{precision}.argmax_agreement", agreement >= tol["min_agreement"],
              f"argmax agreement {agreement:.4f} ({int(round(agreement * n))}/{n}), required >= {tol['min_agreement']:g}"),
        Check(f"accuracy.{precision}.f1_delta", res.f1_delta <= tol["max_f1_delta"] + 1e-12,
              f"macro-F1 engine {f1_e:.4f} vs PyTorch {f1_t:.4f} (|delta| {res.f1_delta:.4f}), allowed {tol['max_f1_delta']:g}"),
        Check(f"accuracy.{precision}.output_error", cmp["passed"],
              f"max |engine - PyTorch| {cmp['max_abs_error']:.3g} (max rel {cmp['max_rel_error']:.3g}); Polygraphy "
              f"elementwise check atol {tol['atol']:g}, rtol {tol['rtol']:g}"),
    ]
    return res, checks


# ------------------------------------------------------------------------------------------ latency


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


# ------------------------------------------------------------------------------------------ reports


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


# ------------------------------------------------------------------------------------------ the stage


@dataclass
class EngineDir:
    path: Path
    fuse_report: dict[str, Any]
    run_dir: Path
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    opset: int


def read_engine_dir(engine_dir: Path) -> EngineDir:
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EdgetoolError(f"ENGINE_DIR not found: {engine_dir} (create it with `edgetool fuse-export RUN_DIR`)")
    report_path = engine_dir / "fuse_report.json"
    if not report_path.is_file():
        raise EdgetoolError(f"{engine_dir} is not an edgetool engine directory (no fuse_report.json); "
                            "create one with `edgetool fuse-export RUN_DIR`")
    rep = read_json(report_path, "fuse report")
    if not isinstance(rep, dict):
        raise EdgetoolError(f"{report_path} is not a fuse report (expected a JSON object)")
    missing = [k for k in ("run_dir", "input_shape") if k not in rep]
    if missing:
        raise EdgetoolError(f"{report_path} lacks {', '.join(missing)}; rerun `edgetool fuse-export`")
    for name in ("original.onnx", "fused.onnx", "original.fp16.onnx", "fused.fp16.onnx"):
        if not (engine_dir / name).is_file():
            raise EdgetoolError(f"{engine_dir / name} not found: ENGINE_DIR is incomplete; rerun `edgetool fuse-export`")
    try:
        run_dir = Path(rep["run_dir"])
        input_shape = tuple(int(d) for d in rep["input_shape"])
        opset = int(rep.get("opset", 17))
    except (TypeError, ValueError) as exc:
        raise EdgetoolError(f"{report_path} is malformed ({exc}); rerun `edgetool fuse-export`") from None
    if not run_dir.is_absolute():
        run_dir = (engine_dir / run_dir).resolve()
    if not run_dir.is_dir():
        raise EdgetoolError(f"the run directory ENGINE_DIR was exported from, {run_dir} (recorded in {report_path}), "
                            "no longer exists; rerun `edgetool fuse-export RUN_DIR` on the run where it is now")
    adapter = run_dir / "adapter.pt"
    if "adapter_sha256" in rep and adapter.is_file() and sha256_file(adapter) != rep["adapter_sha256"]:
        raise EdgetoolError(f"{adapter} changed since fuse-export wrote {engine_dir} (the run was adapted again): "
                            f"these engines are of the earlier adapter; rerun `edgetool fuse-export {run_dir}`")
    return EngineDir(engine_dir, rep, run_dir, rep.get("input_name", "input"), rep.get("output_name", "logits"),
                     input_shape, opset)


def changed_since_export(ed: EngineDir) -> list[str]:
    """Files whose sha256 differs from what fuse-export recorded (informational: the checks decide)."""
    recorded = ed.fuse_report.get("files") or {}
    return [f for f, h in recorded.items() if (ed.path / f).is_file() and sha256_file(ed.path / f) != h]


def _unfused_onnx(adapted, sample: np.ndarray, opset: int, tmp: Path) -> tuple[Path | None, int, str]:
    """Export the unfused adapted model (adapter modules still in the graph), if the exporter can:
    (path, node count, "") or (None, 0, why not)."""
    try:
        import torch

        from .export import export_onnx

        path = tmp / "unfused.onnx"
        proto = export_onnx(adapted, torch.from_numpy(sample), path, opset)
        return path, len(proto.graph.node), ""
    except Exception as exc:  # any exporter failure just means "not exportable"; it is reported, not fatal
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, 0, f"not exportable to ONNX: {type(exc).__name__}: {first[:200]}"


def structure_checks(spec: GraphSpec) -> list[Check]:
    """Latency parity rests on original and fused being the same graph. fuse-export proved it when it
    wrote them; prove it again on the files verify times, since files in ENGINE_DIR can be swapped."""
    from .export import compare_graph_structure

    checks = []
    for precision in ("fp32", "fp16"):
        rep = compare_graph_structure(spec.onnx("original", precision), spec.onnx("fused", precision))
        msg = ("original and fused graphs: same nodes, attributes, I/O and initializer names/shapes/dtypes"
               if rep.identical else "; ".join(rep.differences[:3]))
        checks.append(Check(f"structure.{precision}.graph_identical", rep.identical, msg))
    return checks


def _accuracy_phase(backend: Backend, spec: GraphSpec, test, torch_out: np.ndarray, cfg: VerifyConfig,
                    echo) -> tuple[dict[str, AccuracyResult], list[Check]]:
    accuracy: dict[str, AccuracyResult] = {}
    checks: list[Check] = []
    for precision in backend.accuracy_precisions():
        t0 = time.perf_counter()
        with backend.runner(spec, "fused", precision, echo) as r:
            engine_out = r.infer_batched(test.X, spec.max_batch)
        res, cks = accuracy_parity(engine_out, torch_out, test.y, precision, cfg)
        res.executed_as = backend.executed_as(precision)
        for c in cks:
            c.seconds = (time.perf_counter() - t0) / len(cks)
        accuracy[precision] = res
        checks += cks
    return accuracy, checks


def _latency_phase(backend: Backend, spec: GraphSpec, X: np.ndarray, batch_sizes: list[int], cfg: VerifyConfig,
                   echo) -> tuple[dict[str, Any], BandDecision, list[Check]]:
    """Original (A), fused (B) and control (A', a second instance of the original) interleaved."""
    precision = backend.latency_precision()
    latency_ms: dict[str, dict[str, dict[str, float]]] = {"original": {}, "fused": {}, "control": {}}
    ratios: dict[int, float] = {}
    control: dict[int, ControlNoise] = {}
    t0 = time.perf_counter()
    runners = {"original": backend.runner(spec, "original", precision, echo),
               "fused": backend.runner(spec, "fused", precision, echo),
               "control": backend.runner(spec, "original", precision, echo)}
    try:
        for r in runners.values():
            r.activate()
        for bs in batch_sizes:
            times = interleaved_timings(runners, latency_input(X, bs), cfg.warmup, cfg.iterations)
            for n, t in times.items():
                latency_ms[n][str(bs)] = latency_stats(t)
            ratios[bs] = latency_ms["fused"][str(bs)]["p50"] / latency_ms["original"][str(bs)]["p50"]
            control[bs] = control_noise(times["original"], times["control"])
    finally:
        for r in runners.values():
            r.deactivate()
    band = decide_band(cfg.latency_band, control, cfg.latency_band_max)
    checks = latency_checks(ratios, band, precision)
    for c in checks:
        c.seconds = (time.perf_counter() - t0) / len(checks)
    figures = {
        "latency_precision": precision,
        "latency_ms": latency_ms,
        "latency_ratio": {str(b): r for b, r in ratios.items()},
        "latency_control": {str(b): {"ratio": c.ratio, "bootstrap_halfwidth": c.halfwidth, "noise": c.noise}
                            for b, c in control.items()},
        "latency_band": {"requested": band.requested, "effective": band.effective, "widened": band.widened,
                         "noise": band.noise, "reason": band.reason, "max": cfg.latency_band_max},
    }
    return figures, band, checks


def _nodes_after_ort_folding(path: Path, tmp: Path) -> int:
    """Node count of `path` after ONNX Runtime's basic (constant-folding) optimisations: it folds an
    adapter whose factors are constants back into the conv weights at session load, which is why the
    unfused graph costs about the same as the fused one on ONNX Runtime (eager PyTorch has no such pass)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp / f"{path.stem}.ort-basic.onnx")
    ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    return len(onnx.load(opts.optimized_model_filepath).graph.node)


def _unfused_phase(adapted, fused, backend: Backend, spec: GraphSpec, ed: EngineDir, X: np.ndarray,
                   batch_sizes: list[int], cfg: VerifyConfig, echo) -> dict[str, Any]:
    """What fusion saved: the unfused adapted model against the fused one, in the same runtime each
    (eager PyTorch; ONNX Runtime FP32 when the unfused model exports). Informational, no check, so
    fewer runs: eager PyTorch at the recipe batch is the slowest thing verify times."""
    import onnx

    iters = min(cfg.unfused_iterations, cfg.iterations)
    ms: dict[str, dict[str, Any]] = {"torch": {}, "onnxruntime": {}}
    ratio: dict[str, dict[str, float] | None] = {"torch": {}, "onnxruntime": {}}

    def time_pair(runtime: str, unfused_runner: Runner, fused_runner: Runner) -> None:
        for bs in batch_sizes:
            times = interleaved_timings({"unfused": unfused_runner, "fused": fused_runner}, latency_input(X, bs),
                                        cfg.warmup, iters)
            st = {n: latency_stats(t) for n, t in times.items()}
            ms[runtime][str(bs)] = st
            ratio[runtime][str(bs)] = st["unfused"]["p50"] / st["fused"]["p50"]

    import torch

    # One intra-op thread while timing eager PyTorch: its OpenMP pool spin-waits, and on a loaded machine
    # a 2-thread pool ran ~10x slower than one thread (450 vs 47 ms at batch 32 on the 2-core dev box),
    # which drowned the difference being measured. Both models get the same setting; restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_TIMING_THREADS)
    try:
        with TorchRunner(adapted, "unfused PyTorch", "unfused") as ru, TorchRunner(fused, "fused PyTorch", "fused") as rf:
            time_pair("torch", ru, rf)
    finally:
        torch.set_num_threads(threads)
    ort = backend if isinstance(backend, OnnxRuntimeBackend) else OnnxRuntimeBackend()
    info: dict[str, Any] = {"fused_nodes": len(onnx.load(str(spec.onnx("fused", "fp32"))).graph.node)}
    with tempfile.TemporaryDirectory() as tmp:
        path, info["unfused_nodes"], note = _unfused_onnx(adapted, X[:1], ed.opset, Path(tmp))
        info["status"] = note or "exported and timed on ONNX Runtime (FP32) against fused.onnx"
        if path is not None:
            info["unfused_nodes_after_ort_folding"] = _nodes_after_ort_folding(path, Path(tmp))
            # The same folding on fused.onnx, for a like-for-like count (it folds e.g. Clip's Constant bounds too).
            info["fused_nodes_after_ort_folding"] = _nodes_after_ort_folding(spec.onnx("fused", "fp32"), Path(tmp))
            with OnnxRuntimeRunner(path, "unfused", "fp32", ort.providers, ed.input_name, ed.output_name) as ru, \
                    ort.runner(spec, "fused", "fp32") as rf:
                time_pair("onnxruntime", ru, rf)
        else:
            ratio["onnxruntime"] = None
            _log(echo, f"note: unfused adapted model {note}; timed in PyTorch only")
    return {"unfused_latency_ratio": ratio, "unfused_latency_ms": ms, "unfused_onnx": info, "unfused_iterations": iters,
            "torch_threads": TORCH_TIMING_THREADS}


def verify(engine_dir: Path | str, engine: str = "auto", echo=print, iterations: int | None = None,
           warmup: int | None = None) -> dict[str, Any]:
    """Run every check, write verify_report.json and verify_junit.xml, print a summary; returns the report.
    Raises ParityError (exit 1) naming the failed checks, EdgetoolError (exit 2) for bad input/environment."""
    t_start = time.perf_counter()
    engine_dir = Path(engine_dir)
    if engine_dir.is_dir():
        # Reports left from an earlier run must not stand for this one if it stops early (exit 2), whatever
        # stops it (an incomplete ENGINE_DIR included): a CI collector reads the JUnit file regardless.
        if not os.access(engine_dir, os.W_OK | os.X_OK):
            raise EdgetoolError(f"ENGINE_DIR {engine_dir} is not writable (verify writes {REPORT_NAME} and "
                                f"{JUNIT_NAME} there)")
        for stale in (REPORT_NAME, JUNIT_NAME):
            (engine_dir / stale).unlink(missing_ok=True)
    ed = read_engine_dir(engine_dir)
    backend, selection = select_backend(engine)
    _log(echo, f"engine: {backend.name} ({selection})")

    from .adapt import load_run
    from .fuse import fuse_model

    run = load_run(ed.run_dir)
    cfg = run.recipe.verify.model_copy()
    if iterations is not None:
        cfg.iterations = iterations
    if warmup is not None:
        cfg.warmup = warmup
    batch_sizes = sorted(set(cfg.batch_sizes))
    if not batch_sizes or any(b <= 0 for b in batch_sizes):
        raise EdgetoolError(f"recipe field 'verify.batch_sizes' must list positive sizes, got {cfg.batch_sizes}")
    test = run.data.target_test
    if tuple(test.X.shape[1:]) != ed.input_shape:
        raise EdgetoolError(f"the run's target data is shaped {tuple(test.X.shape[1:])} but the engines expect "
                            f"{ed.input_shape}: ENGINE_DIR was exported from another run")
    adapted = run.adapted.eval()
    fused = fuse_model(run.method, run.adapted)
    spec = GraphSpec(ed.path, ed.input_name, ed.output_name, ed.input_shape, max_batch=max(batch_sizes),
                     opt_batch=max(batch_sizes))
    with TorchRunner(fused, "fused PyTorch", "fused") as r:
        torch_out = r.infer_batched(test.X, spec.max_batch)

    phase_seconds = {"load": time.perf_counter() - t_start}
    accuracy, checks = _accuracy_phase(backend, spec, test, torch_out, cfg, echo)
    checks += structure_checks(spec)
    phase_seconds["accuracy"] = time.perf_counter() - t_start - sum(phase_seconds.values())
    latency, band, lat_checks = _latency_phase(backend, spec, test.X, batch_sizes, cfg, echo)
    checks += lat_checks
    if band.widened:
        _log(echo, f"note: {band.reason}")
    phase_seconds["latency"] = time.perf_counter() - t_start - sum(phase_seconds.values())
    unfused = _unfused_phase(adapted, fused, backend, spec, ed, test.X, batch_sizes, cfg, echo)
    phase_seconds["unfused"] = time.perf_counter() - t_start - sum(phase_seconds.values())

    failed = [c.name for c in checks if not c.passed]
    changed = changed_since_export(ed)
    if changed:
        _log(echo, f"note: {', '.join(changed)} changed since fuse-export wrote fuse_report.json")
    # The headline figures are those of the precision the backend deploys (the one whose latency is timed).
    headline = accuracy.get(latency["latency_precision"]) or next(iter(accuracy.values()))
    report: dict[str, Any] = {
        "engine": backend.name,
        "engine_selection": selection,
        "backend": backend.describe(),
        "precision": headline.precision,
        "passed": not failed,
        "failed_checks": failed,
        "argmax_agreement": headline.argmax_agreement,
        "f1_torch": headline.f1_torch,
        "f1_engine": headline.f1_engine,
        "max_abs_error": headline.max_abs_error,
        "accuracy": {p: asdict(a) for p, a in accuracy.items()},
        **latency,
        "unfused_latency_ratio": unfused["unfused_latency_ratio"],
        "unfused_latency_ms": unfused["unfused_latency_ms"],
        "unfused_onnx": unfused["unfused_onnx"],
        "timing": {"warmup": cfg.warmup, "iterations": cfg.iterations, "unfused_iterations": unfused["unfused_iterations"],
                   "torch_threads": unfused["torch_threads"], "batch_sizes": batch_sizes,
                   "order": "round-robin original, fused, control (rotating each round); host-to-host wall clock"},
        "test_windows": len(test),
        "changed_since_export": changed,
        "checks": [asdict(c) for c in checks],
        "engine_dir": str(ed.path.resolve()),
        "run_dir": str(ed.run_dir),
        "seconds": time.perf_counter() - t_start,
        "phase_seconds": phase_seconds,
    }
    atomic_write_json(ed.path / REPORT_NAME, report)
    atomic_write_bytes(ed.path / JUNIT_NAME, junit_xml(checks, "edgetool.verify", {
        "engine": backend.name, "precision": headline.precision, "engine_dir": str(ed.path.resolve())}))
    _log(echo, summary(report, checks, ed.path))
    if failed:
        first = next(c for c in checks if not c.passed)
        raise ParityError(f"parity check failed: {', '.join(failed)} ({first.message}); see {ed.path / REPORT_NAME}")
    return report


def summary(report: dict[str, Any], checks: list[Check], engine_dir: Path) -> str:
    lines = []
    for c in checks:
        if c.name.startswith("structure."):
            lines.append(f"structure {c.name.split('.')[1]}: {c.message}  {'PASS' if c.passed else 'FAIL'}")
    for p, a in report["accuracy"].items():
        ok = all(c.passed for c in checks if c.name.startswith(f"accuracy.{p}."))
        lines.append(f"accuracy {p}: argmax agreement {a['argmax_agreement']:.3f}, macro-F1 PyTorch {a['f1_torch']:.3f} "
                     f"engine {a['f1_engine']:.3f}, max |error| {a['max_abs_error']:.2g} (atol {a['atol']:g}, "
                     f"rtol {a['rtol']:g})  {'PASS' if ok else 'FAIL'}")
    band = report["latency_band"]
    for c in checks:
        if not c.name.startswith("latency."):
            continue
        bs = c.name.split("_")[-1]
        o, f = report["latency_ms"]["original"][bs], report["latency_ms"]["fused"][bs]
        lines.append(f"latency {report['latency_precision']} batch {bs}: original p50/p90/p99 {o['p50']:.3f}/{o['p90']:.3f}/"
                     f"{o['p99']:.3f} ms, fused {f['p50']:.3f}/{f['p90']:.3f}/{f['p99']:.3f} ms, ratio "
                     f"{report['latency_ratio'][bs]:.3f} (band +/-{100 * band['effective']:.2f} %"
                     f"{', widened' if band['widened'] else ''}; control {report['latency_control'][bs]['ratio']:.3f})  "
                     f"{'PASS' if c.passed else 'FAIL'}")
    saved = []
    for rt, ratios in report["unfused_latency_ratio"].items():
        if ratios:
            saved.append(f"{rt} " + ", ".join(f"batch {b}: x{r:.2f}" for b, r in ratios.items()))
    if saved:
        u = report["unfused_onnx"]
        folded = (f" (ONNX Runtime constant-folds the unfused graph's adapter at load: {u['unfused_nodes']} -> "
                  f"{u['unfused_nodes_after_ort_folding']} nodes; fused.onnx {u['fused_nodes']} -> "
                  f"{u['fused_nodes_after_ort_folding']})"
                  if "unfused_nodes_after_ort_folding" in u else "")
        lines.append("unfused adapted / fused median latency: " + "; ".join(saved) + folded)
    n_fail = len(report["failed_checks"])
    verdict = "PASSED" if not n_fail else f"FAILED ({n_fail} of {len(checks)}: {', '.join(report['failed_checks'])})"
    lines.append(f"{verdict}: {len(checks)} checks -> {engine_dir / REPORT_NAME}, {engine_dir / JUNIT_NAME}")
    return "\n".join(lines)


@click.command("verify")
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True,
              help="Backend: TensorRT FP16 engines, ONNX Runtime (FP32 + FP16 graphs), or auto (TensorRT when it and "
                   "a CUDA device are usable).")
@click.option("--iterations", type=click.IntRange(min=1), help="Override verify.iterations (timed runs per engine and batch).")
@click.option("--warmup", type=click.IntRange(min=0), help="Override verify.warmup.")
@reports_errors
def cli_command(engine_dir: Path, engine: str, iterations: int | None, warmup: int | None) -> None:
    """Prove the fused engine matches the fused PyTorch model (accuracy) and the original engine (latency).

    Writes ENGINE_DIR/verify_report.json and verify_junit.xml. Exit 0 pass, 1 a parity check failed,
    2 bad input or environment (e.g. TensorRT not installed)."""
    verify(engine_dir, engine, echo=_cli_echo, iterations=iterations, warmup=warmup)

"""Stage `verify`: the fused model, as an engine, is as accurate as the fused PyTorch model and exactly
as fast as the original model's engine.

Checks (each one a JUnit testcase; any failure -> exit 1 naming it):
  accuracy.<precision>.argmax_agreement  fused engine vs fused PyTorch on the target test split
  accuracy.<precision>.f1_delta          |macro-F1(engine) - macro-F1(PyTorch)|
  accuracy.<precision>.output_error      Polygraphy's elementwise atol/rtol comparison of the logits
  latency.batch_<n>                      median(fused) / median(original) within 1 +/- band
  structure.engine_layers_identical      (TensorRT) both engines' layers, precisions and tactics, layer by layer
Precisions: what the backend runs (ONNX Runtime: the FP32 and the FP16 graph; TensorRT: FP16 engines),
with the recipe's FP32 or FP16 tolerances.


The statistics and the latency band are in toolchain.parity.

Outputs (atomic): ENGINE_DIR/verify_report.json, ENGINE_DIR/verify_junit.xml, and a terminal summary.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import select_backend
from ..backends.base import BACKENDS, Backend, Runner
from ..backends.engine_inspect import compare_engine_layers
from ..backends.timing import interleaved_rounds
from ..backends.onnxruntime import ort_session
from ..backends.pytorch import TorchRunner
from ..enginedir import VERIFY_JUNIT, VERIFY_REPORT, EngineDir, changed_since_export, read_engine_dir
from ..errors import EdgetoolError, ParityError
from ..export import compare_graph_structure, export_onnx
from ..fusion import fuse_model
from ..parity import (AccuracyResult, BandDecision, Check, ControlNoise, accuracy_parity, control_noise, decide_band,
                      interleaved_timings, junit_xml, latency_checks, latency_input, latency_stats)
from ..recipe import VerifyConfig
from ..rundir import evaluation_inputs, load_run

# One intra-op thread while timing eager PyTorch: its OpenMP pool spin-waits, and on a loaded machine a
# multi-thread pool drowned the difference being measured. Both models get the same setting; restored after.
TORCH_TIMING_THREADS = 1


def _log(echo, msg: str) -> None:
    if echo is not None:
        echo(msg)


def _unfused_onnx(adapted, sample: np.ndarray, opset: int, tmp: Path) -> tuple[Path | None, int, str]:
    """Export the unfused adapted model (adapter modules still in the graph), if the exporter can:
    (path, node count, "") or (None, 0, why not)."""
    try:
        import torch

        path = tmp / "unfused.onnx"
        proto = export_onnx(adapted, torch.from_numpy(sample), path, opset)
        return path, len(proto.graph.node), ""
    except Exception as exc:  # any exporter failure just means "not exportable"; it is reported, not fatal
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, 0, f"not exportable to ONNX: {type(exc).__name__}: {first[:200]}"


def structure_checks(ed: EngineDir) -> list[Check]:
    """Latency parity rests on original and fused being the same graph. fuse-export proved it when it
    wrote them; prove it again on the files verify times, since files in ENGINE_DIR can be swapped."""
    checks = []
    for precision in ("fp32", "fp16"):
        rep = compare_graph_structure(ed.onnx("original", precision), ed.onnx("fused", precision))
        msg = ("original and fused graphs: same nodes, attributes, I/O and initializer names/shapes/dtypes"
               if rep.identical else "; ".join(rep.differences[:3]))
        checks.append(Check(f"structure.{precision}.graph_identical", rep.identical, msg))
    return checks


def engine_structure_checks(backend: Backend, ed: EngineDir, batch_sizes: tuple[int, ...],
                            echo) -> tuple[list[Check], dict[str, Any]]:
    """The primary proof of zero overhead on a backend that builds engines (TensorRT): the original and
    fused engines, as built, have the same layers, types, tensor formats/precisions and tactics at every
    timed batch size (from TensorRT's engine inspector). Latency confirms it. No check elsewhere."""
    t0 = time.perf_counter()
    layers = backend.engine_layers(ed, batch_sizes, echo)
    if layers is None:
        return [], {}
    compared = {bs: compare_engine_layers(layers["original"][bs], layers["fused"][bs]) for bs in batch_sizes}
    problems = [f"batch {bs}: {c.summary()}" for bs, c in compared.items() if not c.identical]
    msg = "; ".join(problems) if problems else (
        f"original and fused engines: {compared[batch_sizes[0]].summary()}, at batch {', '.join(map(str, batch_sizes))}")
    figures = {str(bs): {"identical": c.identical, "layers": list(c.layers), "precisions": c.precisions,
                         "differences": c.differences} for bs, c in compared.items()}
    return [Check("structure.engine_layers_identical", not problems, msg, time.perf_counter() - t0)], figures


def _timed_rounds(runners: dict[str, Runner], x: np.ndarray, cfg: VerifyConfig) -> dict[str, np.ndarray]:
    """Per-round seconds of each runner on its own clock (see Runner.time_batch), interleaved."""
    return interleaved_rounds(runners, x, cfg.warmup, cfg.iterations, cfg.warmup_seconds, cfg.min_seconds)


def _timing_context(backend: Backend, runners: dict[str, Runner], ed: EngineDir, batch_sizes: tuple[int, ...],
                    echo) -> dict[str, Any]:
    """How the latency figures were taken and on what: each runner's clock, the device state (a Jetson's
    power mode and clocks) and an independent timing of the same engines where one exists (trtexec)."""
    return {"latency_clock": next(iter(runners.values())).clock,
            "latency_timing": {n: r.timing_report() for n, r in runners.items()},
            "device_state": backend.device_state(),
            "latency_crosscheck": backend.latency_crosscheck(ed, batch_sizes, echo)}


def _accuracy_phase(backend: Backend, ed: EngineDir, batch_sizes: tuple[int, ...], test, torch_out: np.ndarray, cfg: VerifyConfig,
                    echo) -> tuple[dict[str, AccuracyResult], list[Check]]:
    accuracy: dict[str, AccuracyResult] = {}
    checks: list[Check] = []
    for precision in backend.accuracy_precisions():
        t0 = time.perf_counter()
        with backend.runner(ed, "fused", precision, batch_sizes, echo) as r:
            engine_out = r.infer_batched(test.X, max(batch_sizes))
        res, cks = accuracy_parity(engine_out, torch_out, test.y, precision, cfg)
        res.executed_as = backend.executed_as(precision)
        for c in cks:
            c.seconds = (time.perf_counter() - t0) / len(cks)
        accuracy[precision] = res
        checks += cks
    return accuracy, checks


def _latency_phase(backend: Backend, ed: EngineDir, X: np.ndarray, batch_sizes: tuple[int, ...], cfg: VerifyConfig,
                   echo) -> tuple[dict[str, Any], BandDecision, list[Check]]:
    """Original (A), fused (B) and control (A', a second instance of the original) interleaved."""
    precision = backend.latency_precision()
    latency_ms: dict[str, dict[str, dict[str, float]]] = {"original": {}, "fused": {}, "control": {}}
    ratios: dict[int, float] = {}
    control: dict[int, ControlNoise] = {}
    t0 = time.perf_counter()
    runners = {"original": backend.runner(ed, "original", precision, batch_sizes, echo),
               "fused": backend.runner(ed, "fused", precision, batch_sizes, echo),
               "control": backend.runner(ed, "original", precision, batch_sizes, echo)}
    try:
        for r in runners.values():
            r.activate()
        for bs in batch_sizes:
            times = _timed_rounds(runners, latency_input(X, bs), cfg)
            for n, t in times.items():
                latency_ms[n][str(bs)] = latency_stats(t)
            ratios[bs] = latency_ms["fused"][str(bs)]["p50"] / latency_ms["original"][str(bs)]["p50"]
            control[bs] = control_noise(times["original"], times["control"])
        context = _timing_context(backend, runners, ed, batch_sizes, echo)
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
        **context,
    }
    return figures, band, checks


def _nodes_after_ort_folding(path: Path, tmp: Path) -> int:
    """Node count of `path` after ONNX Runtime's basic (constant-folding) optimisations: it folds an
    adapter whose factors are constants back into the conv weights at session load, which is why the
    unfused graph costs about the same as the fused one on ONNX Runtime (eager PyTorch has no such pass)."""
    import onnx

    optimized = tmp / f"{path.stem}.ort-basic.onnx"
    ort_session(path, optimization="basic", optimized_model_path=optimized)
    return len(onnx.load(str(optimized)).graph.node)


def _unfused_phase(adapted, fused, backend: Backend, ed: EngineDir, X: np.ndarray,
                   batch_sizes: tuple[int, ...], cfg: VerifyConfig, echo) -> dict[str, Any]:
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

    # See TORCH_TIMING_THREADS.
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_TIMING_THREADS)
    try:
        with TorchRunner(adapted, "unfused PyTorch", "unfused") as ru, TorchRunner(fused, "fused PyTorch", "fused") as rf:
            time_pair("torch", ru, rf)
    finally:
        torch.set_num_threads(threads)
    # The unfused graph runs on this backend when it can run a loose FP32 file; else on ONNX Runtime.
    timing = backend if backend.file_runner(ed.onnx("fused", "fp32"), "probe", ed) is not None else BACKENDS["onnxruntime"]()
    info: dict[str, Any] = {"fused_nodes": len(onnx.load(str(ed.onnx("fused", "fp32"))).graph.node)}
    with tempfile.TemporaryDirectory() as tmp:
        path, info["unfused_nodes"], note = _unfused_onnx(adapted, X[:1], ed.opset, Path(tmp))
        info["status"] = note or "exported and timed on ONNX Runtime (FP32) against fused.onnx"
        if path is not None:
            info["unfused_nodes_after_ort_folding"] = _nodes_after_ort_folding(path, Path(tmp))
            # The same folding on fused.onnx, for a like-for-like count (it folds e.g. Clip's Constant bounds too).
            info["fused_nodes_after_ort_folding"] = _nodes_after_ort_folding(ed.onnx("fused", "fp32"), Path(tmp))
            with timing.file_runner(path, "unfused", ed) as ru, timing.runner(ed, "fused", "fp32", batch_sizes) as rf:
                time_pair("onnxruntime", ru, rf)
        else:
            ratio["onnxruntime"] = None
            _log(echo, f"note: unfused adapted model {note}; timed in PyTorch only")
    return {"unfused_latency_ratio": ratio, "unfused_latency_ms": ms, "unfused_onnx": info, "unfused_iterations": iters,
            "torch_threads": TORCH_TIMING_THREADS}


def verify(engine_dir: Path | str, engine: str = "auto", echo=print, iterations: int | None = None,
           warmup: int | None = None, trt_build: str | None = None,
           inputs: Path | str | None = None) -> dict[str, Any]:
    """Run every check, write verify_report.json and verify_junit.xml, print a summary; returns the report.
    Raises ParityError (exit 1) naming the failed checks, EdgetoolError (exit 2) for bad input/environment.
    `trt_build`: how TensorRT builds its engines (toolchain.backends.trtplan.BUILD_MODES). Without the run's
    data, checks run on seeded random windows plus `inputs` (an .npz with `X`)."""
    t_start = time.perf_counter()
    engine_dir = Path(engine_dir)
    if engine_dir.is_dir():
        # Reports left from an earlier run must not stand for this one if it stops early (exit 2), whatever
        # stops it (an incomplete ENGINE_DIR included): a CI collector reads the JUnit file regardless.
        if not os.access(engine_dir, os.W_OK | os.X_OK):
            raise EdgetoolError(f"ENGINE_DIR {engine_dir} is not writable (verify writes {VERIFY_REPORT} and "
                                f"{VERIFY_JUNIT} there)")
        for stale in (VERIFY_REPORT, VERIFY_JUNIT):
            (engine_dir / stale).unlink(missing_ok=True)
    ed = read_engine_dir(engine_dir)
    backend, selection = select_backend(engine)
    _log(echo, f"engine: {backend.name} ({selection})")
    _apply_trt_build(backend, trt_build, echo)

    run = load_run(ed.run_dir, echo=echo)
    cfg = run.recipe.verify.model_copy()
    if iterations is not None:
        cfg.iterations = iterations
    if warmup is not None:
        cfg.warmup = warmup
    batch_sizes = tuple(sorted(set(cfg.batch_sizes)))
    if not batch_sizes or any(b <= 0 for b in batch_sizes):
        raise EdgetoolError(f"recipe field 'verify.batch_sizes' must list positive sizes, got {cfg.batch_sizes}")
    test = evaluation_inputs(run, inputs if run.data is None else None)
    for note in test.notes:
        _log(echo, f"note: {note}")
    if inputs is not None and run.data is not None:
        _log(echo, "note: --inputs not used: the run's data is here, so the target test split is")
    if tuple(test.X.shape[1:]) != ed.input_shape:
        raise EdgetoolError(f"the run's target data is shaped {tuple(test.X.shape[1:])} but the engines expect "
                            f"{ed.input_shape}: ENGINE_DIR was exported from another run")
    adapted = run.adapted.eval()
    fused = fuse_model(run.method, run.adapted)
    with TorchRunner(fused, "fused PyTorch", "fused") as r:
        torch_out = r.infer_batched(test.X, max(batch_sizes))

    phase_seconds = {"load": time.perf_counter() - t_start}
    accuracy, checks = _accuracy_phase(backend, ed, batch_sizes, test, torch_out, cfg, echo)
    checks += structure_checks(ed)
    engine_checks, engine_layers = engine_structure_checks(backend, ed, batch_sizes, echo)
    checks += engine_checks
    phase_seconds["accuracy"] = time.perf_counter() - t_start - sum(phase_seconds.values())
    latency, band, lat_checks = _latency_phase(backend, ed, test.X, batch_sizes, cfg, echo)
    checks += lat_checks
    if band.widened:
        _log(echo, f"note: {band.reason}")
    phase_seconds["latency"] = time.perf_counter() - t_start - sum(phase_seconds.values())
    unfused = _unfused_phase(adapted, fused, backend, ed, test.X, batch_sizes, cfg, echo)
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
        "engine_layers": engine_layers,
        "timing": {"warmup": cfg.warmup, "iterations": cfg.iterations, "unfused_iterations": unfused["unfused_iterations"],
                   "torch_threads": unfused["torch_threads"], "batch_sizes": batch_sizes,
                   "warmup_seconds": cfg.warmup_seconds, "min_seconds": cfg.min_seconds,
                   "order": "round-robin original, fused, control (rotating each round); clock: see latency_clock"},
        "test_windows": len(test),
        "data_available": test.data_available,
        "inputs": test.counts,
        "changed_since_export": changed,
        "checks": [asdict(c) for c in checks],
        "engine_dir": str(ed.path.resolve()),
        "run_dir": str(ed.run_dir),
        "seconds": time.perf_counter() - t_start,
        "phase_seconds": phase_seconds,
    }
    ed.write_verify_reports(report, junit_xml(checks, "edgetool.verify", {
        "engine": backend.name, "precision": headline.precision, "engine_dir": str(ed.path.resolve())}))
    _log(echo, summary(report, checks, ed.path))
    if failed:
        first = next(c for c in checks if not c.passed)
        raise ParityError(f"parity check failed: {', '.join(failed)} ({first.message}); see {ed.report_path}")
    return report


def _apply_trt_build(backend: Backend, trt_build: str | None, echo) -> None:
    if trt_build is None:
        return
    if backend.name == "tensorrt":
        backend.build = trt_build
    else:
        _log(echo, f"note: --trt-build {trt_build} ignored: the engine is {backend.name}")


def summary(report: dict[str, Any], checks: list[Check], engine_dir: Path) -> str:
    lines = []
    for c in checks:
        if c.name.startswith("structure."):
            lines.append(f"structure {c.name.split('.')[1]}: {c.message}  {'PASS' if c.passed else 'FAIL'}")
    for p, a in report["accuracy"].items():
        ok = all(c.passed for c in checks if c.name.startswith(f"accuracy.{p}."))
        f1 = ("macro-F1 n/a (no labelled data)" if a["f1_torch"] is None
              else f"macro-F1 PyTorch {a['f1_torch']:.3f} engine {a['f1_engine']:.3f}")
        lines.append(f"accuracy {p}: argmax agreement {a['argmax_agreement']:.3f}, {f1}, max |error| {a['max_abs_error']:.2g} (atol {a['atol']:g}, "
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
    lines.append(f"{verdict}: {len(checks)} checks -> {engine_dir / VERIFY_REPORT}, {engine_dir / VERIFY_JUNIT}")
    return "\n".join(lines)

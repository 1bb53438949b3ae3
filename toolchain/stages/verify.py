"""Stage `verify`: the fused model, as an engine, is as accurate as the fused PyTorch model (next to the
original engine against the original model) and costs what the original model's engine costs.

Checks (each one a JUnit testcase; a failure -> exit 1 naming it):
  integrity.<file>                       each exported file still has the sha256 fuse-export sealed
                                         (--allow-modified: a warning instead)
  accuracy.<precision>.argmax_agreement  fused engine vs fused PyTorch on the target test split
  accuracy.<precision>.f1_delta          |macro-F1(engine) - macro-F1(PyTorch)|
  accuracy.<precision>.output_error      scaled error within error_margin x the original engine's + floor
  accuracy.<precision>.original_engine   the original engine vs the original PyTorch model, by the same rules
                                         (a wrong original.onnx fails even under --allow-modified)
  structure.<precision>.graph_identical  original and fused graphs still node-for-node identical
  structure.<precision>.runtime_graph_identical  ... and so are the graphs the backend will execute, where it
                                         exposes them (ONNX Runtime's optimised graphs)
  structure.engine_layers_identical      (TensorRT) both engines' layers, precisions and tactics, layer by layer
  latency.batch_<n>                      pass / fail / inconclusive (toolchain.proof.parity.latency_verdict);
                                         inconclusive never fails the run and is never called a pass
Precisions: what the backend runs (ONNX Runtime: the FP32 and the FP16 graph; TensorRT: FP16 engines).

Outputs: ENGINE_DIR/verify_report.json and verify_junit.xml, written together and only when every check
ran (exit 0 or 1); a run that stops early (exit 2) leaves earlier reports in place. The report records
the sha256 of the engine files it verified, so a reader can tell whether it describes the files there now.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..console import say, say_notes
from ..backends import select_backend
from ..backends.base import Backend, Runner
from ..backends.engine_inspect import compare_engine_layers
from ..backends.timing import interleaved_rounds
from ..enginedir import (FUSE_REPORT, VERIFY_JUNIT, VERIFY_REPORT, EngineDir, changed_since_export, engine_file_hashes,
                         integrity_problems, read_engine_dir)
from ..errors import EdgetoolError, ParityError
from ..metrics import predict_logits
from ..proof.export import compare_graph_structure, compare_runtime_graphs
from ..proof.fusion import fuse_model
from ..proof.parity import (FAIL, INCONCLUSIVE, NOISE_FACTOR, PASS, WARNING, AccuracyResult, Check, LatencyVerdict,
                      accuracy_parity, check, criteria, junit_xml, latency_input, latency_stats,
                      latency_verdict, original_engine_check)
from ..recipe import VerifyConfig
from ..proof.unfused import unfused_comparison
from ..rundir import AdaptedRun, evaluation_inputs, load_run


def structure_checks(ed: EngineDir, backend: Backend) -> list[Check]:
    """Latency parity rests on original and fused being the same graph. fuse-export proved it when it
    wrote them; prove it again on the files verify times, and on the graphs the backend will execute
    where it exposes them (ONNX Runtime's optimised graphs), since a runtime's choices follow the graph."""
    checks = []
    same = "same nodes, attributes, I/O and initializer names/shapes/dtypes"
    for precision in ("fp32", "fp16"):
        rep = compare_graph_structure(ed.onnx("original", precision), ed.onnx("fused", precision))
        msg = f"original and fused graphs: {same}" if rep.identical else "; ".join(rep.differences[:3])
        checks.append(check(f"structure.{precision}.graph_identical", rep.identical, msg))
    with tempfile.TemporaryDirectory() as tmp:
        for precision in backend.accuracy_precisions():
            paths = [backend.runtime_graph(ed, g, precision, Path(tmp)) for g in ("original", "fused")]
            if None in paths:
                continue
            graphs = [onnx.load(str(p)) for p in paths]
            # Name-free and order-free: the runtime names the nodes it inserts from a counter and lists
            # independent nodes in an order that varies between loads of one file (ORT's NCHWc transformer).
            rep = compare_runtime_graphs(*graphs)
            n = len(graphs[0].graph.node)
            msg = (f"as {backend.name} will run them ({n} nodes after its optimisations): same ops, attributes, "
                   "edges, I/O and weight shapes (the runtime's generated names and node order aside)" if rep.identical
                   else f"{backend.name} optimises original and fused differently: " + "; ".join(rep.differences[:3]))
            checks.append(check(f"structure.{precision}.runtime_graph_identical", rep.identical, msg))
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
    c = check("structure.engine_layers_identical", not problems, msg)
    c.seconds = time.perf_counter() - t0
    return [c], figures


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


def integrity_checks(ed: EngineDir, hashes: dict[str, str], allow_modified: bool) -> list[Check]:
    """One check per exported file: its sha256 is the one fuse-export sealed. Fails closed (a file with
    no recorded hash fails too); --allow-modified turns a mismatch into a warning."""
    problems = integrity_problems(ed, hashes)
    checks = []
    for name in hashes:
        if name not in problems:
            checks.append(Check(f"integrity.{name}", PASS, f"{name}: sha256 {hashes[name][:12]} as sealed in {FUSE_REPORT}"))
        elif allow_modified:
            checks.append(Check(f"integrity.{name}", WARNING, f"{problems[name]}; allowed by --allow-modified"))
        else:
            checks.append(Check(f"integrity.{name}", FAIL, f"{problems[name]}: these are not the files fuse-export "
                                "proved; rerun `edgetool fuse-export`, or pass --allow-modified if you edited it on purpose"))
    return checks


def _accuracy_phase(backend: Backend, ed: EngineDir, batch_sizes: tuple[int, ...], test, torch_out: dict[str, np.ndarray],
                    cfg: VerifyConfig, echo) -> tuple[dict[str, AccuracyResult], list[Check]]:
    """Per precision: the fused engine against the fused PyTorch model, next to the original engine against
    the original PyTorch model on the same inputs (the baseline of the output-error check)."""
    accuracy: dict[str, AccuracyResult] = {}
    checks: list[Check] = []
    for precision in backend.accuracy_precisions():
        t0 = time.perf_counter()
        out = {}
        for graph in ("fused", "original"):
            with backend.runner(ed, graph, precision, batch_sizes, echo) as r:
                out[graph] = r.infer_batched(test.X, max(batch_sizes))
        res, cks = accuracy_parity(out["fused"], torch_out["fused"], out["original"], torch_out["original"], test.y,
                                   precision, criteria(cfg, precision))
        res.executed_as = backend.executed_as(precision)
        cks.append(original_engine_check(res, ed.onnx("original", precision).name))
        for c in cks:
            c.seconds = (time.perf_counter() - t0) / len(cks)
        accuracy[precision] = res
        checks += cks
    return accuracy, checks


def _latency_phase(backend: Backend, ed: EngineDir, X: np.ndarray, batch_sizes: tuple[int, ...], cfg: VerifyConfig,
                   echo) -> tuple[dict[str, Any], list[Check]]:
    """Original (A), fused (B) and control (A', a second instance of the original) interleaved; one
    verdict per batch size from the per-round seconds."""
    precision = backend.latency_precision()
    latency_ms: dict[str, dict[str, dict[str, float]]] = {"original": {}, "fused": {}, "control": {}}
    rounds_ms: dict[str, dict[str, list[float]]] = {}
    verdicts: dict[int, LatencyVerdict] = {}
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
            rounds_ms[str(bs)] = {n: [round(float(v) * 1e3, 6) for v in t] for n, t in times.items()}
            verdicts[bs] = latency_verdict(times["original"], times["fused"], times["control"], cfg.latency_band,
                                           cfg.latency_band_max, cfg.latency_confidence)
        context = _timing_context(backend, runners, ed, batch_sizes, echo)
    finally:
        for r in runners.values():
            r.deactivate()
    checks = [Check(f"latency.batch_{bs}", v.verdict, f"{precision} batch {bs}: {v.reason}") for bs, v in verdicts.items()]
    for c in checks:
        c.seconds = (time.perf_counter() - t0) / len(checks)
    figures = {
        "latency_precision": precision,
        "latency_ms": latency_ms,
        "latency_ratio": {str(b): v.ratio for b, v in verdicts.items()},
        "latency_verdict": {str(b): asdict(v) for b, v in verdicts.items()},
        "latency_band": {"requested": cfg.latency_band, "max": cfg.latency_band_max,
                         "confidence": cfg.latency_confidence, "noise_factor": NOISE_FACTOR},
        "latency_rounds_ms": rounds_ms,
        **context,
    }
    return figures, checks


def _warnings(run: AdaptedRun, cfg: VerifyConfig) -> list[str]:
    """What the user should know that no check decides."""
    out = []
    before, after = run.metrics.get("f1_before"), run.metrics.get("f1_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after < before:
        out.append(f"adaptation lowered the target macro-F1 ({before:.3f} -> {after:.3f}, {run.path / 'metrics.json'}): "
                   "the fused engine matches an adapted model that is worse than the original on the target test split")
    unused = cfg.unused_fields()
    if unused:
        out.append(f"recipe field(s) {', '.join('verify.' + f for f in unused)} are no longer used: output error is "
                   "judged against the original engine's (verify.error_margin, error_floor, fp16_error_floor)")
    return out


def verify(engine_dir: Path | str, engine: str = "auto", echo=print, iterations: int | None = None,
           warmup: int | None = None, trt_build: str | None = None, inputs: Path | str | None = None,
           allow_modified: bool = False) -> dict[str, Any]:
    """Run every check, write verify_report.json and verify_junit.xml, print a summary; returns the report.
    Raises ParityError (exit 1) naming the failed checks, EdgetoolError (exit 2) for bad input/environment
    (then no report is written, and earlier ones stay). `trt_build`: how TensorRT builds its engines
    (toolchain.backends.trtplan.BUILD_MODES). Without the run's data, checks run on seeded random windows plus
    `inputs` (an .npz with `X`)."""
    t_start = time.perf_counter()
    ed = _open_engine_dir(engine_dir)
    hashes = engine_file_hashes(ed)
    checks = integrity_checks(ed, hashes, allow_modified)
    backend, selection = select_backend(engine)
    say(echo, f"engine: {backend.name} ({selection})")
    _apply_trt_build(backend, trt_build, echo)
    run, cfg, batch_sizes, test = _load_run_and_inputs(ed, iterations, warmup, inputs, echo)
    warnings = _warnings(run, cfg) + [c.message for c in checks if c.verdict == WARNING]
    fused = fuse_model(run.method, run.adapted)
    torch_out = {g: predict_logits(m, test.X, max(batch_sizes)) for g, m in (("fused", fused), ("original", run.original))}

    phase_seconds = {"load": time.perf_counter() - t_start}
    accuracy, acc_checks = _accuracy_phase(backend, ed, batch_sizes, test, torch_out, cfg, echo)
    checks += acc_checks + structure_checks(ed, backend)
    engine_checks, engine_layers = engine_structure_checks(backend, ed, batch_sizes, echo)
    checks += engine_checks
    phase_seconds["accuracy"] = time.perf_counter() - t_start - sum(phase_seconds.values())
    latency, lat_checks = _latency_phase(backend, ed, test.X, batch_sizes, cfg, echo)
    checks += lat_checks
    phase_seconds["latency"] = time.perf_counter() - t_start - sum(phase_seconds.values())
    unfused = unfused_comparison(run.adapted.eval(), fused, backend, ed, test.X, batch_sizes, cfg, echo)
    phase_seconds["unfused"] = time.perf_counter() - t_start - sum(phase_seconds.values())

    report = _report(backend, selection, checks, warnings, accuracy, latency, unfused, engine_layers, cfg,
                     batch_sizes, test, ed, hashes, allow_modified, t_start, phase_seconds)
    ed.write_verify_reports(report, junit_xml(checks, "edgetool.verify", {
        "engine": backend.name, "precision": report["precision"], "engine_dir": str(ed.path.resolve()),
        "verdict": report["verdict"], **{f"sha256.{f}": h for f, h in hashes.items()}}, warnings))
    say(echo, summary(report, checks, ed.path))
    if report["failed_checks"]:
        first = next(c for c in checks if c.failed)
        raise ParityError(f"parity check failed: {', '.join(report['failed_checks'])} ({first.message}); "
                          f"see {ed.report_path}")
    return report


def _open_engine_dir(engine_dir: Path | str) -> EngineDir:
    engine_dir = Path(engine_dir)
    if engine_dir.is_dir() and not os.access(engine_dir, os.W_OK | os.X_OK):
        raise EdgetoolError(f"ENGINE_DIR {engine_dir} is not writable (verify writes {VERIFY_REPORT} and "
                            f"{VERIFY_JUNIT} there)")
    return read_engine_dir(engine_dir)


def _load_run_and_inputs(ed: EngineDir, iterations: int | None, warmup: int | None, inputs, echo):
    """The run the engines came from, its verify settings (with the CLI's overrides) and the inputs to
    check on: the target test split, or without the data seeded windows plus `inputs`."""
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
    say_notes(echo, test.notes)
    if inputs is not None and run.data is not None:
        say(echo, "note: --inputs not used: the run's data is here, so verify checks on its target test split")
    if tuple(test.X.shape[1:]) != ed.input_shape:
        raise EdgetoolError(f"the run's target data is shaped {tuple(test.X.shape[1:])} but the engines expect "
                            f"{ed.input_shape}: ENGINE_DIR was exported from another run")
    return run, cfg, batch_sizes, test


def _report(backend: Backend, selection: str, checks: list[Check], warnings: list[str], accuracy, latency, unfused,
            engine_layers, cfg: VerifyConfig, batch_sizes, test, ed: EngineDir, hashes: dict[str, str],
            allow_modified: bool, t_start: float, phase_seconds: dict[str, float]) -> dict[str, Any]:
    failed = [c.name for c in checks if c.failed]
    inconclusive = [c.name for c in checks if c.verdict == INCONCLUSIVE]
    # The headline figures are those of the precision the backend deploys (the one whose latency is timed).
    headline = accuracy.get(latency["latency_precision"]) or next(iter(accuracy.values()))
    report: dict[str, Any] = {
        "engine": backend.name,
        "engine_selection": selection,
        "backend": backend.describe(),
        "precision": headline.precision,
        "passed": not failed,
        "verdict": "failed" if failed else ("passed, latency inconclusive" if inconclusive else "passed"),
        "failed_checks": failed,
        "inconclusive_checks": inconclusive,
        "warnings": warnings,
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
        # What this report describes: compare with the files in ENGINE_DIR now.
        "engine_files": hashes,
        "allow_modified": allow_modified,
        "changed_since_export": changed_since_export(ed, hashes),
        "checks": [c.as_dict() for c in checks],
        "engine_dir": str(ed.path.resolve()),
        "run_dir": str(ed.run_dir),
        "seconds": time.perf_counter() - t_start,
        "phase_seconds": phase_seconds,
    }
    return report


def _apply_trt_build(backend: Backend, trt_build: str | None, echo) -> None:
    if trt_build is None:
        return
    if backend.name == "tensorrt":
        backend.build = trt_build
    else:
        say(echo, f"note: --trt-build {trt_build} ignored: the engine is {backend.name}")


def summary(report: dict[str, Any], checks: list[Check], engine_dir: Path) -> str:
    word = {PASS: "PASS", FAIL: "FAIL", INCONCLUSIVE: "INCONCLUSIVE", WARNING: "WARNING"}
    lines = []
    integrity = [c for c in checks if c.name.startswith("integrity.")]
    if all(c.passed for c in integrity):
        lines.append(f"integrity: {', '.join(c.name.split('.', 1)[1] for c in integrity)} as fuse-export sealed them  PASS")
    for c in integrity:
        if not c.passed:
            lines.append(f"integrity {c.name.split('.', 1)[1]}: {c.message}  {word[c.verdict]}")
    for c in checks:
        if c.name.startswith("structure."):
            runtime = " (runtime)" if "runtime_graph" in c.name else ""
            lines.append(f"structure {c.name.split('.')[1]}{runtime}: {c.message}  {word[c.verdict]}")
    for p, a in report["accuracy"].items():
        ok = all(c.passed for c in checks if c.name.startswith(f"accuracy.{p}."))
        f1 = ("macro-F1 n/a (no labelled data)" if a["f1_torch"] is None
              else f"macro-F1 PyTorch {a['f1_torch']:.3f} engine {a['f1_engine']:.3f}")
        lines.append(f"accuracy {p}: argmax agreement {a['argmax_agreement']:.3f} (original engine "
                     f"{a['original_argmax_agreement']:.3f}), {f1}, max |error| {a['max_abs_error']:.2g} = "
                     f"{a['scaled_error']:.2g} of max |logit| (original engine {a['original_scaled_error']:.2g}; "
                     f"limit {a['error_limit']:.2g})  {'PASS' if ok else 'FAIL'}")
    for c in checks:
        if not c.name.startswith("latency."):
            continue
        bs = c.name.split("_")[-1]
        o, f, v = report["latency_ms"]["original"][bs], report["latency_ms"]["fused"][bs], report["latency_verdict"][bs]
        conf = f"{100 * v['confidence']:g} %"
        lines.append(f"latency {report['latency_precision']} batch {bs}: p50 original {o['p50']:.3f} ms, fused "
                     f"{f['p50']:.3f} ms; fused/original {v['ratio']:.3f} ({conf} CI {v['ci'][0]:.3f}-{v['ci'][1]:.3f}), "
                     f"control {v['control_ratio']:.3f} ({v['control_ci'][0]:.3f}-{v['control_ci'][1]:.3f}); "
                     f"band +{100 * v['band']:g} %  {word[c.verdict]}"
                     + ("" if c.verdict == PASS else f" ({v['short']})"))
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
    lines += [f"warning: {w}" for w in report["warnings"]]
    failed, open_ = report["failed_checks"], report["inconclusive_checks"]
    if failed:
        verdict = f"FAILED ({len(failed)} of {len(checks)}: {', '.join(failed)})"
    elif open_:
        first = report["latency_verdict"][open_[0].split("_")[-1]]["short"]
        verdict = (f"PASSED (latency inconclusive at batch {', '.join(n.split('_')[-1] for n in open_)}: {first}; "
                   "not a latency pass)")
    else:
        verdict = "PASSED"
    lines.append(f"{verdict}: {len(checks)} checks -> {engine_dir / VERIFY_REPORT}, {engine_dir / VERIFY_JUNIT}")
    return "\n".join(lines)

"""Stage `fuse-export`: fold the adapter into the dense kernels, prove the fused model equals the adapted
one, export original and fused ONNX (FP32 + FP16) and prove the graphs have the same structure.

Writes an engine directory (toolchain.enginedir; default engines/<run name>/). A run whose checks fail
writes no engine directory (an earlier export there is left untouched); its report goes to
`<out>.failed-report.json` beside it, with `passed: false`, and the command exits 1.

Without the run's data (its files are not on this machine), every check runs on seeded random windows
plus the user's (`--inputs`); checks that need labels (F1) are reported as not run
(toolchain.rundir.evaluation_inputs).
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..proof import export as ex
from ..console import say_notes
from ..artifacts import atomic_write_json, sha256_file
from ..backends.onnxruntime import run_onnx
from ..enginedir import claimed_export_dir, failed_report_path, onnx_name, seal, writing
from ..errors import EdgetoolError, ParityError
from ..proof.fusion import FusionProof, prove_fusion
from ..metrics import macro_f1, predict_logits
from ..proof.parity import accuracy_parity, criteria
from ..rundir import (ADAPTER_FILE, AdaptedRun, EvaluationInputs, evaluation_inputs, load_run, recipe_sha256,
                      seeded_inputs)


def _f1(y: np.ndarray | None, pred: np.ndarray) -> float | None:
    return None if y is None else macro_f1(y, pred)


def fuse_export(run_dir: Path | str, out: Path | str | None = None, echo=print,
                inputs: Path | str | None = None, trust_factories: Iterable[str] = ()) -> dict[str, Any]:
    """Fuse, check and export one run directory; returns the report. Raises ParityError (exit 1) when a
    check fails, after writing the report to `<out>.failed-report.json`. `inputs`: an .npz whose `X`
    holds more windows to prove equivalence on (and to check on at all when the run's data is missing).
    `trust_factories`: model factories (modules) the run's recipe may name (see toolchain.rundir.load_run)."""
    run = load_run(run_dir, echo=echo, trust_factories=trust_factories)
    run_dir = run.path.resolve()
    used = (*run.recipe.input_files(), *((("--inputs file", Path(inputs)),) if inputs is not None else ()))
    with claimed_export_dir(run_dir, None if out is None else Path(out), used) as out:
        return _fuse_export(run, run_dir, out, echo, inputs)


def _fuse_export(run: AdaptedRun, run_dir: Path, out: Path, echo, inputs: Path | str | None) -> dict[str, Any]:
    cfg = run.recipe.fuse
    if cfg.opset > ex.MAX_OPSET:
        raise EdgetoolError(f"recipe field 'fuse.opset': {cfg.opset} is above what the exporter supports ({ex.MAX_OPSET})")
    ev = evaluation_inputs(run, inputs)
    say_notes(echo, ev.notes)
    shape = tuple(run.spec.input_shape)
    extra = [ev.extra] + ([seeded_inputs(cfg.random_inputs, shape, run.recipe.seed)] if ev.data_available else [])
    proof = prove_fusion(run.method, run.adapted, run.original, np.concatenate([ev.X, *extra]),
                         cfg.atol, cfg.rtol, source=str(run_dir / ADAPTER_FILE))
    report = _fusion_report(run, run_dir, out, proof, ev)
    failures = report["failures"]
    try:
        with writing(out) as tmp:
            failures += _export_graphs(run, proof.fused, tmp, report, ev)
            ort_failures, fp32_outputs = _onnxruntime_parity(run, proof.fused, tmp, report, ev)
            failures += ort_failures
            failures += _fp16_parity(run, tmp, report, fp32_outputs, ev)
            report["passed"] = not failures
            if failures:
                raise _ChecksFailed()
            seal(tmp, report)
    except _ChecksFailed:
        pass
    failed_path = failed_report_path(out)
    if failures:
        atomic_write_json(failed_path, report)
        kept = f"; the earlier export in {out} was left unchanged" if out.exists() else ""
        more = f" (and {len(failures) - 1} more check(s))" if len(failures) > 1 else ""
        echo(_summary(report, out, ok=False))
        raise ParityError(f"{failures[0]}{more}; report: {failed_path}{kept}")
    if failed_path.exists():  # a stale failure from an earlier attempt no longer applies
        os.unlink(failed_path)
    echo(_summary(report, out, ok=True))
    return report


class _ChecksFailed(Exception):
    """Internal: aborts the atomic output directory so a failed export leaves nothing that looks complete."""


def _fusion_report(run: AdaptedRun, run_dir: Path, out: Path, proof: FusionProof, ev: EvaluationInputs) -> dict[str, Any]:
    cfg, eq = run.recipe.fuse, proof.equivalence
    counts = dict(ev.counts)
    if ev.data_available:
        counts["random"] = int(cfg.random_inputs)
    return {
        "passed": False,
        "failures": list(proof.failures),
        # Relative to the engine directory, so the two can move together; the absolute path as a fallback.
        "run_dir": os.path.relpath(run_dir, out),
        "run_dir_absolute": str(run_dir),
        "recipe": os.path.relpath(run_dir / "recipe.yaml", out),
        # verify refuses engines exported from an earlier adapter.pt (the run dir re-adapted since).
        "adapter_sha256": sha256_file(run_dir / ADAPTER_FILE),
        "recipe_sha256": recipe_sha256(run_dir),
        "method": run.method.name,
        "opset": cfg.opset,
        "input_name": ex.INPUT_NAME,
        "output_name": ex.OUTPUT_NAME,
        "input_shape": list(run.spec.input_shape),
        "batch_axis": ex.BATCH_AXIS,
        "class_names": list(run.spec.class_names),
        "exporter": ex.EXPORTER,
        "fp16_converter": ex.fp16_converter_name(),
        "architecture_identical": not proof.architecture_differences,
        "architecture_differences": proof.architecture_differences,
        "atol": cfg.atol,
        "rtol": cfg.rtol,
        "equivalence_inputs": counts,
        "data_available": ev.data_available,
        "notes": list(ev.notes),
        "max_abs_error": eq.max_abs_error,
        "max_rel_error": eq.max_rel_error,
        "output_scale": eq.scale,
        "argmax_agreement": eq.argmax_agreement,
        "worst_layer": eq.worst_layer,
        "layers": [asdict(l) for l in eq.layers],
    }


def _export_graphs(run: AdaptedRun, fused, tmp: Path, report: dict[str, Any], test: EvaluationInputs) -> list[str]:
    """original.onnx and fused.onnx, and the proof that their graphs are identical."""
    failures: list[str] = []
    fail = failures.append
    cfg = run.recipe.fuse
    sample = torch.from_numpy(test.X[:2])
    original_proto = ex.export_onnx(run.original, sample, tmp / onnx_name("original", "fp32"), cfg.opset)
    fused_proto = ex.export_onnx(fused, sample, tmp / onnx_name("fused", "fp32"), cfg.opset)  # what was written
    graph = ex.compare_graph_structure(original_proto, fused_proto)
    report.update(graph_identical=graph.identical, graph_differences=graph.differences,
                  graph_nodes=len(fused_proto.graph.node), graph_initializers=len(fused_proto.graph.initializer),
                  batchnorm_nodes=sum(n.op_type == "BatchNormalization" for n in fused_proto.graph.node))
    if not graph.identical:
        fail(f"original.onnx and fused.onnx differ in structure: {graph.differences[0]}")

    return failures


def _onnxruntime_parity(run: AdaptedRun, fused, tmp: Path, report: dict[str, Any],
                        test: EvaluationInputs) -> tuple[list[str], dict[str, np.ndarray]]:
    """ONNX Runtime (CPU) against PyTorch on the target test split (or the stand-in windows), for both
    graphs; also returns the FP32 graphs' ONNX Runtime outputs, the reference of the FP16 checks."""
    failures: list[str] = []
    fail = failures.append
    cfg = run.recipe.fuse
    torch_fused = predict_logits(fused, test.X)
    torch_ref = predict_logits(run.original, test.X)
    ort_fused = run_onnx(tmp / onnx_name("fused", "fp32"), test.X)
    ort_ref = run_onnx(tmp / onnx_name("original", "fp32"), test.X)
    pred_torch, pred_ort = torch_fused.argmax(1), ort_fused.argmax(1)
    report.update(
        torch_f1=_f1(test.y, pred_torch),
        ort_f1=_f1(test.y, pred_ort),
        ort_max_abs_error=float(np.abs(ort_fused - torch_fused).max()),
        ort_predictions_identical=bool(np.array_equal(pred_torch, pred_ort)),
        original_ort_max_abs_error=float(np.abs(ort_ref - torch_ref).max()),
        original_ort_predictions_identical=bool(np.array_equal(torch_ref.argmax(1), ort_ref.argmax(1))),
        original_f1=_f1(test.y, ort_ref.argmax(1)),
    )
    if report["ort_max_abs_error"] > cfg.ort_atol:
        fail(f"fused.onnx on ONNX Runtime differs from PyTorch by {report['ort_max_abs_error']:.3g} "
             f"(fuse.ort_atol {cfg.ort_atol:g})")
    if not report["ort_predictions_identical"] or report["ort_f1"] != report["torch_f1"]:
        fail(f"fused.onnx on ONNX Runtime predicts differently from PyTorch "
             f"(argmax agreement {np.mean(pred_torch == pred_ort):.2%}, F1 {_fmt(report['ort_f1'])} vs "
             f"{_fmt(report['torch_f1'])})")
    if report["original_ort_max_abs_error"] > cfg.ort_atol or not report["original_ort_predictions_identical"]:
        fail(f"original.onnx on ONNX Runtime differs from the PyTorch base by "
             f"{report['original_ort_max_abs_error']:.3g} (fuse.ort_atol {cfg.ort_atol:g})")

    return failures, {"fused": ort_fused, "original": ort_ref}


def _fp16_parity(run: AdaptedRun, tmp: Path, report: dict[str, Any], fp32_outputs: dict[str, np.ndarray],
                 test: EvaluationInputs) -> list[str]:
    """FP16 graphs (one precision plan for both) and their agreement with FP32 on ONNX Runtime."""
    ort_fused, ort_ref = fp32_outputs["fused"], fp32_outputs["original"]
    pred_ort = ort_fused.argmax(1)
    failures: list[str] = []
    fail = failures.append
    cfg = run.recipe.fuse
    # FP16: one block list for both graphs (the union), so their structures stay comparable.
    calib = test.calibration
    unsafe = {}
    for name in ("original", "fused"):
        for node, why in ex.fp16_unsafe_nodes(tmp / onnx_name(name, "fp32"), calib).items():
            unsafe.setdefault(node, f"{name}.onnx {why}")
    clamped = {name: ex.convert_fp16(tmp / onnx_name(name, "fp32"), tmp / onnx_name(name, "fp16"), None,
                                     block_list=unsafe)["weight_clamps"]
               for name in ("original", "fused")}
    fp16_graph = ex.compare_graph_structure(tmp / onnx_name("original", "fp16"), tmp / onnx_name("fused", "fp16"))
    # As stored (every float16 tensor rounded; see export.emulate_fp16_storage) and as ONNX Runtime's
    # CPU provider runs the file directly (float16 weights, float32 activations between its casts).
    fp16_fused = run_onnx(ex.emulate_fp16_storage(tmp / onnx_name("fused", "fp16")), test.X)
    fp16_ref = run_onnx(ex.emulate_fp16_storage(tmp / onnx_name("original", "fp16")), test.X)
    ort16_fused = run_onnx(tmp / onnx_name("fused", "fp16"), test.X)
    ort16_ref = run_onnx(tmp / onnx_name("original", "fp16"), test.X)
    fp16_f1 = _f1(test.y, fp16_fused.argmax(1))
    # The same FP16 criteria as verify's (toolchain.proof.parity.accuracy_parity): each FP16 graph against its own
    # FP32 graph, the fused one judged next to the original one.
    crit = replace(criteria(run.recipe.verify, "fp16"), min_agreement=cfg.fp16_min_agreement)
    parity = {}
    for which, fused16, original16 in (("storage", fp16_fused, fp16_ref), ("onnxruntime_cpu", ort16_fused, ort16_ref)):
        res, checks = accuracy_parity(fused16, ort_fused, original16, ort_ref, test.y, "fp16", crit, prefix="fp16")
        parity[which] = asdict(res)
        for c in checks:
            if c.failed:
                fail(f"fused FP16 graph ({'float16 storage' if which == 'storage' else 'as ONNX Runtime CPU runs it'}) "
                     f"vs its FP32 graph, {c.name}: {c.message}")
    report.update(
        fp16_blocked_nodes=unsafe,
        fp16_weight_clamps=clamped,
        fp16_graph_identical=fp16_graph.identical,
        fp16_graph_differences=fp16_graph.differences,
        fp16_evaluation="float16 storage of every float16 tensor, float32 arithmetic (emulated on ONNX Runtime CPU)",
        fp16_finite=bool(all(np.isfinite(y).all() for y in (fp16_fused, fp16_ref, ort16_fused, ort16_ref))),
        fp16_max_abs_error=float(np.abs(fp16_fused - ort_fused).max()),
        fp16_argmax_agreement=float(np.mean(fp16_fused.argmax(1) == pred_ort)),
        fp16_f1=fp16_f1,
        fp16_f1_delta=None if fp16_f1 is None else fp16_f1 - report["ort_f1"],
        fp16_ort_argmax_agreement=float(np.mean(ort16_fused.argmax(1) == pred_ort)),
        fp16_ort_f1=_f1(test.y, ort16_fused.argmax(1)),
        fp16_ort_max_abs_error=float(np.abs(ort16_fused - ort_fused).max()),
        original_fp16_argmax_agreement=float(np.mean(fp16_ref.argmax(1) == ort_ref.argmax(1))),
        original_fp16_f1=_f1(test.y, fp16_ref.argmax(1)),
        original_fp16_max_abs_error=float(np.abs(fp16_ref - ort_ref).max()),
        fp16_min_agreement=cfg.fp16_min_agreement,
        fp16_parity=parity,
    )
    if not report["fp16_finite"]:
        fail("an FP16 graph produced non-finite outputs on the target test split" if test.y is not None
             else "an FP16 graph produced non-finite outputs on the check windows")
    if not fp16_graph.identical:
        fail(f"original.fp16.onnx and fused.fp16.onnx differ in structure: {fp16_graph.differences[0]}")

    return failures


def _fmt(f1: float | None) -> str:
    return "n/a (no labelled data)" if f1 is None else f"{f1:.4f}"


def _summary(r: dict[str, Any], out: Path, ok: bool) -> str:
    n = r["equivalence_inputs"]
    on = " + ".join(f"{n[k]} {word}" for k, word in (("target_test", "test"), ("user", "given"), ("random", "random"))
                    if n.get(k))
    lines = [
        f"fusion [{r['method']}]: max |adapted - fused| {r['max_abs_error']:.3g} (relative {r['max_rel_error']:.3g}), "
        f"argmax agreement {r['argmax_agreement']:.2%} on {on or 'no'} inputs; worst layer {r['worst_layer']}",
        f"architecture: {'identical to the base' if r['architecture_identical'] else 'DIFFERS from the base'}",
    ]
    if "graph_identical" in r:
        lines.append(f"ONNX opset {r['opset']}: original.onnx vs fused.onnx structure "
                     f"{'identical' if r['graph_identical'] else 'DIFFERENT'} ({r['graph_nodes']} nodes, "
                     f"{r['graph_initializers']} initializers, {r['batchnorm_nodes']} BatchNormalization)")
    if "ort_f1" in r:
        lines.append(f"ONNX Runtime CPU: max |ORT - torch| {r['ort_max_abs_error']:.3g}, predictions "
                     f"{'identical' if r['ort_predictions_identical'] else 'DIFFER'}, " +
                     (f"F1 {r['ort_f1']:.4f} (torch {r['torch_f1']:.4f}, original {r['original_f1']:.4f})"
                      if r["ort_f1"] is not None else "F1 n/a (no labelled data)"))
    if "fp16_f1" in r:
        delta = "" if r["fp16_f1_delta"] is None else f" (delta {r['fp16_f1_delta']:+.4f})"
        lines.append(f"FP16 (float16 storage): argmax agreement {r['fp16_argmax_agreement']:.2%}, F1 {_fmt(r['fp16_f1'])}"
                     f"{delta}, max |FP16 - FP32| {r['fp16_max_abs_error']:.3g} "
                     f"(original {r['original_fp16_max_abs_error']:.3g}); "
                     f"ORT CPU runs it: agreement {r['fp16_ort_argmax_agreement']:.2%}; "
                     f"{len(r['fp16_blocked_nodes'])} node(s) kept in FP32, "
                     f"original.fp16 vs fused.fp16 {'identical' if r['fp16_graph_identical'] else 'DIFFERENT'}")
    if not r.get("data_available", True):
        lines.append("the run's data is not here: F1 checks not run (no labels); every other check ran on the windows above")
    lines.append(f"{'PASSED' if ok else 'FAILED'} -> {out if ok else failed_report_path(out)}")
    return "\n".join(lines)

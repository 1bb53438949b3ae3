"""Stage `fuse-export`: fold the adapter into the dense kernels, prove the fused model equals the adapted
one, export original and fused ONNX (FP32 + FP16) and prove the graphs have the same structure.

Output directory (written atomically; default engines/<run name>/):
  original.onnx, fused.onnx, original.fp16.onnx, fused.fp16.onnx, fuse_report.json
A run whose checks fail writes no output directory (an earlier export there is left untouched); its report
goes to `<out>.failed-report.json` beside it, with `passed: false`, and the command exits 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx
import torch
from torch import nn

from .artifacts import atomic_dir, check_output_dir, atomic_write_json, sha256_file
from .cliutil import echo as _echo
from .cliutil import reports_errors
from .errors import EdgetoolError, ParityError
from .methods.base import BN_TYPES, AdaptationMethod
from .models import CONV_TYPES
from .train import macro_f1, predict_logits

# Layers compared one by one: every module of the fused model that carries weights.
COMPARED_TYPES = (*CONV_TYPES, nn.Linear, *BN_TYPES)
FILES = ("original.onnx", "fused.onnx", "original.fp16.onnx", "fused.fp16.onnx")
REPORT = "fuse_report.json"


# ---------------------------------------------------------------------------------------------- fusion


def fuse_model(method: AdaptationMethod, adapted: nn.Module) -> nn.Module:
    """The fused model, through the method interface only (`method.merge`), in eval mode. A method that
    cannot be fused raises NotMergeableError saying what inference cost it would add."""
    return method.merge(adapted).eval()


def architecture_differences(fused: nn.Module, reference: nn.Module, limit: int = 20) -> list[str]:
    """Ways `fused` is not an instance of the base architecture: module tree (names, types, settings),
    state-dict keys, shapes and dtypes. Empty when it is."""
    diffs: list[str] = []
    mods_f, mods_r = dict(fused.named_modules()), dict(reference.named_modules())
    for name in mods_f.keys() - mods_r.keys():
        diffs.append(f"module '{name}' ({type(mods_f[name]).__name__}) is not in the base architecture")
    for name in mods_r.keys() - mods_f.keys():
        diffs.append(f"module '{name}' ({type(mods_r[name]).__name__}) of the base architecture is missing")
    for name in mods_f.keys() & mods_r.keys():
        f, r = mods_f[name], mods_r[name]
        if type(f) is not type(r):
            diffs.append(f"module '{name or '<root>'}' is {type(f).__name__}, base has {type(r).__name__}")
        elif f.extra_repr() != r.extra_repr():
            diffs.append(f"module '{name}' is {type(f).__name__}({f.extra_repr()}), base has ({r.extra_repr()})")
    sd_f, sd_r = fused.state_dict(), reference.state_dict()
    if list(sd_f) != list(sd_r):
        extra, missing = sorted(set(sd_f) - set(sd_r)), sorted(set(sd_r) - set(sd_f))
        diffs.append(f"state-dict keys differ (extra {extra[:3]}, missing {missing[:3]})" if extra or missing
                     else "state-dict keys are in a different order")
    for k in sd_f.keys() & sd_r.keys():
        if sd_f[k].shape != sd_r[k].shape or sd_f[k].dtype != sd_r[k].dtype:
            diffs.append(f"state-dict '{k}' is {tuple(sd_f[k].shape)} {sd_f[k].dtype}, "
                         f"base has {tuple(sd_r[k].shape)} {sd_r[k].dtype}")
    return sorted(diffs)[:limit]


# ---------------------------------------------------------------------------------------------- equivalence


@dataclass
class LayerError:
    name: str
    type: str
    max_abs_error: float
    max_rel_error: float  # max_abs_error / scale
    scale: float  # max |output| of the adapted layer over all inputs
    tolerance: float  # atol + rtol * scale
    passed: bool


@dataclass
class EquivalenceReport:
    max_abs_error: float
    max_rel_error: float
    scale: float
    argmax_agreement: float
    worst_layer: str | None
    passed: bool
    inputs: int
    layers: list[LayerError] = field(default_factory=list)

    def failure(self) -> str | None:
        if self.passed:
            return None
        worst = next((l for l in self.layers if l.name == self.worst_layer), None)
        if worst is not None and not worst.passed:
            return (f"fusion equivalence failed: worst layer '{worst.name}' ({worst.type}) differs from its adapted "
                    f"counterpart by {worst.max_abs_error:.3g} (tolerance {worst.tolerance:.3g})")
        return (f"fusion equivalence failed end to end: max |adapted - fused| {self.max_abs_error:.3g} "
                f"(relative {self.max_rel_error:.3g}); worst layer '{self.worst_layer}'")


def check_equivalence(adapted: nn.Module, fused: nn.Module, X: np.ndarray, atol: float, rtol: float,
                      batch_size: int = 64) -> EquivalenceReport:
    """Run `adapted` on X; at every weighted layer feed the fused counterpart the very input the adapted
    layer received and compare outputs (per layer), and compare the logits (end to end).
    A layer or the logits pass when max |adapted - fused| <= atol + rtol * max |adapted output|."""
    adapted, fused = adapted.eval(), fused.eval()
    adapted_mods = dict(adapted.named_modules())
    pairs = [(n, m, adapted_mods.get(n)) for n, m in fused.named_modules() if isinstance(m, COMPARED_TYPES)]
    err = {n: 0.0 for n, _, _ in pairs}
    scale = {n: 0.0 for n, _, _ in pairs}

    def hook_for(name: str, fused_layer: nn.Module):
        def hook(_module, inputs, output):
            y = fused_layer(inputs[0])
            e = float((y.double() - output.double()).abs().max()) if y.shape == output.shape else float("inf")
            # max() would silently keep the old value against a NaN: a NaN difference is a failure.
            err[name] = max(err[name], float("inf") if math.isnan(e) else e)
            scale[name] = max(scale[name], float(output.abs().max()))
        return hook

    handles = [a.register_forward_hook(hook_for(n, f)) for n, f, a in pairs if a is not None]
    try:
        with torch.no_grad():
            outs_a, outs_f = [], []
            for i in range(0, len(X), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(X[i: i + batch_size]))
                outs_a.append(adapted(xb).double().numpy())
                outs_f.append(fused(xb).double().numpy())
    finally:
        for h in handles:
            h.remove()
    ya, yf = np.concatenate(outs_a), np.concatenate(outs_f)

    layers = []
    for n, f, a in pairs:
        if a is None:  # a method renamed the layer: cannot be compared, so it cannot pass
            err[n] = float("inf")
        tol = atol + rtol * scale[n]
        layers.append(LayerError(n, type(f).__name__, err[n], err[n] / scale[n] if scale[n] > 0 else err[n],
                                 scale[n], tol, err[n] <= tol))
    abs_e = float(np.abs(ya - yf).max()) if ya.size else 0.0
    out_scale = float(np.abs(ya).max()) if ya.size else 0.0
    end_to_end_ok = abs_e <= atol + rtol * out_scale
    worst = max(layers, key=lambda l: l.max_abs_error / l.tolerance, default=None)
    return EquivalenceReport(
        max_abs_error=abs_e,
        max_rel_error=abs_e / out_scale if out_scale > 0 else abs_e,
        scale=out_scale,
        argmax_agreement=float(np.mean(ya.argmax(1) == yf.argmax(1))) if ya.size else 1.0,
        worst_layer=worst.name if worst else None,
        passed=end_to_end_ok and all(l.passed for l in layers),
        inputs=len(X),
        layers=layers,
    )


# ---------------------------------------------------------------------------------------------- stage


def _output_dir(run_dir: Path, out: Path | None) -> Path:
    out = Path(out) if out is not None else Path("engines") / run_dir.name
    return check_output_dir(out, (REPORT,), f"an edgetool export (no {REPORT})", (("run directory", run_dir),))


def _seeded_inputs(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    # Data is normalised per channel, so standard-normal windows are on the data's scale.
    return np.random.default_rng([seed, 0xF05E]).standard_normal((n, *shape)).astype(np.float32)


def fuse_export(run_dir: Path | str, out: Path | str | None = None, echo=print) -> dict[str, Any]:
    """Fuse, check and export one run directory; returns the report. Raises ParityError (exit 1) when a
    check fails, after writing the report to `<out>.failed-report.json`."""
    from . import export as ex
    from .adapt import load_run

    run = load_run(run_dir, echo=echo)
    run_dir = run.path.resolve()
    out = _output_dir(run_dir, None if out is None else Path(out))
    failed_report_path = out.with_name(f"{out.name}.failed-report.json")
    cfg = run.recipe.fuse
    if cfg.opset > ex.MAX_OPSET:
        raise EdgetoolError(f"recipe field 'fuse.opset': {cfg.opset} is above what the exporter supports ({ex.MAX_OPSET})")

    fused = fuse_model(run.method, run.adapted)
    non_finite = [k for k, t in fused.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if non_finite:
        raise EdgetoolError(f"the fused model's '{non_finite[0]}' contains NaN or inf: the adaptation in "
                            f"{run_dir / 'adapter.pt'} diverged or the file is corrupt; nothing was exported")
    test = run.data.target_test
    input_shape = tuple(run.data.input_shape)
    X_rand = _seeded_inputs(cfg.random_inputs, input_shape, run.recipe.seed)
    failures: list[str] = []

    arch_diffs = architecture_differences(fused, run.reference)
    if arch_diffs:
        failures.append(f"the fused model is not the base architecture: {arch_diffs[0]}")
    eq = check_equivalence(run.adapted, fused, np.concatenate([test.X, X_rand]), cfg.atol, cfg.rtol)
    if not eq.passed:
        failures.append(eq.failure())

    report: dict[str, Any] = {
        "passed": False,
        "failures": failures,
        "run_dir": str(run_dir),
        "recipe": str(run_dir / "recipe.yaml"),
        # verify refuses engines exported from an earlier adapter.pt (the run dir re-adapted since).
        "adapter_sha256": sha256_file(run_dir / "adapter.pt"),
        "method": run.method.name,
        "opset": cfg.opset,
        "input_name": ex.INPUT_NAME,
        "output_name": ex.OUTPUT_NAME,
        "input_shape": list(input_shape),
        "batch_axis": ex.BATCH_AXIS,
        "class_names": run.data.class_names,
        "exporter": ex.EXPORTER,
        "fp16_converter": ex.fp16_converter_name(),
        "architecture_identical": not arch_diffs,
        "architecture_differences": arch_diffs,
        "atol": cfg.atol,
        "rtol": cfg.rtol,
        "equivalence_inputs": {"target_test": len(test), "random": int(cfg.random_inputs)},
        "max_abs_error": eq.max_abs_error,
        "max_rel_error": eq.max_rel_error,
        "output_scale": eq.scale,
        "argmax_agreement": eq.argmax_agreement,
        "worst_layer": eq.worst_layer,
        "layers": [asdict(l) for l in eq.layers],
    }

    fail = failures.append

    try:
        with atomic_dir(out) as tmp:
            sample = torch.from_numpy(test.X[:2])
            ex.export_onnx(run.reference, sample, tmp / "original.onnx", cfg.opset)
            ex.export_onnx(fused, sample, tmp / "fused.onnx", cfg.opset)
            graph = ex.compare_graph_structure(tmp / "original.onnx", tmp / "fused.onnx")
            fused_proto = onnx.load(str(tmp / "fused.onnx"))
            report.update(graph_identical=graph.identical, graph_differences=graph.differences,
                          graph_nodes=len(fused_proto.graph.node), graph_initializers=len(fused_proto.graph.initializer),
                          batchnorm_nodes=sum(n.op_type == "BatchNormalization" for n in fused_proto.graph.node))
            if not graph.identical:
                fail(f"original.onnx and fused.onnx differ in structure: {graph.differences[0]}")

            # ONNX Runtime (CPU) against PyTorch on the target test split.
            torch_fused = predict_logits(fused, test.X)
            torch_ref = predict_logits(run.reference, test.X)
            ort_fused = ex.run_onnx(tmp / "fused.onnx", test.X)
            ort_ref = ex.run_onnx(tmp / "original.onnx", test.X)
            pred_torch, pred_ort = torch_fused.argmax(1), ort_fused.argmax(1)
            report.update(
                torch_f1=macro_f1(test.y, pred_torch),
                ort_f1=macro_f1(test.y, pred_ort),
                ort_max_abs_error=float(np.abs(ort_fused - torch_fused).max()),
                ort_predictions_identical=bool(np.array_equal(pred_torch, pred_ort)),
                original_ort_max_abs_error=float(np.abs(ort_ref - torch_ref).max()),
                original_ort_predictions_identical=bool(np.array_equal(torch_ref.argmax(1), ort_ref.argmax(1))),
                original_f1=macro_f1(test.y, ort_ref.argmax(1)),
            )
            if report["ort_max_abs_error"] > cfg.ort_atol:
                fail(f"fused.onnx on ONNX Runtime differs from PyTorch by {report['ort_max_abs_error']:.3g} "
                     f"(fuse.ort_atol {cfg.ort_atol:g})")
            if not report["ort_predictions_identical"] or report["ort_f1"] != report["torch_f1"]:
                fail(f"fused.onnx on ONNX Runtime predicts differently from PyTorch "
                     f"(F1 {report['ort_f1']:.4f} vs {report['torch_f1']:.4f})")
            if report["original_ort_max_abs_error"] > cfg.ort_atol or not report["original_ort_predictions_identical"]:
                fail(f"original.onnx on ONNX Runtime differs from the PyTorch base by "
                     f"{report['original_ort_max_abs_error']:.3g} (fuse.ort_atol {cfg.ort_atol:g})")

            # FP16: one block list for both graphs (the union), so their structures stay comparable.
            calib = np.concatenate([run.data.target_train.X, run.data.source_train.X])
            unsafe = {}
            for name in ("original", "fused"):
                for node, why in ex.fp16_unsafe_nodes(tmp / f"{name}.onnx", calib).items():
                    unsafe.setdefault(node, f"{name}.onnx {why}")
            clamped = {name: ex.convert_fp16(tmp / f"{name}.onnx", tmp / f"{name}.fp16.onnx", None,
                                             block_list=unsafe)["weight_clamps"]
                       for name in ("original", "fused")}
            fp16_graph = ex.compare_graph_structure(tmp / "original.fp16.onnx", tmp / "fused.fp16.onnx")
            # As stored (every float16 tensor rounded; see export.emulate_fp16_storage) and as ONNX Runtime's
            # CPU provider runs the file directly (float16 weights, float32 activations between its casts).
            fp16_fused = ex.run_onnx(ex.emulate_fp16_storage(tmp / "fused.fp16.onnx"), test.X)
            fp16_ref = ex.run_onnx(ex.emulate_fp16_storage(tmp / "original.fp16.onnx"), test.X)
            ort16_fused = ex.run_onnx(tmp / "fused.fp16.onnx", test.X)
            ort16_ref = ex.run_onnx(tmp / "original.fp16.onnx", test.X)
            fp16_f1 = macro_f1(test.y, fp16_fused.argmax(1))
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
                fp16_f1_delta=fp16_f1 - report["ort_f1"],
                fp16_ort_argmax_agreement=float(np.mean(ort16_fused.argmax(1) == pred_ort)),
                fp16_ort_f1=macro_f1(test.y, ort16_fused.argmax(1)),
                fp16_ort_max_abs_error=float(np.abs(ort16_fused - ort_fused).max()),
                original_fp16_argmax_agreement=float(np.mean(fp16_ref.argmax(1) == ort_ref.argmax(1))),
                original_fp16_f1=macro_f1(test.y, fp16_ref.argmax(1)),
                fp16_min_agreement=cfg.fp16_min_agreement,
            )
            if not report["fp16_finite"]:
                fail("an FP16 graph produced non-finite outputs on the target test split")
            for which, agreement in (("fused", report["fp16_argmax_agreement"]),
                                     ("fused (ONNX Runtime CPU)", report["fp16_ort_argmax_agreement"]),
                                     ("original", report["original_fp16_argmax_agreement"])):
                if agreement < cfg.fp16_min_agreement:
                    fail(f"{which} FP16 graph agrees with FP32 on {agreement:.1%} of target test windows "
                         f"(fuse.fp16_min_agreement {cfg.fp16_min_agreement:.1%})")
            if not fp16_graph.identical:
                fail(f"original.fp16.onnx and fused.fp16.onnx differ in structure: {fp16_graph.differences[0]}")

            report["passed"] = not failures
            report["files"] = {f: sha256_file(tmp / f) for f in FILES}
            if failures:
                raise _ChecksFailed()
            atomic_write_json(tmp / REPORT, report)
    except _ChecksFailed:
        pass
    if failures:
        report["passed"] = False
        report.pop("files", None)
        atomic_write_json(failed_report_path, report)
        kept = f"; the earlier export in {out} was left unchanged" if out.exists() else ""
        more = f" (and {len(failures) - 1} more check(s))" if len(failures) > 1 else ""
        echo(_summary(report, out, ok=False))
        raise ParityError(f"{failures[0]}{more}; report: {failed_report_path}{kept}")
    if failed_report_path.exists():  # a stale failure from an earlier attempt no longer applies
        os.unlink(failed_report_path)
    echo(_summary(report, out, ok=True))
    return report


class _ChecksFailed(Exception):
    """Internal: aborts the atomic output directory so a failed export leaves nothing that looks complete."""


def _summary(r: dict[str, Any], out: Path, ok: bool) -> str:
    lines = [
        f"fusion [{r['method']}]: max |adapted - fused| {r['max_abs_error']:.3g} (relative {r['max_rel_error']:.3g}), "
        f"argmax agreement {r['argmax_agreement']:.2%} on {r['equivalence_inputs']['target_test']} test + "
        f"{r['equivalence_inputs']['random']} random inputs; worst layer {r['worst_layer']}",
        f"architecture: {'identical to the base' if r['architecture_identical'] else 'DIFFERS from the base'}",
    ]
    if "graph_identical" in r:
        lines.append(f"ONNX opset {r['opset']}: original.onnx vs fused.onnx structure "
                     f"{'identical' if r['graph_identical'] else 'DIFFERENT'} ({r['graph_nodes']} nodes, "
                     f"{r['graph_initializers']} initializers, {r['batchnorm_nodes']} BatchNormalization)")
    if "ort_f1" in r:
        lines.append(f"ONNX Runtime CPU: max |ORT - torch| {r['ort_max_abs_error']:.3g}, predictions "
                     f"{'identical' if r['ort_predictions_identical'] else 'DIFFER'}, F1 {r['ort_f1']:.4f} "
                     f"(torch {r['torch_f1']:.4f}, original {r['original_f1']:.4f})")
    if "fp16_f1" in r:
        lines.append(f"FP16 (float16 storage): argmax agreement {r['fp16_argmax_agreement']:.2%}, F1 {r['fp16_f1']:.4f} "
                     f"(delta {r['fp16_f1_delta']:+.4f}), max |FP16 - FP32| {r['fp16_max_abs_error']:.3g}; "
                     f"ORT CPU runs it: agreement {r['fp16_ort_argmax_agreement']:.2%}; "
                     f"{len(r['fp16_blocked_nodes'])} node(s) kept in FP32, "
                     f"original.fp16 vs fused.fp16 {'identical' if r['fp16_graph_identical'] else 'DIFFERENT'}")
    lines.append(f"{'PASSED' if ok else 'FAILED'} -> {out if ok else out.with_name(out.name + '.failed-report.json')}")
    return "\n".join(lines)


@click.command("fuse-export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output directory (default: engines/<run name>).")
@reports_errors
def cli_command(run_dir: Path, out: Path | None) -> None:
    """Fuse the run's adapter into dense convs, prove equivalence, export original/fused ONNX (FP32 + FP16).

    Exit 0: every check passed; 1: a check failed (report in <out>.failed-report.json); 2: bad input."""
    fuse_export(run_dir, out, echo=_echo)

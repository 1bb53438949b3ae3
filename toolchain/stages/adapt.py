"""Stages `pretrain` and `adapt`: recipe -> data + base model -> adapted run directory (toolchain.rundir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifacts import check_output_dir
from ..basemodel import build_adapted, check_model_io, ensure_base_model, original_model, train_base
from ..data import DataBundle, load_data
from ..methods.settings import MethodSettings
from ..metrics import evaluate
from ..models import count_params
from ..recipe import Recipe, check_inputs_exist
from ..rundir import RUN_FILES, WHAT, adapter_payload, write_run
from ..train import fit, seed_everything


def _log(echo, msg: str) -> None:
    if echo is not None:
        echo(msg)


def pretrain(recipe: Recipe, data: DataBundle | None = None, progress: bool = True, echo=print) -> dict[str, Any]:
    """Train the base model on the source domain and write `recipe.model.checkpoint`."""
    check_inputs_exist(recipe)
    return train_base(recipe, data or load_data(recipe.data, recipe.seed), progress=progress, echo=echo)


def adapt(recipe: Recipe, out_dir: Path | None = None, progress: bool = True, echo=print,
          method_cfg: MethodSettings | None = None) -> Path:
    """Zero-shot evaluation, fine-tuning on the target train split, evaluation again; writes a run dir."""
    check_inputs_exist(recipe)
    method_cfg = method_cfg or recipe.method
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    check_output_dir(out_dir, RUN_FILES, WHAT, (("model.checkpoint", recipe.model.checkpoint),))
    data = load_data(recipe.data, recipe.seed)
    base, head_name, base_sha = ensure_base_model(recipe, data, progress, echo)
    seed_everything(recipe.seed)  # methods with random initialisation (LoRA's A) start the same every run
    model, method = build_adapted(method_cfg, base, head_name, data)
    check_model_io(model, data)

    f1_before, acc_before = evaluate(model, data.target_test)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    total = count_params(original_model(base, head_name, data))
    _log(echo, f"{method.name}: {trainable} trainable of {total} parameters ({100 * trainable / total:.2f} %); "
               f"zero-shot target macro-F1 {f1_before:.3f}")
    result = fit(model, method, data.target_train, recipe.train, recipe.seed, eval_split=data.target_test,
                 desc=f"adapt[{method.name}]", progress=progress)
    f1_after, acc_after = evaluate(model, data.target_test)
    payload = adapter_payload(method, model, head_name, data, recipe.model.checkpoint, base_sha)
    metrics = {
        "method": method.name,
        "f1_before": f1_before,
        "f1_after": f1_after,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "target_f1": recipe.train.target_f1,
        "steps_to_target": result.steps_to_target,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_breakdown": result.memory_breakdown,
        "adapter_params": sum(t.numel() for t in payload["state"].values()),
        "target_train_windows": len(data.target_train),
        "target_test_windows": len(data.target_test),
        "curve": result.curve_rows(),
    }
    size = write_run(out_dir, recipe, method_cfg, payload, metrics, [(p.step, p.f1) for p in result.curve])
    _log(echo, f"target macro-F1 {f1_before:.3f} -> {f1_after:.3f} (accuracy {acc_before:.3f} -> {acc_after:.3f}), "
               f"steps to F1>={recipe.train.target_f1:g}: "
               f"{'not reached' if result.steps_to_target is None else result.steps_to_target}, {result.train_seconds:.1f} s; "
               f"adapter {size} bytes -> {out_dir}")
    return Path(out_dir)

"""Stages `pretrain` and `adapt`: recipe -> data + base model -> adapted run directory (toolchain.rundir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..console import say, say_notes
from ..artifacts import claimed_output, default_output, output_lock
from ..models.assembly import build_adapted, check_model_io, ensure_base_model, original_model, train_base
from ..data.protocol import DataBundle, load_data
from ..errors import EdgetoolError
from ..methods.settings import MethodSettings
from ..metrics import evaluate
from ..models.backbones import count_params
from ..recipe import Recipe, check_inputs_exist
from ..rundir import RUN_FILES, WHAT, adapter_payload, write_run
from ..training.device import training_device
from ..training.fit import fit, seed_everything




def pretrain(recipe: Recipe, data: DataBundle | None = None, progress: bool = True, echo=print,
             force: bool = False) -> dict[str, Any]:
    """Train the base model on the source domain and write `recipe.model.checkpoint`. An existing
    checkpoint is replaced only with `force`: every adapter trained on it records its sha256 and would
    no longer apply."""
    check_inputs_exist(recipe)
    ckpt = recipe.model.checkpoint
    if ckpt.is_dir():
        raise EdgetoolError(f"recipe field 'model.checkpoint': {ckpt} is a directory; name the checkpoint file to write")
    with output_lock(ckpt):  # one writer per checkpoint (adapt's pretraining takes the same lock)
        return _pretrain(recipe, data, progress, echo, force)


def _pretrain(recipe: Recipe, data: DataBundle | None, progress: bool, echo, force: bool) -> dict[str, Any]:
    ckpt = recipe.model.checkpoint
    if ckpt.exists() and not force:
        raise EdgetoolError(f"base checkpoint {ckpt} exists; pretraining again would replace it and every adapter "
                            "trained on it would stop applying (they record its sha256); pass --force to replace it")
    training_device(recipe.pretrain.device, recipe.pretrain.precision, "pretrain")  # refuse before any work
    data = data or load_data(recipe.data, recipe.seed)
    say_notes(echo, data.notes)
    return train_base(recipe, data, progress=progress, echo=echo)


def adapt(recipe: Recipe, out_dir: Path | None = None, progress: bool = True, echo=print,
          method_cfg: MethodSettings | None = None) -> Path:
    """Zero-shot evaluation, fine-tuning on the target train split, evaluation again; writes a run dir."""
    check_inputs_exist(recipe)
    device = training_device(recipe.train.device, recipe.train.precision, "train").device  # refuse before any work
    method_cfg = method_cfg or recipe.method
    out_dir = Path(out_dir) if out_dir is not None else default_output("runs", recipe.name)
    with claimed_output(out_dir, RUN_FILES, WHAT, recipe.input_files()):
        return _adapt(recipe, out_dir, progress, echo, method_cfg, device)


def _adapt(recipe: Recipe, out_dir: Path, progress: bool, echo, method_cfg: MethodSettings, device) -> Path:
    data = load_data(recipe.data, recipe.seed)
    say_notes(echo, data.notes)
    base, head_name, base_sha = ensure_base_model(recipe, data, progress, echo)
    seed_everything(recipe.seed)  # methods with random initialisation (LoRA's A) start the same every run
    model, method = build_adapted(method_cfg, base, head_name, data)
    say_notes(echo, method.notes)
    check_model_io(model, data)
    model.to(device)

    f1_before, acc_before = evaluate(model, data.target_test)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    total = count_params(original_model(base, head_name, data))
    say(echo, f"{method.name}: {trainable} trainable of {total} parameters ({100 * trainable / total:.2f} %); "
               f"zero-shot target macro-F1 {f1_before:.3f}")
    result = fit(model, method, data.target_train, recipe.train, recipe.seed, eval_split=data.target_test,
                 desc=f"adapt[{method.name}]", progress=progress)
    f1_after, acc_after = evaluate(model, data.target_test)
    warnings = []
    if f1_after < f1_before:
        warnings.append(f"adaptation lowered target macro-F1 from {f1_before:.3f} to {f1_after:.3f} (accuracy "
                        f"{acc_before:.3f} -> {acc_after:.3f}): the adapted model is worse than the base on the target "
                        "test split; check the learning rate, steps and shots before shipping it")
    payload = adapter_payload(method, model, head_name, data, recipe, base_sha)
    metrics = {
        "method": method.name,
        "f1_before": f1_before,
        "f1_after": f1_after,
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "f1_decreased": f1_after < f1_before,
        "warnings": warnings,
        "notes": data.notes + method.notes,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "target_f1": recipe.train.target_f1,
        "steps_to_target": result.steps_to_target,
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_breakdown": result.memory_breakdown,
        "peak_memory_source": result.peak_memory_source,
        "device": result.device,
        "skipped_steps": result.skipped_steps,
        "adapter_params": sum(t.numel() for t in payload["state"].values()),
        "target_train_windows": len(data.target_train),
        "target_test_windows": len(data.target_test),
        "protocol": data.protocol_record(),
        "curve": result.curve_rows(),
    }
    size = write_run(out_dir, recipe, method_cfg, payload, metrics, [(p.step, p.f1) for p in result.curve])
    say(echo, f"target macro-F1 {f1_before:.3f} -> {f1_after:.3f} (accuracy {acc_before:.3f} -> {acc_after:.3f}), "
               f"steps to F1>={recipe.train.target_f1:g}: "
               f"{'not reached' if result.steps_to_target is None else result.steps_to_target}, {result.train_seconds:.1f} s on "
               f"{result.device['name']} ({result.device['precision']}); "
               f"adapter {size} bytes -> {out_dir}")
    for warning in warnings:
        say(echo, f"warning: {warning}")
    return Path(out_dir)

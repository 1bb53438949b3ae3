"""Stages `pretrain` and `adapt`: recipe -> data + base model -> adapted run directory.

A run directory holds everything later stages need and nothing they can re-derive:
  recipe.yaml     the recipe as resolved (defaults filled, absolute paths)
  adapter.pt      the adapter-only update (what you would ship to a device) + base checkpoint hash
  metrics.json    F1/accuracy before and after, parameter counts, steps to target, time, memory, curve
  f1_curve.png    macro-F1 on the target test split against step
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .artifacts import atomic_dir, check_output_dir, atomic_write_json, read_json, sha256_file
from .data import DataBundle, load_data
from .errors import EdgetoolError
from .methods import AdaptationMethod, get_method
from .models import (build_model, count_params, extend_head, find_head, load_state_checked, read_base_checkpoint,
                     save_base_checkpoint)
from .plots import plot_f1_curves
from .recipe import MethodConfig, Recipe, check_inputs_exist, load_recipe
from .train import evaluate, fit, seed_everything

ADAPTER_FORMAT = "edgetool-adapter/1"


def base_fingerprint(recipe: Recipe) -> str:
    """What the base checkpoint depends on; a mismatch means it was pretrained for another recipe."""
    parts = {k: recipe.resolved_dict()[k] for k in ("data", "pretrain", "seed")}
    parts["model"] = {k: v for k, v in recipe.resolved_dict()["model"].items() if k != "checkpoint"}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _log(echo, msg: str) -> None:
    if echo is not None:
        echo(msg)


def pretrain(recipe: Recipe, data: DataBundle | None = None, progress: bool = True, echo=print) -> dict[str, Any]:
    """Train the base model on the source domain and write `recipe.model.checkpoint`."""
    check_inputs_exist(recipe)
    data = data or load_data(recipe.data, recipe.seed)
    # Seed before building: the initial weights must not depend on what this process did before.
    seed_everything(recipe.seed)
    model = build_model(recipe.model, data.input_shape[0], data.num_source_classes)
    method = get_method(MethodConfig(name="full", bn="stats"))
    method.inject(model)
    result = fit(model, method, data.source_train, recipe.pretrain, recipe.seed, desc="pretrain", progress=progress)
    f1, acc = evaluate(model, data.source_train)
    meta = {
        "class_names": data.class_names[: data.num_source_classes],
        "input_shape": list(data.input_shape),
        "fingerprint": base_fingerprint(recipe),
        "source_train_f1": f1,
    }
    save_base_checkpoint(recipe.model.checkpoint, model, meta)
    _log(echo, f"pretrained {recipe.model.arch} on {len(data.source_train)} source windows: "
               f"train macro-F1 {f1:.3f}, {result.train_seconds:.1f} s -> {recipe.model.checkpoint}")
    return {"checkpoint": str(recipe.model.checkpoint), "source_train_f1": f1, "source_train_accuracy": acc}


def load_base_model(recipe: Recipe, data: DataBundle, echo=print) -> tuple[nn.Module, str, str]:
    """The pretrained base (eval mode), its head's name and the checkpoint's sha256."""
    ckpt = read_base_checkpoint(recipe.model.checkpoint)
    model = build_model(recipe.model, data.input_shape[0], data.num_source_classes)
    load_state_checked(model, ckpt["state_dict"], f"base checkpoint {recipe.model.checkpoint}")
    if ckpt.get("fingerprint") not in (None, base_fingerprint(recipe)):
        _log(echo, f"note: base checkpoint {recipe.model.checkpoint} was pretrained under different data/model/pretrain "
                   "settings than this recipe; using it as given")
    head_name, _ = find_head(model, recipe.model.head)
    return model.eval(), head_name, sha256_file(recipe.model.checkpoint)


def ensure_base_model(recipe: Recipe, data: DataBundle, progress: bool = True, echo=print) -> tuple[nn.Module, str, str]:
    """load_base_model, pretraining the base on the source domain first when its checkpoint is missing."""
    if not recipe.model.checkpoint.exists():
        _log(echo, f"base checkpoint {recipe.model.checkpoint} is missing: pretraining it first")
        pretrain(recipe, data, progress=progress, echo=echo)
    return load_base_model(recipe, data, echo)


def reference_model(base: nn.Module, head_name: str, data: DataBundle) -> nn.Module:
    """The method-free architecture the target uses: the base, with the head grown for new classes."""
    ref = copy.deepcopy(base)
    extend_head(ref, head_name, data.num_classes)
    return ref.eval()


def build_adapted(recipe: Recipe, method_cfg: MethodConfig, base: nn.Module, head_name: str,
                  data: DataBundle) -> tuple[nn.Module, AdaptationMethod]:
    model = reference_model(base, head_name, data)
    method = get_method(method_cfg)
    new_classes = data.num_classes > data.num_source_classes
    method.inject(model, head_name, train_head=method_cfg.train_head or new_classes)
    return model, method


def check_model_io(model: nn.Module, data: DataBundle) -> None:
    x = torch.from_numpy(data.target_test.X[:2])
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise EdgetoolError(f"the model does not accept inputs shaped {tuple(x.shape[1:])}: {first}") from None
    if out.shape != (len(x), data.num_classes):
        raise EdgetoolError(f"the model outputs {tuple(out.shape[1:])}, expected ({data.num_classes},) class scores")


RUN_FILES = ("recipe.yaml", "adapter.pt", "metrics.json")


def adapt(recipe: Recipe, out_dir: Path | None = None, progress: bool = True, echo=print,
          method_cfg: MethodConfig | None = None) -> Path:
    """Zero-shot evaluation, fine-tuning on the target train split, evaluation again; writes a run dir."""
    check_inputs_exist(recipe)
    method_cfg = method_cfg or recipe.method
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    check_output_dir(out_dir, RUN_FILES, "an edgetool run directory", (("model.checkpoint", recipe.model.checkpoint),))
    data = load_data(recipe.data, recipe.seed)
    base, head_name, base_sha = ensure_base_model(recipe, data, progress, echo)
    seed_everything(recipe.seed)  # methods with random initialisation (LoRA's A) start the same every run
    model, method = build_adapted(recipe, method_cfg, base, head_name, data)
    check_model_io(model, data)

    f1_before, acc_before = evaluate(model, data.target_test)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    total = count_params(reference_model(base, head_name, data))
    _log(echo, f"{method.name}: {trainable} trainable of {total} parameters ({100 * trainable / total:.2f} %); "
               f"zero-shot target macro-F1 {f1_before:.3f}")
    result = fit(model, method, data.target_train, recipe.train, recipe.seed, eval_split=data.target_test,
                 desc=f"adapt[{method.name}]", progress=progress)
    f1_after, acc_after = evaluate(model, data.target_test)
    adapter = method.adapter_state(model)
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
        "adapter_params": sum(t.numel() for t in adapter.values()),
        "target_train_windows": len(data.target_train),
        "target_test_windows": len(data.target_test),
        "curve": result.curve_rows(),
    }
    payload = {
        "format": ADAPTER_FORMAT,
        "method": method.name,
        "head": head_name,
        "class_names": data.class_names,
        "num_source_classes": data.num_source_classes,
        "base_checkpoint": str(recipe.model.checkpoint),
        "base_sha256": base_sha,
        "state": adapter,
    }
    with atomic_dir(out_dir) as tmp:
        buf = io.BytesIO()
        torch.save(payload, buf)
        (tmp / "adapter.pt").write_bytes(buf.getvalue())
        metrics["adapter_bytes"] = len(buf.getvalue())
        resolved = recipe.resolved_dict()
        resolved["method"] = method_cfg.model_dump(mode="json")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_json(tmp / "metrics.json", metrics)
        plot_f1_curves({method.name: [(p.step, p.f1) for p in result.curve]}, tmp / "f1_curve.png",
                       f"{recipe.name}: {method.name}", target=recipe.train.target_f1)
    _log(echo, f"target macro-F1 {f1_before:.3f} -> {f1_after:.3f} (accuracy {acc_before:.3f} -> {acc_after:.3f}), "
               f"steps to F1>={recipe.train.target_f1:g}: {result.steps_to_target}, {result.train_seconds:.1f} s; "
               f"adapter {metrics['adapter_bytes']} bytes -> {out_dir}")
    return Path(out_dir)


@dataclass
class AdaptedRun:
    """A run directory loaded back: what fuse-export, verify and bench consume."""

    path: Path
    recipe: Recipe
    data: DataBundle
    method: AdaptationMethod
    reference: nn.Module  # base architecture (head grown if needed), no adapter: the 'original' model
    adapted: nn.Module  # reference + injected adapter with the trained state, eval mode
    metrics: dict[str, Any]


def load_run(run_dir: Path | str, echo=None) -> AdaptedRun:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EdgetoolError(f"run directory not found: {run_dir}")
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise EdgetoolError(f"{run_dir} is not an edgetool run directory (no {name}); create one with `edgetool adapt`")
    recipe = load_recipe(run_dir / "recipe.yaml")
    try:
        payload = torch.load(run_dir / "adapter.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgetoolError(f"{run_dir / 'adapter.pt'} cannot be read as a weights-only checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise EdgetoolError(f"{run_dir / 'adapter.pt'} is not an edgetool adapter checkpoint")
    data = load_data(recipe.data, recipe.seed)
    if payload["class_names"] != data.class_names:
        raise EdgetoolError(f"adapter classes {payload['class_names']} differ from the recipe's data {data.class_names}")
    base, head_name, sha = load_base_model(recipe, data, echo)
    if sha != payload["base_sha256"]:
        raise EdgetoolError(
            f"base checkpoint {recipe.model.checkpoint} changed since this run was adapted (sha256 {sha[:12]} != "
            f"{payload['base_sha256'][:12]}): the adapter only applies to the checkpoint it was trained on"
        )
    model, method = build_adapted(recipe, recipe.method, base, head_name, data)
    method.load_adapter_state(model, payload["state"])
    return AdaptedRun(run_dir, recipe, data, method, reference_model(base, head_name, data), model.eval(),
                      read_json(run_dir / "metrics.json", "metrics"))

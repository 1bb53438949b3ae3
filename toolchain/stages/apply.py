"""Stage `apply`: an adapter trained anywhere (an `adapter.pt` from another machine, a device, a colleague)
+ the base checkpoint it was trained on + a recipe -> a run directory (toolchain.rundir) that
`fuse-export` takes as it takes one written by `adapt`.

The adapter's recorded base sha256 guards it: a different base is refused naming both hashes, since an
update applies only to the weights it was trained on. The method settings recorded in the adapter win
over the recipe's (a note says when they differ); the recipe supplies the model, data and the fuse and
verify settings. With the recipe's data here, the run's metrics hold the target F1 before and after;
without, they say the data was not available."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ..console import say
from ..artifacts import claimed_output, sha256_file
from ..models.assembly import build_adapted, check_io, load_base_model, original_model
from ..data.protocol import load_data
from ..errors import EdgetoolError
from ..methods.settings import MethodSettings, method_settings
from ..metrics import evaluate
from ..models.backbones import count_params
from ..models.checkpoints import read_base_checkpoint
from ..recipe import Recipe
from ..rundir import RUN_FILES, WHAT, data_missing, read_adapter, recorded_spec, run_id, write_run



def _adapter_method(payload: dict[str, Any], recipe: Recipe, adapter: Path, echo) -> MethodSettings:
    """The settings the adapter was trained with (recorded since adapters carry them), else the recipe's."""
    recorded = payload.get("method_settings")
    if recorded is None:
        if recipe.method.name != payload.get("method"):
            raise EdgetoolError(f"{adapter} is a '{payload.get('method')}' adapter but the recipe's method is "
                                f"'{recipe.method.name}'; set the recipe's method to the one it was trained with")
        return recipe.method
    try:
        cfg = method_settings(**recorded)
    except ValidationError as exc:
        raise EdgetoolError(f"{adapter}: its recorded method settings are not valid here ({exc.errors()[0]['msg']})") from None
    if cfg != recipe.method:
        say(echo, f"note: using the adapter's method settings {cfg.model_dump(mode='json')} (the recipe says "
                   f"{recipe.method.model_dump(mode='json')})")
    return cfg


def apply(adapter: Path | str, recipe: Recipe, out_dir: Path | str, base: Path | str | None = None,
          echo=print) -> Path:
    """Write a run directory for `adapter` on `base` (default: the recipe's model.checkpoint)."""
    adapter = Path(adapter).resolve()
    payload = read_adapter(adapter)
    if base is not None:
        recipe.model.checkpoint = Path(base).resolve()
    ckpt = recipe.model.checkpoint
    read_base_checkpoint(ckpt)  # not found / a directory / not a checkpoint: say so before comparing hashes
    sha = sha256_file(ckpt)
    if sha != payload.get("base_sha256"):
        raise EdgetoolError(f"{adapter} was trained on a base checkpoint with sha256 {payload.get('base_sha256')}, but "
                            f"{ckpt} has sha256 {sha}: an adapter applies only to the weights it was trained on")
    with claimed_output(out_dir, RUN_FILES, WHAT, (*recipe.input_files(), ("adapter", adapter))) as out:
        return _apply(adapter, payload, recipe, Path(out_dir), out, sha, echo)


def _apply(adapter: Path, payload: dict[str, Any], recipe: Recipe, out_dir: Path, out: Path, sha: str, echo) -> Path:
    method_cfg = _adapter_method(payload, recipe, adapter, echo)
    why_no_data = data_missing(recipe)
    data = None
    if why_no_data is None:
        data = load_data(recipe.data, recipe.seed)
        if list(payload["class_names"]) != data.class_names:
            raise EdgetoolError(f"{adapter} was trained for classes {payload['class_names']}, the recipe's data has "
                                f"{data.class_names}")
        spec = data
    else:
        say(echo, f"note: {why_no_data}; the run records no F1 (fuse-export and verify fall back to random windows)")
        spec = recorded_spec(payload, {}, recipe.model.checkpoint)
    if tuple(payload.get("input_shape") or spec.input_shape) != tuple(spec.input_shape):
        raise EdgetoolError(f"{adapter} was trained on inputs shaped {tuple(payload['input_shape'])}, the recipe's data "
                            f"is shaped {tuple(spec.input_shape)}")
    base_model, head_name, _ = load_base_model(recipe, spec, echo)
    model, method = build_adapted(method_cfg, base_model, head_name, spec, for_training=False)
    method.load_adapter_state(model, payload["state"])
    original = original_model(base_model, head_name, spec)
    check_io(model, np.zeros((1, *spec.input_shape), np.float32), spec.num_classes)

    metrics: dict[str, Any] = {
        "method": method.name,
        "applied_from": {"adapter": str(adapter), "adapter_sha256": sha256_file(adapter),
                         "recipe_name": payload.get("recipe_name")},
        "data_available": data is not None,
        "trainable_params": sum(p.numel() for _, p in method.trainable_parameters(model)),
        "total_params": count_params(original),
        "adapter_params": sum(t.numel() for t in payload["state"].values()),
        "notes": method.notes + ([why_no_data] if why_no_data else []),
        "warnings": [],
    }
    if data is not None:
        (f1_before, acc_before), (f1_after, acc_after) = evaluate(original, data.target_test), evaluate(model.eval(), data.target_test)
        metrics.update(f1_before=f1_before, f1_after=f1_after, accuracy_before=acc_before, accuracy_after=acc_after,
                       f1_decreased=f1_after < f1_before, target_test_windows=len(data.target_test),
                       protocol=data.protocol_record())
        if f1_after < f1_before:
            metrics["warnings"].append(f"the adapter lowers target macro-F1 from {f1_before:.3f} to {f1_after:.3f}")
    else:
        metrics.update(f1_before=None, f1_after=None, accuracy_before=None, accuracy_after=None, f1_decreased=None)
    record = {**payload, "head": head_name, "class_names": list(spec.class_names),
              "num_source_classes": int(spec.num_source_classes), "input_shape": [int(d) for d in spec.input_shape],
              "base_checkpoint": str(recipe.model.checkpoint), "base_sha256": sha,
              "run_id": payload.get("run_id") or run_id(recipe, method_cfg, sha)}
    size = write_run(out, recipe, method_cfg, record, metrics, [])
    scored = ("" if data is None else
              f"; target macro-F1 {metrics['f1_before']:.3f} (base) -> {metrics['f1_after']:.3f} (adapted)")
    say(echo, f"applied {method.name} adapter {adapter.name} ({metrics['adapter_params']} numbers) to base "
               f"{recipe.model.checkpoint.name} (sha256 {sha[:12]}){scored}; adapter {size} bytes -> {out_dir}")
    for warning in metrics["warnings"]:
        say(echo, f"warning: {warning}")
    return out_dir

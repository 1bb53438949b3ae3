"""The run directory, written by `adapt` and read by `fuse-export`, `verify` and `apply`-style users:

  recipe.yaml     the recipe as resolved (defaults filled, absolute paths)
  adapter.pt      the adapter-only update (what you would ship to a device) + base checkpoint hash
  metrics.json    F1/accuracy before and after, parameter counts, steps to target, time, memory, curve
  f1_curve.png    macro-F1 on the target test split against step

This module is the only one that knows these names and formats."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .artifacts import atomic_dir, atomic_write_json, read_json
from .basemodel import build_adapted, load_base_model, original_model
from .data import DataBundle, load_data
from .errors import EdgetoolError
from .methods.base import AdaptationMethod
from .methods.settings import MethodSettings
from .plots import plot_f1_curves
from .recipe import Recipe, load_recipe

ADAPTER_FORMAT = "edgetool-adapter/1"
RUN_FILES = ("recipe.yaml", "adapter.pt", "metrics.json")
ADAPTER_FILE = "adapter.pt"
WHAT = "an edgetool run directory"


def adapter_payload(method: AdaptationMethod, model: nn.Module, head_name: str, data: DataBundle,
                    base_checkpoint: Path, base_sha256: str) -> dict[str, Any]:
    return {
        "format": ADAPTER_FORMAT,
        "method": method.name,
        "head": head_name,
        "class_names": data.class_names,
        "num_source_classes": data.num_source_classes,
        "base_checkpoint": str(base_checkpoint),
        "base_sha256": base_sha256,
        "state": method.adapter_state(model),
    }


def write_run(out_dir: Path, recipe: Recipe, method_cfg: MethodSettings, payload: dict[str, Any],
              metrics: dict[str, Any], curve: list[tuple[int, float]]) -> int:
    """Write the run directory atomically; returns the adapter file's size in bytes (also put in metrics)."""
    with atomic_dir(out_dir) as tmp:
        buf = io.BytesIO()
        torch.save(payload, buf)
        (tmp / ADAPTER_FILE).write_bytes(buf.getvalue())
        metrics["adapter_bytes"] = len(buf.getvalue())
        resolved = recipe.resolved_dict()
        resolved["method"] = method_cfg.model_dump(mode="json")
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_json(tmp / "metrics.json", metrics)
        plot_f1_curves({payload["method"]: curve}, tmp / "f1_curve.png", f"{recipe.name}: {payload['method']}",
                       target=recipe.train.target_f1)
    return metrics["adapter_bytes"]


@dataclass
class AdaptedRun:
    """A run directory loaded back: what fuse-export and verify consume."""

    path: Path
    recipe: Recipe
    data: DataBundle
    method: AdaptationMethod
    original: nn.Module  # base architecture (head grown if needed), no adapter
    adapted: nn.Module  # original + injected adapter with the trained state, eval mode
    metrics: dict[str, Any]


def read_adapter(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgetoolError(f"{path} cannot be read as a weights-only checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise EdgetoolError(f"{path} is not an edgetool adapter checkpoint")
    return payload


def load_run(run_dir: Path | str, echo=None) -> AdaptedRun:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EdgetoolError(f"run directory not found: {run_dir}")
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise EdgetoolError(f"{run_dir} is not {WHAT} (no {name}); create one with `edgetool adapt`")
    recipe = load_recipe(run_dir / "recipe.yaml")
    payload = read_adapter(run_dir / ADAPTER_FILE)
    data = load_data(recipe.data, recipe.seed)
    if payload["class_names"] != data.class_names:
        raise EdgetoolError(f"adapter classes {payload['class_names']} differ from the recipe's data {data.class_names}")
    base, head_name, sha = load_base_model(recipe, data, echo)
    if sha != payload["base_sha256"]:
        raise EdgetoolError(
            f"base checkpoint {recipe.model.checkpoint} changed since this run was adapted (sha256 {sha[:12]} != "
            f"{payload['base_sha256'][:12]}): the adapter only applies to the checkpoint it was trained on"
        )
    model, method = build_adapted(recipe.method, base, head_name, data)
    method.load_adapter_state(model, payload["state"])
    return AdaptedRun(run_dir, recipe, data, method, original_model(base, head_name, data), model.eval(),
                      read_json(run_dir / "metrics.json", "metrics"))

"""The run directory, written by `adapt` (and `apply`) and read by `fuse-export` and `verify`:

  recipe.yaml     the recipe as resolved (defaults filled); its paths relative to the run directory
  adapter.pt      the adapter-only update (what you would ship to a device), what it was trained for
                  (method settings, input shape, classes, head, run id) and the base checkpoint's sha256
  metrics.json    F1/accuracy before and after, parameter counts, steps to target, time, memory, curve,
                  the protocol, warnings, and the run's identity (run id, base sha256, absolute paths
                  as written: where inputs are looked for when the relative ones are not there)
  f1_curve.png    macro-F1 on the target test split against step

A run directory and its base checkpoint can be copied elsewhere: paths resolve against the run directory
first. Without the training data, `load_run` still builds every model (`AdaptedRun.data` is None) and
`evaluation_inputs` supplies seeded random windows plus the user's own (`--inputs`).

This module is the only one that knows these names and formats."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import yaml
from torch import nn

from .console import say
from .artifacts import atomic_dir, atomic_write_json, read_json, sha256_file
from .models.assembly import ModelSpec, Shapes, build_adapted, load_base_model, original_model
from .data.formats import check_npz_sizes
from .data.protocol import DataBundle, load_data
from .errors import EdgetoolError
from .methods.base import AdaptationMethod
from .methods.settings import MethodSettings
from .models.backbones import check_factory_trusted
from .models.checkpoints import check_finite, load_weights_only, read_base_checkpoint
from .plots import plot_f1_curves
from .recipe import Recipe, load_recipe

ADAPTER_FORMAT = "edgetool-adapter/1"
RUN_FILES = ("recipe.yaml", "adapter.pt", "metrics.json")
ADAPTER_FILE = "adapter.pt"
RECIPE_FILE = "recipe.yaml"
WHAT = "an edgetool run directory"
# Recipe fields holding paths: (section, field).
PATH_FIELDS = (("model", "checkpoint"), ("data", "train_path"), ("data", "test_path"))
# Without data, at least this many seeded random windows (fuse.random_inputs when larger) stand in.
MIN_RANDOM_INPUTS = 32



def run_id(recipe: Recipe, method_cfg: MethodSettings, base_sha256: str) -> str:
    """What determines a run, hashed: the recipe without its paths, the method settings and the base. A
    rerun of the same recipe on the same base gets the same id, another run's adapter a different one."""
    resolved = recipe.resolved_dict()
    for section, key in PATH_FIELDS:
        resolved[section].pop(key, None)
    resolved["method"] = method_cfg.model_dump(mode="json")
    resolved.pop("name", None)
    text = json.dumps({"recipe": resolved, "base_sha256": base_sha256}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def adapter_payload(method: AdaptationMethod, model: nn.Module, head_name: str, spec: Shapes, recipe: Recipe,
                    base_sha256: str) -> dict[str, Any]:
    return {
        "format": ADAPTER_FORMAT,
        "run_id": run_id(recipe, method.cfg, base_sha256),
        "recipe_name": recipe.name,
        "method": method.name,
        "method_settings": method.cfg.model_dump(mode="json"),
        "head": head_name,
        "class_names": list(spec.class_names),
        "num_source_classes": int(spec.num_source_classes),
        "input_shape": [int(d) for d in spec.input_shape],
        "base_checkpoint": str(recipe.model.checkpoint),  # made relative to the run directory by write_run
        "base_sha256": base_sha256,
        "state": method.adapter_state(model),
    }


def _relative(path: Path | str, start: Path) -> str:
    return os.path.relpath(Path(path).resolve(), start)


def write_run(out_dir: Path, recipe: Recipe, method_cfg: MethodSettings, payload: dict[str, Any],
              metrics: dict[str, Any], curve: list[tuple[int, float]]) -> int:
    """Write the run directory atomically; returns the adapter file's size in bytes (also put in metrics)."""
    out_dir = Path(out_dir).resolve()
    resolved = recipe.resolved_dict()
    resolved["method"] = method_cfg.model_dump(mode="json")
    absolute = {}
    for section, key in PATH_FIELDS:
        if resolved[section].get(key) is not None:
            absolute[f"{section}.{key}"] = resolved[section][key]
            resolved[section][key] = _relative(resolved[section][key], out_dir)
    recipe_text = yaml.safe_dump(resolved, sort_keys=False).encode("utf-8")
    # The recipe's hash rides in adapter.pt (as the run id does): an edited recipe.yaml is refused on load.
    payload = {**payload, "base_checkpoint": _relative(payload["base_checkpoint"], out_dir),
               "recipe_sha256": hashlib.sha256(recipe_text).hexdigest()}
    buf = io.BytesIO()
    torch.save(payload, buf)
    # What fuse-export needs to rebuild the models without the data, and what identifies the adapter.
    metrics.update(adapter_bytes=len(buf.getvalue()), run_id=payload["run_id"], base_sha256=payload["base_sha256"], input_shape=payload["input_shape"],
                   class_names=payload["class_names"], num_source_classes=payload["num_source_classes"],
                   head=payload["head"], absolute_paths=absolute)
    with atomic_dir(out_dir) as tmp:
        (tmp / ADAPTER_FILE).write_bytes(buf.getvalue())
        (tmp / "recipe.yaml").write_bytes(recipe_text)
        atomic_write_json(tmp / "metrics.json", metrics)
        if curve:
            plot_f1_curves({payload["method"]: curve}, tmp / "f1_curve.png", f"{recipe.name}: {payload['method']}",
                           target=recipe.train.target_f1)
    return metrics["adapter_bytes"]


@dataclass
class AdaptedRun:
    """A run directory loaded back: what fuse-export and verify consume."""

    path: Path
    recipe: Recipe
    data: DataBundle | None  # None when the recipe's data files are not here (see data_note)
    spec: Shapes  # input shape and classes: the data's, or as the run recorded them
    method: AdaptationMethod
    original: nn.Module  # base architecture (head grown if needed), no adapter
    adapted: nn.Module  # original + injected adapter with the trained state, eval mode
    metrics: dict[str, Any]
    data_note: str | None = None


def read_adapter(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise EdgetoolError(f"{path} is a directory, not an adapter file (adapter.pt)")
    if not path.is_file():
        raise EdgetoolError(f"adapter not found: {path}")
    try:
        payload = load_weights_only(path)
    except Exception as exc:
        raise EdgetoolError(f"{path} cannot be read as a weights-only checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise EdgetoolError(f"{path} is not an edgetool adapter checkpoint")
    if isinstance(payload.get("state"), dict):
        check_finite(payload["state"], f"adapter {path}")
    return payload


def data_missing(recipe: Recipe) -> str | None:
    """Why the recipe's data cannot be loaded here (a named file is absent), or None."""
    for key in ("train_path", "test_path"):
        path = getattr(recipe.data, key)
        if path is not None and not path.exists():
            return f"the recipe's data (field 'data.{key}') is not here: {path}"
    return None


def locate_inputs(recipe: Recipe, metrics: dict[str, Any], where: Path, echo=None) -> None:
    """Point the recipe's paths at files that exist: relative to the run directory first (a copied run),
    else the absolute path recorded when the run was written (a run directory moved on its own)."""
    recorded = metrics.get("absolute_paths") or {}
    for section, key in PATH_FIELDS:
        cfg = getattr(recipe, section)
        path = getattr(cfg, key)
        alt = recorded.get(f"{section}.{key}")
        if path is not None and not path.exists() and alt and Path(alt).exists():
            say(echo, f"note: {section}.{key} {path} (relative to {where}) is not there; using {alt}, where it was "
                       "when the run was written")
            setattr(cfg, key, Path(alt))


def recorded_spec(payload: dict[str, Any], metrics: dict[str, Any], checkpoint: Path) -> ModelSpec:
    """Input shape and classes as the run recorded them (adapter.pt; older runs: the base checkpoint)."""
    shape = payload.get("input_shape") or metrics.get("input_shape")
    if shape is None:
        shape = read_base_checkpoint(checkpoint).get("input_shape")
    if shape is None:
        raise EdgetoolError("the run records no input shape (an adapter from an older edgetool on a plain state-dict "
                            "checkpoint): its data is needed")
    return ModelSpec(tuple(int(d) for d in shape), list(payload["class_names"]), int(payload["num_source_classes"]))


def check_adapter_identity(adapter_path: Path, payload: dict[str, Any], recipe: Recipe, metrics: dict[str, Any]) -> None:
    """adapter.pt is the one this run wrote: its run id matches metrics.json's. When it does not, say what
    differs (base, method settings, classes, recipe) instead of blaming a changed base checkpoint."""
    ours = metrics.get("run_id")
    if ours is None or payload.get("run_id") == ours:
        if payload.get("method") != recipe.method.name:
            raise EdgetoolError(f"{adapter_path} is a '{payload.get('method')}' adapter but the run's recipe.yaml says "
                                f"method '{recipe.method.name}': they belong to different runs")
        return
    differs = []
    if metrics.get("base_sha256") and payload.get("base_sha256") != metrics["base_sha256"]:
        differs.append(f"it was trained on a different base (sha256 {str(payload.get('base_sha256'))[:12]}, this run's "
                       f"{metrics['base_sha256'][:12]})")
    theirs, mine = payload.get("method_settings"), recipe.method.model_dump(mode="json")
    if theirs is not None and theirs != mine:
        keys = [k for k in dict.fromkeys([*mine, *theirs]) if theirs.get(k) != mine.get(k)]
        differs.append("method " + ", ".join(f"{k} {theirs.get(k)!r} (this run: {mine.get(k)!r})" for k in keys))
    elif payload.get("method") != recipe.method.name:
        differs.append(f"method '{payload.get('method')}' vs this run's '{recipe.method.name}'")
    if metrics.get("class_names") and payload.get("class_names") != metrics["class_names"]:
        differs.append(f"classes {payload.get('class_names')} vs {metrics['class_names']}")
    if payload.get("recipe_name") and payload["recipe_name"] != recipe.name:
        differs.append(f"written by recipe '{payload['recipe_name']}', this run is '{recipe.name}'")
    detail = "; ".join(differs) or "same recipe and base, other training settings or seed"
    raise EdgetoolError(f"{adapter_path} is not the adapter this run wrote (run id {payload.get('run_id')} vs {ours}): "
                        f"it belongs to another run ({detail}); put the run's own adapter back, or make a run "
                        "directory for this one with `edgetool apply`")


def recipe_sha256(run_dir: Path) -> str:
    return sha256_file(Path(run_dir) / RECIPE_FILE)


def check_recipe_identity(run_dir: Path, payload: dict[str, Any], echo=None) -> None:
    """recipe.yaml is the one this run wrote: its sha256 is the one adapter.pt records (runs written by an
    edgetool before the hash was recorded: a note, as their adapters carry no run id either)."""
    recorded = payload.get("recipe_sha256")
    if recorded is None:
        say(echo, f"note: {run_dir / ADAPTER_FILE} records no sha256 of {RECIPE_FILE} (written by an older edgetool): "
                  "its recipe cannot be checked against edits")
        return
    sha = recipe_sha256(run_dir)
    if sha != recorded:
        raise EdgetoolError(f"{run_dir / RECIPE_FILE} changed since this run was written (sha256 {sha[:12]}, "
                            f"{ADAPTER_FILE} records {str(recorded)[:12]}): the adapter belongs to the recipe it was "
                            "trained with; put the run's own recipe.yaml back, or rerun `edgetool adapt`")


def load_run(run_dir: Path | str, echo=None, trust_factories: Iterable[str] = ()) -> AdaptedRun:
    """A run directory read back. It may come from another machine: its recipe.yaml must be the one its
    adapter records, and a model factory it names is imported only when trusted here (`trust_factories`,
    or $EDGETOOL_TRUST_FACTORY)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EdgetoolError(f"run directory not found: {run_dir}")
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise EdgetoolError(f"{run_dir} is not {WHAT} (no {name}); create one with `edgetool adapt`")
    # Reading recipe.yaml (safe YAML into a schema) runs no code; its model factory is imported only later.
    recipe = load_recipe(run_dir / RECIPE_FILE)  # relative paths resolve against the run directory
    metrics = read_json(run_dir / "metrics.json", "metrics")
    if not isinstance(metrics, dict):
        raise EdgetoolError(f"{run_dir / 'metrics.json'} is not a JSON object; rerun `edgetool adapt`")
    payload = read_adapter(run_dir / ADAPTER_FILE)
    check_adapter_identity(run_dir / ADAPTER_FILE, payload, recipe, metrics)
    check_recipe_identity(run_dir, payload, echo)
    check_factory_trusted(recipe.model, f"{run_dir / RECIPE_FILE}", trust_factories)
    locate_inputs(recipe, metrics, run_dir, echo)
    data_note = data_missing(recipe)
    data: DataBundle | None = None
    if data_note is None:
        data = load_data(recipe.data, recipe.seed)
        if payload["class_names"] != data.class_names:
            raise EdgetoolError(f"adapter classes {payload['class_names']} differ from the recipe's data {data.class_names}")
        spec: Shapes = data
    else:
        spec = recorded_spec(payload, metrics, recipe.model.checkpoint)
    base, head_name, sha = load_base_model(recipe, spec, echo)
    if sha != payload["base_sha256"]:
        raise EdgetoolError(
            f"base checkpoint {recipe.model.checkpoint} changed since this run was adapted (sha256 {sha[:12]} != "
            f"{payload['base_sha256'][:12]}): the adapter only applies to the checkpoint it was trained on"
        )
    model, method = build_adapted(recipe.method, base, head_name, spec, for_training=False)
    method.load_adapter_state(model, payload["state"])
    return AdaptedRun(run_dir, recipe, data, spec, method, original_model(base, head_name, spec), model.eval(),
                      metrics, data_note)


# ---------------------------------------------------------------------------------------------- inputs


def seeded_inputs(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    # Data is normalised per channel, so standard-normal windows are on the data's scale.
    return np.random.default_rng([seed, 0xF05E]).standard_normal((n, *shape)).astype(np.float32)


def load_input_windows(path: Path | str, input_shape: tuple[int, ...]) -> np.ndarray:
    """`--inputs FILE.npz`: an array `X` of windows as the model takes them (normalised), [N, *input_shape]."""
    path = Path(path)
    if not path.is_file():
        raise EdgetoolError(f"--inputs file not found: {path}")
    check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if "X" not in getattr(z, "files", ()):
                raise EdgetoolError(f"--inputs {path}: no array 'X' (expected an .npz written with np.savez(path, X=...))")
            X = z["X"]
    except EdgetoolError:
        raise
    except Exception as exc:
        raise EdgetoolError(f"--inputs {path}: not a readable .npz archive ({type(exc).__name__})") from None
    if tuple(X.shape[1:]) != tuple(input_shape) or X.shape[0] == 0:
        raise EdgetoolError(f"--inputs {path}: X is shaped {tuple(X.shape)}, the model takes [N, {', '.join(map(str, input_shape))}]")
    if not np.issubdtype(X.dtype, np.number) or not np.isfinite(X).all():
        raise EdgetoolError(f"--inputs {path}: X must hold finite numbers")
    return X.astype(np.float32)


@dataclass
class EvaluationInputs:
    """What fuse-export and verify compare models on. With the data: the target test split (labelled);
    without: the user's windows plus seeded random ones (unlabelled: argmax agreement and output errors
    still mean something, F1 is not available)."""

    X: np.ndarray
    y: np.ndarray | None
    extra: np.ndarray  # the user's windows when X is the labelled test split (fuse-export adds them to its proof)
    calibration: np.ndarray  # FP16 range calibration (never the test split when there is data)
    counts: dict[str, int]  # windows by origin: target_test, user, random
    data_available: bool
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.X)


def evaluation_inputs(run: AdaptedRun, inputs: Path | str | None = None) -> EvaluationInputs:
    shape = tuple(run.spec.input_shape)
    user = load_input_windows(inputs, shape) if inputs is not None else np.zeros((0, *shape), np.float32)
    if run.data is not None:
        test = run.data.target_test
        return EvaluationInputs(test.X, test.y, user, np.concatenate([run.data.target_train.X, run.data.source_train.X]),
                                {"target_test": len(test), "user": len(user), "random": 0}, True)
    n_random = max(run.recipe.fuse.random_inputs, MIN_RANDOM_INPUTS)
    X = np.concatenate([user, seeded_inputs(n_random, shape, run.recipe.seed)])
    origin = f"{len(user)} window(s) from {inputs} and {n_random}" if len(user) else f"{n_random}"
    note = (f"{run.data_note}; checking on {origin} seeded random window(s) instead (no labels: F1 is not available, "
            "argmax agreement and output errors are)")
    return EvaluationInputs(X, None, user[:0], X, {"target_test": 0, "user": len(user), "random": n_random}, False, [note])

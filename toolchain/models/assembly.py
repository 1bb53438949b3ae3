"""Model assembly for every stage: the pretrained base (loaded, or trained on the source domain when
its checkpoint is missing), the method-free original model, the adapted model, and the input check.

Names used throughout: the *base* is the pretrained model (source classes); the *original* is the
method-free model of the target architecture (the base with its head grown for new classes), what
fusion must give back and what `original.onnx` is; the *adapted* model is the original with a
method's adapter injected."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from ..console import say
from ..artifacts import output_lock, remove_stale_temps, sha256_file
from ..data.protocol import DataBundle
from ..errors import EdgetoolError, first_line
from ..methods.base import AdaptationMethod
from ..methods.registry import get_method
from ..methods.settings import FullSettings, MethodSettings
from ..metrics import evaluate
from .backbones import build_model, count_params, extend_head, find_head, model_name
from .checkpoints import load_state_checked, read_base_checkpoint, save_base_checkpoint
from ..recipe import Recipe
from ..training.fit import fit, seed_everything



@dataclass(frozen=True)
class ModelSpec:
    """What building the models takes from the data: the input shape and the classes. A DataBundle has
    the same attributes, so either can be passed; a run directory records a ModelSpec so its models can
    be rebuilt where its data is not (toolchain.rundir)."""

    input_shape: tuple[int, ...]
    class_names: list[str]
    num_source_classes: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


Shapes = Union[DataBundle, ModelSpec]


def base_fingerprint(recipe: Recipe, data: DataBundle) -> str:
    """What pretraining depends on, and nothing else: the source windows and labels it trains on (as data, so
    two data configurations giving the same source split agree, and target-side settings such as shots,
    validation or the target shift never count), the source class names, the model and the pretrain settings."""
    digest = hashlib.sha256()
    for array in (data.source_train.X, data.source_train.y):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    resolved = recipe.resolved_dict()
    # Where and in what precision the base trained is recorded in the checkpoint, not part of what it is.
    pretrain = {k: v for k, v in resolved["pretrain"].items() if k not in ("device", "precision", "lean_step")}
    settings = {"source_classes": data.class_names[: data.num_source_classes], "pretrain": pretrain,
                "seed": recipe.seed, "model": {k: v for k, v in resolved["model"].items() if k != "checkpoint"}}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def train_base(recipe: Recipe, data: DataBundle, progress: bool = True, echo=print) -> dict[str, Any]:
    """Train the base model on the source domain and write `recipe.model.checkpoint`."""
    # Seed before building: the initial weights must not depend on what this process did before.
    seed_everything(recipe.seed)
    model = build_model(recipe.model, data.input_shape[0], data.num_source_classes)
    # The same input check adapt makes, before any training: a model that cannot take these windows
    # is bad input (exit 2), not an error deep inside the training loop.
    check_io(model, data.source_train.X[:2], data.num_source_classes)
    method = get_method(FullSettings(bn="stats"))
    method.inject(model)
    result = fit(model, method, data.source_train, recipe.pretrain, recipe.seed, desc="pretrain", progress=progress,
                 where="pretrain")
    f1, acc = evaluate(model, data.source_train)
    meta = {
        "class_names": data.class_names[: data.num_source_classes],
        "input_shape": list(data.input_shape),
        "pretrain_fingerprint": base_fingerprint(recipe, data),
        "source_train_f1": f1,
        "trained_on": result.device,
    }
    save_base_checkpoint(recipe.model.checkpoint, model, meta)
    say(echo, f"pretrained {model_name(recipe.model)} on {len(data.source_train)} source windows: "
               f"train macro-F1 {f1:.3f}, {result.train_seconds:.1f} s on {result.device['name']} "
               f"({result.device['precision']}) -> {recipe.model.checkpoint}")
    return {"checkpoint": str(recipe.model.checkpoint), "source_train_f1": f1, "source_train_accuracy": acc}


def load_base_model(recipe: Recipe, data: Shapes, echo=print) -> tuple[nn.Module, str, str]:
    """The pretrained base (eval mode), its head's name and the checkpoint's sha256."""
    ckpt = read_base_checkpoint(recipe.model.checkpoint)
    model = build_model(recipe.model, data.input_shape[0], data.num_source_classes)
    load_state_checked(model, ckpt["state_dict"], f"base checkpoint {recipe.model.checkpoint}")
    # Checkpoints from before "pretrain_fingerprint" hashed target-side settings too: they are not compared.
    # Without the data (a run dir moved to a device) there is no source split to compare: no note.
    if isinstance(data, DataBundle) and ckpt.get("pretrain_fingerprint") not in (None, base_fingerprint(recipe, data)):
        say(echo, f"note: base checkpoint {recipe.model.checkpoint} was pretrained on other source data or under other "
                   "model/pretrain settings than this recipe's; using it as given")
    head_name, _ = find_head(model, recipe.model.head)
    return model.eval(), head_name, sha256_file(recipe.model.checkpoint)


def ensure_base_model(recipe: Recipe, data: DataBundle, progress: bool = True, echo=print) -> tuple[nn.Module, str, str]:
    """load_base_model, training the base on the source domain first when its checkpoint is missing.

    One writer per checkpoint: pretraining holds the checkpoint's lock. A second process that finds it
    missing waits for that lock, then uses the checkpoint the first one wrote (never overwrites it:
    every adapter trained on it records its sha256)."""
    ckpt = recipe.model.checkpoint
    remove_stale_temps(ckpt)  # what a checkpoint write killed mid-way left beside it
    if not ckpt.exists():
        def waiting(pid):
            say(echo, f"waiting for {f'process {pid}' if pid else 'another edgetool process'}, which is writing the "
                      f"base checkpoint {ckpt}")
        with output_lock(ckpt, wait=True, on_wait=waiting):
            if ckpt.exists():
                say(echo, f"using the base checkpoint {ckpt} another process has just pretrained")
            else:
                say(echo, f"base checkpoint {ckpt} is missing: pretraining it first")
                train_base(recipe, data, progress=progress, echo=echo)
    return load_base_model(recipe, data, echo)


def original_model(base: nn.Module, head_name: str, data: Shapes) -> nn.Module:
    """The method-free architecture the target uses: the base, with the head grown for new classes."""
    original = copy.deepcopy(base)
    extend_head(original, head_name, data.num_classes)
    return original.eval()


def build_adapted(method_cfg: MethodSettings, base: nn.Module, head_name: str, data: Shapes,
                  for_training: bool = True) -> tuple[nn.Module, AdaptationMethod]:
    """The original model with the method injected. `for_training`: refuse a method that would train
    more parameters than full fine-tuning does (an adapter bigger than the model it adapts); loading
    an adapter that exists already does not ask."""
    model = original_model(base, head_name, data)
    total = count_params(model)
    method = get_method(method_cfg)
    new_classes = data.num_classes > data.num_source_classes
    method.inject(model, head_name, train_head=method_cfg.train_head or new_classes)
    if for_training:
        trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
        if trainable > total:
            hint = "; lower method.rank" if "rank" in type(method_cfg).model_fields else ""
            raise EdgetoolError(f"method '{method.name}' would train {trainable} parameters, more than full fine-tuning "
                                f"({total}, every parameter of the model){hint} or use method 'full'")
    return model, method


def check_io(model: nn.Module, X, num_classes: int) -> None:
    """The model takes windows shaped like X[0] and outputs `num_classes` scores; else one line, exit 2."""
    x = torch.from_numpy(X[:2])
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # a shape error raises RuntimeError, ValueError or user code's own type
        raise EdgetoolError(f"the model does not accept inputs shaped {tuple(x.shape[1:])}: {first_line(exc)}") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (len(x), num_classes):
        raise EdgetoolError(f"the model outputs {tuple(out.shape[1:])}, expected ({num_classes},) class scores")


def check_model_io(model: nn.Module, data: DataBundle) -> None:
    check_io(model, data.target_test.X, data.num_classes)

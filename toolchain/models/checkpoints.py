"""Base checkpoints: written as CPU tensors, read weights-only, loaded with a one-line error on a mismatch."""

from __future__ import annotations

import io
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..artifacts import atomic_write_bytes
from ..errors import EdgetoolError

BASE_FORMAT = "edgetool-base/1"


def with_metadata(state: dict[str, torch.Tensor], metadata: dict | None) -> "OrderedDict[str, torch.Tensor]":
    """`state` as an OrderedDict carrying `metadata` as its `_metadata`: each module's state-dict version, which
    nn.Module.state_dict() records and some modules' loaders need (torchvision's MNASNet refuses a state without
    it). A plain dict comprehension over a state dict drops it."""
    out = OrderedDict(state)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def detached_state(model: nn.Module, keys=None) -> "OrderedDict[str, torch.Tensor]":
    """The model's state (or its `keys`) as CPU copies, so a state trained on a GPU loads anywhere, with the
    state-dict metadata of the modules whose tensors it holds."""
    state = model.state_dict()
    metadata = getattr(state, "_metadata", None)
    if keys is not None:
        state = {k: state[k] for k in keys}
        if metadata is not None:
            owners = {k.rpartition(".")[0] for k in keys}
            metadata = OrderedDict((m, v) for m, v in metadata.items() if m in owners)
    return with_metadata({k: v.detach().cpu().clone() for k, v in state.items()}, metadata)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """model.load_state_dict(state) with the state's metadata over the model's own: a state saved by an older
    edgetool, rebuilt as a plain dict, or holding part of the model (an adapter) still gives every module's
    loader a version (the model's own describes what this code's modules write)."""
    metadata = OrderedDict(getattr(model.state_dict(), "_metadata", None) or {})
    metadata.update(getattr(state, "_metadata", None) or {})
    model.load_state_dict(with_metadata(state, metadata), strict=strict)


def save_base_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    state = detached_state(model)
    torch.save({"format": BASE_FORMAT, "state_dict": state, **meta}, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_base_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise EdgetoolError(f"base checkpoint {path} is a directory, not a checkpoint file (recipe field 'model.checkpoint')")
    if not path.is_file():
        raise EdgetoolError(f"base checkpoint not found: {path}")
    try:
        ckpt = load_weights_only(path)
    except Exception as exc:  # pickle/zip errors: say what the file is not
        raise EdgetoolError(f"base checkpoint {path} cannot be read as a weights-only torch checkpoint ({type(exc).__name__})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == BASE_FORMAT and isinstance(ckpt.get("state_dict"), dict):
        pass
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"format": "state_dict", "state_dict": ckpt}  # a plain state dict from the user
    else:
        raise EdgetoolError(f"base checkpoint {path} is neither an edgetool checkpoint nor a state dict")
    check_finite(ckpt["state_dict"], f"base checkpoint {path}")
    return ckpt


def load_weights_only(path: Path) -> Any:
    """torch.load, weights only; torch's own warnings (e.g. on a file that is a raw pickle) are not shown:
    the caller's one-line error says what the file is not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def check_finite(state: dict[str, Any], what: str) -> None:
    """Every floating-point tensor is finite: a NaN or Inf weight is named here, not found later as a failed
    SVD or a diverged loss."""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            kind = "NaN" if bool(torch.isnan(value).any()) else "Inf"
            raise EdgetoolError(f"{what}: tensor '{name}' holds {kind} values (a weight must not be NaN or inf): the "
                                "file is damaged or its training diverged")


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict, but an incompatible checkpoint becomes one line naming the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise EdgetoolError(f"{what} does not fit this model architecture: {detail}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise EdgetoolError(f"{what} does not fit this model architecture: '{k}' is {tuple(v.shape)}, model has {tuple(own[k].shape)}")
    load_state(model, state)

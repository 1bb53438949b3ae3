"""Dtypes inside the lean step's Functions: what autocast would run a conv in, turning autocast off where every
dtype is explicit, and casting only when needed."""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a conv on `x` in, or None when autocast is off (or leaves x alone)."""
    device = x.device.type
    try:
        if not torch.is_autocast_enabled(device):
            return None
        amp_dtype = torch.get_autocast_dtype(device)
    except (TypeError, AttributeError):  # torch < 2.4
        enabled = torch.is_autocast_enabled() if device == "cuda" else torch.is_autocast_cpu_enabled()
        if not enabled:
            return None
        amp_dtype = torch.get_autocast_gpu_dtype() if device == "cuda" else torch.get_autocast_cpu_dtype()
    return amp_dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else None


def autocast_off(device_type: str):
    """A context with autocast off for `device_type`; nothing to enter when it is off already."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        on = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)

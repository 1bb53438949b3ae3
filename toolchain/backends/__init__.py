"""Inference backends behind one runner interface (base.py); `select_backend` picks one for --engine."""

from __future__ import annotations

from ..errors import EdgetoolError
from .base import BACKENDS, Backend
from .onnxruntime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend

ENGINE_CHOICES = [*BACKENDS, "auto"]


def select_backend(choice: str) -> tuple[Backend, str]:
    """The backend for `--engine` and a sentence saying which and why. `auto` takes TensorRT when it
    imports and a CUDA device is usable, else ONNX Runtime."""
    if choice == "auto":
        trt = TensorRTBackend()
        avail = trt.probe()
        if avail.usable:
            return trt, f"auto: {avail.reason}"
        ort = OnnxRuntimeBackend()
        ort_avail = ort.probe()
        if not ort_avail.usable:
            raise EdgetoolError(f"no backend is usable: {avail.reason}; {ort_avail.reason}")
        why = avail.reason.split(":")[0] if avail.reason.startswith("TensorRT is not installed") else avail.reason
        return ort, f"auto: {why}; using {ort_avail.reason}"
    if choice not in BACKENDS:
        raise EdgetoolError(f"unknown engine '{choice}' (choose from {', '.join(ENGINE_CHOICES)})")
    backend = BACKENDS[choice]()
    avail = backend.probe()
    if not avail.usable:
        raise EdgetoolError(avail.reason)
    return backend, avail.reason

"""Where and in what precision training runs: the recipe's `device` (auto | cpu | cuda | cuda:N) resolved
to a usable torch.device, the `precision` (fp32 | fp16 | bf16) checked against it, the autocast context
and gradient scaler that precision needs, and a description of both for metrics.json / bench.json.

Used by `toolchain.training.fit.fit` and `toolchain.training.cost`; nothing else decides a training device."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from dataclasses import dataclass

import torch

from ..errors import EdgetoolError, first_line

DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _cuda_unusable_reason() -> str | None:
    """Why torch cannot use CUDA here, or None when it can."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU, or its driver is missing)"
    return None


def resolve_device(spec: str, what: str = "device") -> torch.device:
    """`auto` (CUDA device 0 when usable, else the CPU), `cpu`, `cuda` (= cuda:0) or `cuda:N`; an unusable
    CUDA request is an EdgetoolError naming `what` (the recipe field or option it came from)."""
    if not DEVICE_SPEC.fullmatch(spec):
        raise EdgetoolError(f"{what} '{spec}': expected auto, cpu, cuda or cuda:N")
    if spec == "cpu" or (spec == "auto" and _cuda_unusable_reason() is not None):
        return torch.device("cpu")
    why = _cuda_unusable_reason()
    if why is not None:
        raise EdgetoolError(f"{what} '{spec}': no CUDA device is usable: {why}")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise EdgetoolError(f"{what} '{spec}': there is no CUDA device {index} (this machine has {count})")
    # Deterministic cuBLAS (seed_everything asks torch for deterministic algorithms); it must be set
    # before the first cuBLAS call, and a user's own setting wins.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = torch.device("cuda", index)
    try:
        torch.empty(1, device=device)
    except RuntimeError as exc:  # pragma: no cover - depends on the machine (driver/toolkit mismatch)
        raise EdgetoolError(f"{what} '{spec}': CUDA device {index} cannot be used: {first_line(exc)}") from None
    return device


def _cpu_autocast_works(dtype: torch.dtype) -> bool:
    """Whether this torch's CPU autocast really computes in `dtype` (older builds warn and run fp32)."""
    import warnings

    a = torch.ones(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=dtype):
            return torch.mm(a, a).dtype == dtype


def check_precision(device: torch.device, precision: str, what: str = "precision") -> None:
    """Refuse a precision this device cannot train in (one line naming why)."""
    if precision not in PRECISIONS:
        raise EdgetoolError(f"{what} '{precision}': expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    if device.type == "cuda":
        if precision == "bf16":
            try:  # native support only: emulated bf16 would train slower than fp32
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch < 2.3 has no including_emulation and checks natively
                native = torch.cuda.is_bf16_supported()
            if not native:
                major, minor = torch.cuda.get_device_capability(device)
                raise EdgetoolError(f"{what} 'bf16': {torch.cuda.get_device_name(device)} (compute capability "
                                    f"{major}.{minor}) has no native bfloat16; use fp16 or fp32")
        return
    if not _cpu_autocast_works(AUTOCAST_DTYPES[precision]):
        raise EdgetoolError(f"{what} '{precision}': this torch ({torch.__version__}) cannot autocast to {precision} "
                            "on the CPU; use fp32")
    if precision == "fp16":
        try:
            torch.amp.GradScaler("cpu")
        except (AttributeError, TypeError, RuntimeError, ValueError) as exc:
            raise EdgetoolError(f"{what} 'fp16': this torch ({torch.__version__}) has no gradient scaler for the CPU "
                                f"({first_line(exc)}); use bf16 or fp32") from None


def _cpu_name() -> str:
    """The CPU's model name where Linux reports one (x86), else what platform knows (e.g. aarch64)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def describe_device(device: torch.device) -> dict:
    """What ran the training, for the records: device name, torch build and the TF32 switches
    (PyTorch lets cuDNN run fp32 convolutions in TF32 by default on Ampere and later, Jetson Orin included)."""
    info: dict = {"type": device.type}
    major = 0
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(index=device.index, name=torch.cuda.get_device_name(device), compute_capability=f"{major}.{minor}")
    else:
        info["name"] = _cpu_name()
    cudnn_tf32 = bool(torch.backends.cudnn.allow_tf32)
    matmul_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    info.update(
        torch=str(torch.__version__),
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        cudnn_allow_tf32=cudnn_tf32,
        matmul_allow_tf32=matmul_tf32,
        # TF32 exists on compute capability 8.0+ only; the switches mean nothing on the CPU.
        tf32_in_effect=major >= 8 and (cudnn_tf32 or matmul_tf32),
    )
    return info


@dataclass(frozen=True)
class TrainingDevice:
    """A resolved device and a precision it supports."""

    device: torch.device
    precision: str

    def autocast(self):
        """The context for the training forward: autocast to fp16/bf16, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def grad_scaler(self):
        """Loss scaling for fp16 (its gradients underflow otherwise); a pass-through for fp32 and bf16."""
        enabled = self.precision == "fp16"
        if hasattr(torch.amp, "GradScaler"):
            return torch.amp.GradScaler(self.device.type, enabled=enabled)
        return torch.cuda.amp.GradScaler(enabled=enabled)  # torch < 2.3 (CUDA only; CPU fp16 is refused there)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {**describe_device(self.device), "precision": self.precision}


def training_device(device: str, precision: str, where: str = "train") -> TrainingDevice:
    """Resolve `device` and check `precision` (recipe fields `<where>.device` / `<where>.precision`)."""
    resolved = resolve_device(device, f"{where}.device")
    check_precision(resolved, precision, f"{where}.precision")
    return TrainingDevice(resolved, precision)

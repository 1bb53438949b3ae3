"""Which CUDA device is usable, through the CUDA runtime Polygraphy loads (no pycuda, no torch.cuda)."""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass

from .base import first_line, quiet_polygraphy


@dataclass(frozen=True)
class CudaDevice:
    name: str
    compute_capability: str  # "8.7"

    @property
    def slug(self) -> str:
        return f"sm{self.compute_capability.replace('.', '')}-{re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-')}"


def cuda_device() -> tuple[CudaDevice | None, str]:
    """The first CUDA device through the CUDA runtime Polygraphy loads (no pycuda, no torch.cuda needed),
    or None and the reason none is usable."""
    try:
        from polygraphy import cuda
        from polygraphy.exception import PolygraphyException

        with quiet_polygraphy():
            lib = cuda.wrapper().handle
    except (OSError, ImportError) as exc:
        return None, f"the CUDA runtime library cannot be loaded ({first_line(exc)})"
    except PolygraphyException as exc:  # pragma: no cover - depends on the machine
        return None, f"the CUDA runtime library cannot be loaded ({first_line(exc)})"
    count = ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value < 1:
        return None, f"no CUDA device is usable (cudaGetDeviceCount returned status {status}, {count.value} devices)"
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    # cudaDevAttrComputeCapabilityMajor = 75, ...Minor = 76 (stable enum values of the runtime API).
    lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)
    lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)
    # cudaDeviceProp starts with `char name[256]` in every CUDA version; the buffer is larger than the struct.
    props = ctypes.create_string_buffer(8192)
    get_props = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") if get_props(props, 0) == 0 else "cuda-device"
    return CudaDevice(name or "cuda-device", f"{major.value}.{minor.value}"), ""

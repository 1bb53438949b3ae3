"""CUDA through the runtime library Polygraphy loads (`polygraphy.cuda.wrapper().handle`, ctypes; no
pycuda, no torch.cuda): which device is usable, and GPU timing with CUDA events and CUDA graphs, which
Polygraphy's wrapper does not cover (it has streams, memory and copies)."""

from __future__ import annotations

import ctypes
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import EdgetoolError
from .base import first_line, quiet_polygraphy

# Stable enum values of the CUDA runtime API (driver_types.h).
DEV_ATTR_MULTIPROCESSOR_COUNT = 16
DEV_ATTR_COMPUTE_CAPABILITY_MAJOR = 75
DEV_ATTR_COMPUTE_CAPABILITY_MINOR = 76
STREAM_CAPTURE_MODE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal, as trtexec captures


@dataclass(frozen=True)
class CudaDevice:
    name: str
    compute_capability: str  # "8.7"
    sm_count: int = 0  # streaming multiprocessors (an Orin Nano 8 GB has 8, the 4 GB 4)

    @property
    def slug(self) -> str:
        return f"sm{self.compute_capability.replace('.', '')}-{re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-')}"


def cuda_runtime():
    """The ctypes handle of the CUDA runtime library Polygraphy loads (raises OSError/ImportError/
    PolygraphyException when it cannot be loaded)."""
    from polygraphy import cuda

    with quiet_polygraphy():
        return cuda.wrapper().handle


def cuda_device() -> tuple[CudaDevice | None, str]:
    """The first CUDA device through the CUDA runtime Polygraphy loads (no pycuda, no torch.cuda needed),
    or None and the reason none is usable."""
    try:
        from polygraphy.exception import PolygraphyException
    except ImportError as exc:
        return None, f"the CUDA runtime library cannot be loaded ({first_line(exc)})"
    try:
        lib = cuda_runtime()
    except (OSError, ImportError, PolygraphyException) as exc:
        return None, f"the CUDA runtime library cannot be loaded ({first_line(exc)})"
    count = ctypes.c_int(0)
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value < 1:
        return None, f"no CUDA device is usable (cudaGetDeviceCount returned status {status}, {count.value} devices)"

    def attribute(attr: int) -> int:
        value = ctypes.c_int(0)
        lib.cudaDeviceGetAttribute(ctypes.byref(value), attr, 0)
        return value.value

    major, minor = attribute(DEV_ATTR_COMPUTE_CAPABILITY_MAJOR), attribute(DEV_ATTR_COMPUTE_CAPABILITY_MINOR)
    # cudaDeviceProp starts with `char name[256]` in every CUDA version; the buffer is larger than the struct.
    props = ctypes.create_string_buffer(8192)
    get_props = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace") if get_props(props, 0) == 0 else "cuda-device"
    return CudaDevice(name or "cuda-device", f"{major}.{minor}", attribute(DEV_ATTR_MULTIPROCESSOR_COUNT)), ""


def _ptr(value: int | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(value)


class _Cuda:
    """Checked calls into the runtime: a failure is an EdgetoolError naming the call and CUDA's message."""

    def __init__(self, lib=None):
        self.lib = lib if lib is not None else cuda_runtime()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def check(self, status: int, call: str) -> None:
        if status != 0:
            msg = self.lib.cudaGetErrorString(status)
            raise EdgetoolError(f"CUDA {call} failed: error {status} "
                                f"({msg.decode(errors='replace') if msg else 'unknown'})")

    def clear_error(self) -> None:
        self.lib.cudaGetLastError()


class EventTimer:
    """GPU time of work enqueued on a stream, from CUDA events: `time_chunk(enqueue, stream, n)` records
    an event before the first and after every one of n back-to-back enqueues, synchronises once, and
    returns the n intervals in seconds. One untimed enqueue goes first so the GPU is already busy when the
    first event fires: while the GPU works, the host queues the next iteration, and host overhead
    (Python, enqueue calls) stays out of the figures unless the host cannot keep up, which
    `host_bound` reports (host enqueue time at least the GPU time). Works for any callable that enqueues
    on the stream -- a TensorRT context, a CUDA graph, a torch op on `torch.cuda.Stream().cuda_stream`."""

    def __init__(self, lib=None):
        self._cuda = _Cuda(lib)
        self._events: list[ctypes.c_void_p] = []
        self.last_host_s = np.empty(0)  # host seconds spent in each enqueue of the last chunk

    def _ensure(self, count: int) -> None:
        while len(self._events) < count:
            ev = ctypes.c_void_p()
            self._cuda.check(self._cuda.lib.cudaEventCreate(ctypes.byref(ev)), "cudaEventCreate")
            self._events.append(ev)

    def time_chunk(self, enqueue: Callable[[], Any], stream_ptr: int, n: int) -> np.ndarray:
        lib, check = self._cuda.lib, self._cuda.check
        self._ensure(n + 1)
        ev, stream = self._events, _ptr(stream_ptr)
        host = np.empty(n)
        enqueue()
        check(lib.cudaEventRecord(ev[0], stream), "cudaEventRecord")
        for i in range(n):
            t0 = time.perf_counter()
            enqueue()
            host[i] = time.perf_counter() - t0
            check(lib.cudaEventRecord(ev[i + 1], stream), "cudaEventRecord")
        check(lib.cudaEventSynchronize(ev[n]), "cudaEventSynchronize")
        ms = ctypes.c_float(0.0)
        out = np.empty(n)
        for i in range(n):
            check(lib.cudaEventElapsedTime(ctypes.byref(ms), ev[i], ev[i + 1]), "cudaEventElapsedTime")
            out[i] = ms.value / 1e3
        self.last_host_s = host
        return out

    def close(self) -> None:
        for ev in self._events:
            self._cuda.lib.cudaEventDestroy(ev)
        self._events = []


def host_bound(host_s: np.ndarray, gpu_s: np.ndarray) -> bool:
    """True when enqueueing took the host at least as long as the GPU took to run the work: the GPU then
    waits on the host between iterations and the event intervals include that wait (trtexec warns of
    the same, "Throughput may be bound by Enqueue Time")."""
    return bool(host_s.size and gpu_s.size and np.median(host_s) >= np.median(gpu_s))


class CudaGraph:
    """A CUDA graph of one enqueue, launched instead of it (trtexec --useCudaGraph): one launch call per
    iteration, whatever the number of kernels. `capture` returns (graph, "") or (None, why not): some
    TensorRT engines contain operations that cannot be captured, and those run uncaptured."""

    def __init__(self, cuda: _Cuda, exec_handle: ctypes.c_void_p):
        self._cuda, self._exec = cuda, exec_handle

    @classmethod
    def capture(cls, enqueue: Callable[[], Any], stream_ptr: int, lib=None) -> tuple[CudaGraph | None, str]:
        cuda = _Cuda(lib)
        stream = _ptr(stream_ptr)
        # Run once outside the capture, as trtexec does, so one-time initialisation is not captured.
        if enqueue() is False:
            return None, "the enqueue failed before capture"
        cuda.check(cuda.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        cuda.check(cuda.lib.cudaStreamBeginCapture(stream, STREAM_CAPTURE_MODE_THREAD_LOCAL), "cudaStreamBeginCapture")
        why = ""
        try:
            if enqueue() is False:
                why = "the engine's enqueue is not permitted under CUDA graph capture"
        except Exception as exc:  # noqa: BLE001 - any failure inside the capture means "not capturable"
            why = f"capture failed ({type(exc).__name__}: {first_line(exc)})"
        graph = ctypes.c_void_p()
        status = cuda.lib.cudaStreamEndCapture(stream, ctypes.byref(graph))
        if status != 0 or why or not graph.value:
            if graph.value:
                cuda.lib.cudaGraphDestroy(graph)
            cuda.clear_error()
            return None, why or f"cudaStreamEndCapture returned error {status}"
        exec_handle = ctypes.c_void_p()
        # cudaGraphInstantiateWithFlags has one signature from CUDA 11.4 on (JetPack 5 and 6 alike).
        status = cuda.lib.cudaGraphInstantiateWithFlags(ctypes.byref(exec_handle), graph, ctypes.c_ulonglong(0))
        cuda.lib.cudaGraphDestroy(graph)
        if status != 0:
            cuda.clear_error()
            return None, f"cudaGraphInstantiateWithFlags returned error {status}"
        return cls(cuda, exec_handle), ""

    def launch(self, stream_ptr: int) -> None:
        self._cuda.check(self._cuda.lib.cudaGraphLaunch(self._exec, _ptr(stream_ptr)), "cudaGraphLaunch")

    def close(self) -> None:
        if self._exec.value:
            self._cuda.lib.cudaGraphExecDestroy(self._exec)
            self._exec = ctypes.c_void_p()
